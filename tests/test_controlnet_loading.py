"""ControlNets from disk, offline: diffusers folders, and single files in the original layout A1111 users have
(with and without the control_model. prefix), their architecture derived from the shipped UNet configs."""

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import save_file

from gen.loading.controlnet import (
    _ADDED,
    PREFIX,
    controlnet_config,
    detect_version,
    load_controlnet,
    to_original,
)
from gen.pipelines import ControlNetPipeline
from tests import components
from tests.test_controlnet import control_image, controlnet


@pytest.mark.parametrize("version, width", [("v1", 768), ("v2", 1024), ("xl", 2048)])
def test_the_real_architectures_keys_round_trip_through_diffusers_converter(version, width):
    """Built on the meta device (no memory): every key of the real SD 1.x / 2.x / SDXL ControlNet gets an
    original-layout name, the keys name the right base, and diffusers' converter maps them back, shapes and all."""
    config = controlnet_config(version)
    with init_empty_weights():
        net = ControlNetModel.from_config(config)
    assert net.config.cross_attention_dim == width
    for prefix in (PREFIX, ""):
        original = to_original(net, prefix)
        assert detect_version({k: tuple(v.shape) for k, v in original.items()}) == version
        back = convert_controlnet_checkpoint(original, dict(net.config))
        back |= {new: original[prefix + old] for new, old in _ADDED.items() if prefix + old in original}
        want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in back.items() if v is not None} == want


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    return components.pipeline(components.write_tokenizer(tmp_path_factory.mktemp("tok")), "unet")


def images_with(t2i, net) -> np.ndarray:
    pipe = ControlNetPipeline.from_pipe(t2i, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a red circle", image=control_image(), generator=generator, num_inference_steps=3, output_type="np"
    ).images


@pytest.mark.parametrize("prefix", [PREFIX, ""])
def test_a_single_file_loads_to_the_same_net_and_images(t2i, tmp_path, prefix):
    net = controlnet()
    file = tmp_path / "control_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in to_original(net, prefix).items()}, file)
    (tmp_path / "config").mkdir()
    net.save_config(
        tmp_path / "config"
    )  # a tiny net: its own architecture, as a user would pass for a variant
    loaded = load_controlnet(file, config=tmp_path / "config")
    for key, value in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    np.testing.assert_array_equal(images_with(t2i, loaded), images_with(t2i, net))


def test_a_diffusers_folder_loads(t2i, tmp_path):
    net = controlnet()
    net.save_pretrained(tmp_path / "net")
    np.testing.assert_array_equal(images_with(t2i, load_controlnet(tmp_path / "net")), images_with(t2i, net))


def test_bad_files_are_one_line_errors(tmp_path):
    save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "x.safetensors"
    )
    with pytest.raises(ValueError, match="not a ControlNet"):
        load_controlnet(tmp_path / "x.safetensors")
    (tmp_path / "x.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"only \.safetensors ControlNets are loaded"):
        load_controlnet(tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_controlnet(tmp_path / "nope.safetensors")
    small = {k: tuple(v.shape) for k, v in to_original(controlnet()).items()}  # the tiny net's 32-wide text
    with pytest.raises(ValueError, match="32-wide text, not SD 1.x"):
        detect_version(small)
    with pytest.raises(ValueError, match="does not fit a v1 ControlNet's architecture"):
        save_file(
            {k: v.contiguous() for k, v in to_original(controlnet(cross_dim=768)).items()},
            tmp_path / "t.safetensors",
        )
        load_controlnet(tmp_path / "t.safetensors")


def test_the_shuffle_net_pools_its_condition_as_a1111_reads_it_from_the_name(tmp_path, monkeypatch):
    from gen.loading import controlnet as L

    pooled = []
    monkeypatch.setattr(
        L, "_build", lambda state, config, dtype, fails: pooled.append(config["global_pool_conditions"])
    )
    state = {k: v.contiguous() for k, v in to_original(controlnet(cross_dim=768)).items()}
    for name in ("control_v11e_sd15_shuffle.safetensors", "control_v11p_sd15_canny.safetensors"):
        save_file(state, tmp_path / name)
        load_controlnet(tmp_path / name)
    load_controlnet(tmp_path / "control_v11p_sd15_canny.safetensors", global_pool_conditions=True)
    assert pooled == [True, False, True]

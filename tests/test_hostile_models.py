"""A catalogue of broken or hostile model folders: each gets a one-line error naming the file, never a traceback
from inside a library, and no code from a model folder ever runs."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import gen
from gen.cli import main
from tests import components


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "model"
    components.pipeline(tokenizer).save_pretrained(folder)
    return folder


def _weights(folder, part="transformer"):
    return next((folder / part).glob("*.safetensors"))


def lfs_pointer(f):
    _weights(f).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")


def truncated(f):
    w = _weights(f)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def garbage(f):
    _weights(f).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\x00" * 64)


def pickle_only(f):
    w = _weights(f)
    torch.save(load_file(str(w)), f / "transformer" / "diffusion_pytorch_model.bin")
    w.unlink()


def custom_module(f):
    index = json.loads((f / "model_index.json").read_text())
    index["transformer"] = ["os", "system"]
    (f / "model_index.json").write_text(json.dumps(index))


def other_pipeline(f):
    index = json.loads((f / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (f / "model_index.json").write_text(json.dumps(index))


def bad_json(f):
    (f / "model_index.json").write_text("{broken")


def nan_weights(f):
    w = _weights(f, "vae")
    tensors = load_file(str(w))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(w))


def empty(f):
    shutil.rmtree(f)
    f.mkdir()


def component_only(f):
    shutil.copytree(f / "transformer", f.parent / "solo")
    shutil.rmtree(f)
    (f.parent / "solo").rename(f)


def wrong_shapes(f):
    # The config stays; the weights are another DiT's (another text width), under the same names.
    components.dit(cross_dim=16).save_pretrained(f / "other")
    shutil.copy(_weights(f, "other"), _weights(f))
    shutil.rmtree(f / "other")


CATALOGUE = [
    (wrong_shapes, r"(size mismatch|expected shape|does not match)"),
    (
        lfs_pointer,
        r"diffusion_pytorch_model.safetensors is a git-lfs pointer, not the weights; run `git lfs pull`",
    ),
    (truncated, r"diffusion_pytorch_model.safetensors is truncated"),
    (garbage, r"diffusion_pytorch_model.safetensors is (corrupt|truncated)"),
    (
        pickle_only,
        r"diffusion_pytorch_model.bin is a pickle file, which can run code when loaded; .*allow_pickle=True",
    ),
    (custom_module, r"component 'transformer' names module 'os'; gen imports classes only from diffusers"),
    (
        other_pipeline,
        r"is a KandinskyPipeline folder; gen loads TextToImagePipeline, ImageToImagePipeline, InpaintPipeline,",
    ),
    (bad_json, r"model_index.json is not valid JSON"),
    (nan_weights, r"vae: tensor '.*' contains NaN or Inf values"),
    (empty, r"model is empty; expected a diffusers pipeline folder"),
    (component_only, r"holds one component \(DiT\), not a pipeline; pass the folder above it"),
]


@pytest.mark.parametrize("damage,message", CATALOGUE, ids=[d.__name__ for d, _ in CATALOGUE])
def test_broken_folder_one_clear_error(saved, tmp_path, capsys, damage, message):
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    damage(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        gen.load_pipeline(folder)
    capsys.readouterr()
    assert main(["x", "--model", str(folder), "-o", str(tmp_path / "o.png"), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gen: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o.png").exists()


def test_pickle_loads_only_when_allowed(saved, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    pickle_only(folder)
    pipe = gen.load_pipeline(folder, allow_pickle=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)

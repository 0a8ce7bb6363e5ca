"""Plumbing of the speed features; the timings themselves are measured by `gen bench`, not asserted here."""

import json
import logging

import numpy as np
import pytest
import torch

import gen
from gen.cli import main
from gen.pipelines.attention_backend import set_attention
from gen.tools import bench
from tests.images import assert_same_image


def run(pipe, **kw):
    return pipe(
        "a red circle",
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    ).images


def test_guidance_interval_runs_one_branch_outside(dit_pipe):
    sizes = []
    original = dit_pipe.transformer.forward
    dit_pipe.transformer.forward = lambda x, *a, **k: sizes.append(x.shape[0]) or original(x, *a, **k)
    run(dit_pipe, guidance_interval=(0.0, 0.5))
    assert sizes == [2, 2, 1, 1]
    sizes.clear()
    run(dit_pipe, guidance_interval=(0.25, 1.0))
    assert sizes == [1, 2, 2, 2]
    dit_pipe.transformer.forward = original
    assert_same_image(run(dit_pipe, guidance_interval=(0.0, 1.0)), run(dit_pipe), exact=True)
    with pytest.raises(ValueError, match=r"guidance_interval=\(0.6, 0.2\) must be \(start, end\)"):
        run(dit_pipe, guidance_interval=(0.6, 0.2))


def test_attention_backends_agree_and_xformers_falls_back(dit_pipe, caplog):
    ref = run(dit_pipe)
    assert set_attention(dit_pipe, "math") == "math"
    np.testing.assert_allclose(run(dit_pipe), ref, atol=1e-4)
    with caplog.at_level(logging.WARNING):
        assert set_attention(dit_pipe, "xformers") == "sdpa"  # no CUDA here
    assert "xformers needs" in caplog.text
    with pytest.raises(ValueError, match="attention 'flash' must be one of"):
        set_attention(dit_pipe, "flash")


def test_bf16_pipeline_keeps_vae_fp32_and_fp16_on_cpu_is_refused():
    pipe = gen.load_pipeline(torch_dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    image = run(pipe)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    with pytest.raises(ValueError, match="dtype fp16 is ~10x slower than fp32 on a CPU"):
        gen.load_pipeline(torch_dtype=torch.float16)


def test_flop_count_matches_a_hand_count():
    lin = torch.nn.Linear(64, 32, bias=False)
    assert bench.count_flops(lambda: lin(torch.ones(10, 64))) == 2 * 10 * 64 * 32


def test_bench_plumbing(capsys):
    assert main(["bench", "--batch", "1,2", "--steps", "2", "--reps", "1", "--pairs", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["batch"] for m in report["model"]] == [1, 2]
    for m in report["model"]:
        assert m["s_per_image"]["min"] <= m["s_per_image"]["median"] <= m["s_per_image"]["max"]
        assert m["denoiser_flops_per_step"] > 0 and 0 < m["fraction_of_peak"] < 2
    assert report["matmul_peak_flops"] > 1e9
    assert report["unet_vs_diffusers"]["pairs"] == 2 and report["unet_vs_diffusers"]["ratio"]["median"] > 0
    assert report["peak_memory_mb"] > 0
    assert main(["bench", "--batch", "0"]) == 2


def test_fused_qkv_gives_the_same_output():
    from tests import components

    model, g = components.dit(), torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g)
    ref = model(x, 7, c).sample
    model.fuse_qkv_projections()
    assert model.blocks[0].attn1.to_qkv is not None and model.blocks[0].attn2.to_kv is not None
    torch.testing.assert_close(model(x, 7, c).sample, ref, atol=1e-6, rtol=1e-5)


def test_channels_last_keeps_unet_images_and_batch_invariance(unet_pipe, dit_pipe):
    from gen.generation.core import channels_last
    from gen.generation.metadata import PIXEL_TOLERANCE
    from gen.loading.precision import native_bf16

    def images(pipe, seeds, prompt="a red circle"):
        out = pipe(
            [prompt] * len(seeds),
            num_inference_steps=4,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="np",
        ).images
        return np.round(out * 255).astype(int)  # (B, H, W, 3) levels as saved

    unet_pipe.vae.enable_slicing()  # as prepare() does
    before = images(unet_pipe, [12])[0]
    assert channels_last(unet_pipe)
    conv = unet_pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert unet_pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    alone = images(unet_pipe, [12])[0]
    assert np.abs(alone - before).max() <= PIXEL_TOLERANCE
    batch = images(unet_pipe, [10, 11, 12])
    assert_same_image(batch[2], alone)  # image k of a run = the image made alone
    # The DiT pipeline and fp16 (a GPU's precision) are left as they were; bf16 (a native-bf16 CPU's) is not.
    assert not channels_last(dit_pipe) and dit_pipe.vae.decoder.conv_in.weight.is_contiguous()
    unet_pipe.unet.to(torch.bfloat16)
    unet_pipe.unet.to(memory_format=torch.contiguous_format)
    native = native_bf16(unet_pipe.unet.device)[0]  # bf16 takes channels_last only where bf16 is native
    assert channels_last(unet_pipe) == native
    assert unet_pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == native
    unet_pipe.unet.to(torch.float16)
    unet_pipe.unet.to(memory_format=torch.contiguous_format)
    assert not channels_last(unet_pipe) and unet_pipe.unet.conv_in.weight.is_contiguous()


def test_bf16_without_native_support_warns(dit_pipe, caplog, monkeypatch):
    from gen.generation import core
    from gen.generation.options import Options

    monkeypatch.setattr(core, "native_bf16", lambda device: (False, ""))
    with caplog.at_level(logging.WARNING):
        core.prepare(dit_pipe, Options(dtype="bf16"))
    assert "no native bf16" in caplog.text
    caplog.clear()
    monkeypatch.setattr(core, "native_bf16", lambda device: (True, ""))
    with caplog.at_level(logging.WARNING):
        core.prepare(dit_pipe, Options(dtype="bf16"))
        core.prepare(dit_pipe, Options(dtype="fp32"))
    assert "no native bf16" not in caplog.text


def test_the_dit_activation_is_exact_gelu_only_in_bf16_inference():
    """bf16 inference takes torch's fast erf GELU (within 5e-4 of the tanh form the DiT was trained with, far below
    bf16's rounding); fp32 and training keep the tanh form, so fp32 images are unchanged bit for bit."""
    import torch.nn.functional as F

    from gen.models.dit import TanhGELU

    act = TanhGELU().eval()
    x = torch.linspace(-6, 6, 4001)
    assert torch.equal(act(x), F.gelu(x, approximate="tanh"))
    assert torch.equal(act(x.bfloat16()), F.gelu(x.bfloat16()))
    assert float((F.gelu(x) - F.gelu(x, approximate="tanh")).abs().max()) < 5e-4
    assert torch.equal(act.train()(x.bfloat16()), F.gelu(x.bfloat16(), approximate="tanh"))

"""The hostile-input catalogue for generation, kept as data: one row per case and the expected outcome.
CLI: exit 2 and one line on stderr; nothing half-written. Python: ValueError."""

import errno
import tracemalloc
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gen import generation as G
from gen.cli.main import main, read_prompts

LONG = "a red circle on a blue background, " * 290  # ~10,000 characters

# (name, argv, exit status, text expected on stderr (errors) or None)
CATALOGUE = [
    ("size 0", ["x", "--width", "0"], 2, "width=0 must be a positive multiple of 8"),
    ("size negative", ["x", "--height", "-64"], 2, "height=-64 must be a positive multiple of 8"),
    ("size huge", ["x", "--width", "16384", "--height", "16384"], 2, "GiB available; use a smaller size"),
    ("size not divisible", ["x", "--width", "60"], 2, "nearest valid: 64"),
    ("steps 0", ["x", "--steps", "0"], 2, "steps 0 must be an integer >= 1"),
    ("steps 1e6", ["x", "--steps", "1000000"], 2, "steps 1000000 is more than 10000"),
    ("guidance nan", ["x", "--guidance", "nan"], 2, "guidance nan must be a finite number"),
    ("guidance inf", ["x", "--guidance", "inf"], 2, "guidance inf must be a finite number"),
    (
        "rescale 2",
        ["x", "--guidance-rescale", "2"],
        2,
        "guidance-rescale 2.0 must be a finite number from 0 to 1",
    ),
    (
        "seed beyond 2**64",
        ["x", "--seed", str(2**64)],
        2,
        "must be an integer from 0 to 18446744073709551615",
    ),
    ("seed negative", ["x", "--seed", "-1"], 2, "seed -1 must be an integer from 0 to 18446744073709551615"),
    ("unknown flag", ["x", "--colour", "red"], 2, "unrecognized arguments: --colour red"),
    ("empty prompt", [""], 0, None),  # unconditional: a valid request
    ("10,000-character prompt", [LONG], 0, None),  # chunked, nothing cut
    ("control characters in prompt", ["a red\x01 circle"], 0, None),  # dropped from the PNG text chunk
    ("lone surrogate in prompt", ["a red circle \udcff"], 2, "prompt has an invalid character \\udcff"),
    (
        "guidance 1e30",
        ["x", "--guidance", "1e30", "--seed", "1", "--dtype", "fp32"],  # no seed or precision line first
        2,
        "guidance_scale 1e+30 is far beyond the usual 1-30",
    ),
    (
        "device tpu",
        ["x", "--device", "tpu"],
        2,
        "device 'tpu' is not available on this machine; allowed: cpu",
    ),
    ("device cuda", ["x", "--device", "cuda"], 2, "device 'cuda' is not available on this machine; allowed"),
    ("device mps", ["x", "--device", "mps"], 2, "device 'mps' is not available on this machine; allowed"),
]


@pytest.mark.parametrize("name,argv,code,message", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_catalogue(tmp_path, capsys, name, argv, code, message):
    out = tmp_path / "o.png"
    assert (
        main([*argv, "-o", str(out), "--steps", "2"] if "--steps" not in argv else [*argv, "-o", str(out)])
        == code
    )
    err = capsys.readouterr().err
    if code == 2:
        assert err.startswith("gen: error: ") and message in err and err.count("\n") == 1, err
        assert not list(tmp_path.iterdir())  # nothing written, nothing half-written
    else:
        assert Image.open(out).size == (64, 64)
        assert "\x01" not in Image.open(out).text["parameters"]


@pytest.mark.parametrize(
    "content,message",
    [
        (b"a red circle\n\xff\xfe\n", ":2: not valid UTF-8 text"),
        (b"ok\nbad\x00line\n", ":2: contains control characters"),
    ],
)
def test_bad_prompt_files(tmp_path, capsys, content, message):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(content)
    assert main(["--from-file", str(prompts), "-o", str(tmp_path / "out") + "/", "--steps", "2"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_million_line_prompt_file_streams(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a blue background\n" * 1_000_000)  # 34 MB
    lines = read_prompts(prompts)
    assert isinstance(lines, types.GeneratorType)
    tracemalloc.start()
    count = sum(1 for _ in lines)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 1_000_000 and peak < 5 * 2**20  # streamed, never held at once
    jobs = G.plan(read_prompts(prompts), 1, 0)
    assert isinstance(jobs, types.GeneratorType) and next(jobs).seed == 0


def test_disk_full_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    assert main(["x", "-o", str(tmp_path / "o.png"), "--steps", "2"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_out_of_memory_gets_a_hint(tmp_path, capsys, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(G, "render", oom)
    # a seed and a precision given: no seed or auto-precision line before the error
    assert main(["x", "-o", str(tmp_path / "o.png"), "--steps", "2", "--seed", "1", "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "out of memory; try a smaller --batch-size" in err and err.count("\n") == 1


# -- random argument combinations: never a traceback, never a partial file -----------------------------------------
FLAGS = {
    "--steps": st.integers(-5, 20_000).map(str) | st.text(max_size=4),
    "--guidance": st.floats(allow_nan=True, allow_infinity=True).map(str),
    "--guidance-rescale": st.floats(-2, 3).map(str),
    "--width": st.integers(-100, 5000).map(str),
    "--height": st.integers(-100, 5000).map(str),
    "-n": st.integers(-3, 5).map(str),
    "--batch-size": st.integers(-3, 5).map(str),
    "--seed": st.integers(-(2**65), 2**65).map(str),
    "--sampler": st.sampled_from(["euler", "dpm++_2m", "dpm2m", "", "lcm"]),
    "--dtype": st.sampled_from(["fp32", "bf16", "fp16", "int8"]),
    "--guidance-interval": st.text(alphabet="0123456789.,-", max_size=8),
    "--clip-skip": st.integers(-2, 3).map(str),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(st.sampled_from(sorted(FLAGS)), st.just(None), max_size=6).flatmap(
        lambda keys: st.fixed_dictionaries({k: FLAGS[k] for k in keys})
    ),
    st.text(max_size=30),
)
def test_cli_never_tracebacks(tmp_path_factory, monkeypatch, flags, prompt):
    import gen.cli.loop

    out = tmp_path_factory.mktemp("h")
    monkeypatch.setattr(
        gen.cli.loop.Runner, "run", lambda self, jobs: 0
    )  # parsing and checks only: no model work
    argv = ["--", prompt] + [x for k, v in flags.items() for x in (k, v)] + ["-o", str(out / "o.png")]
    assert main(argv) in (0, 2)
    assert not list(out.iterdir())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    height=st.integers(-64, 256),
    width=st.integers(-64, 256),
    steps=st.integers(-3, 50),
    scale=st.floats(allow_nan=True, allow_infinity=True),
    rescale=st.floats(allow_nan=True),
    images=st.integers(-2, 4),
    output=st.sampled_from(["pil", "np", "pt", "latent", "jpg", ""]),
)
def test_pipeline_checks_only_raise_value_error(
    dit_pipe, height, width, steps, scale, rescale, images, output
):
    try:
        dit_pipe.check_inputs(
            prompt="x",
            negative_prompt=None,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=scale,
            guidance_rescale=rescale,
            output_type=output,
            num_images_per_prompt=images,
        )
    except ValueError as e:
        assert "\n" not in str(e)


def test_read_only_output_folder(tmp_path, capsys, monkeypatch):
    # CI runs as root, for whom permissions do not bite; simulate what any other user sees.
    import os

    folder = tmp_path / "ro"
    folder.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert main(["x", "-o", str(folder / "o.png"), "--steps", "2"]) == 2
    assert "is not a writable folder" in capsys.readouterr().err
    assert not list(folder.iterdir())


def test_nan_decode_is_retried_in_fp32(dit_pipe, caplog):
    import logging

    real = dit_pipe._vae_decode
    dit_pipe.vae.to(torch.bfloat16)

    def flaky(x, dtype, generator):  # a half-precision VAE that overflows
        out = real(x, dtype, generator)
        return out if dtype == torch.float32 else out * float("nan")

    dit_pipe._vae_decode = flaky
    with caplog.at_level(logging.WARNING):
        image = dit_pipe.decode_latents(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(image).all() and "retrying in float32" in caplog.text

"""--dtype auto: bf16 where the device has native bf16, fp32 elsewhere, decided once, printed, recorded."""

import json
import logging

import pytest
from PIL import Image

from gen import generation as G
from gen.cli import main
from gen.loading import precision as P

STEPS = ["--steps", "2", "--seed", "3"]


@pytest.mark.parametrize("forced,dtype", [("1", "bf16"), ("0", "fp32")])
def test_auto_follows_the_detection_and_a_named_precision_stays(monkeypatch, forced, dtype):
    monkeypatch.setenv(P.NATIVE_BF16, forced)
    assert P.pick_precision("auto", "cpu") == (dtype, f"auto: GEN_NATIVE_BF16={forced}")
    assert P.pick_precision("auto", "cuda:1") == (dtype, f"auto: GEN_NATIVE_BF16={forced}")
    for named in ("fp32", "bf16", "fp16"):
        assert P.pick_precision(named, "cpu") == (named, None)
    o = G.Options(device="cpu")
    assert o.dtype == "auto" and G.resolve_precision(o) == f"auto: GEN_NATIVE_BF16={forced}"
    assert o.dtype == dtype and G.resolve_precision(o) is None  # once: resolved stays resolved


def test_the_cpu_flags_decide_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(P.NATIVE_BF16)
    monkeypatch.setattr(P, "cpu_flags", lambda path: ("avx512_bf16",))
    assert P.pick_precision("auto") == ("bf16", "auto: this CPU has native bf16, avx512_bf16")
    monkeypatch.setattr(P, "cpu_flags", lambda path: ())
    assert P.pick_precision("auto") == ("fp32", "auto: this CPU has no native bf16")
    assert P.pick_precision("auto", "mps") == ("fp32", "auto: bf16 is not measured on mps")
    monkeypatch.setenv(P.NATIVE_BF16, "yes")
    with pytest.raises(ValueError, match="GEN_NATIVE_BF16='yes' must be 1"):
        P.native_bf16("cpu")


@pytest.mark.parametrize("capability,dtype", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32")])
def test_cuda_auto_is_bf16_from_ampere(monkeypatch, capability, dtype):
    import torch

    monkeypatch.delenv(P.NATIVE_BF16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    native = "native" if dtype == "bf16" else "no native"
    assert P.pick_precision("auto", "cuda:0") == (dtype, f"auto: this GPU has {native} bf16")


def test_cpu_flags_read_linux_cpuinfo(tmp_path):
    x86, arm, none = tmp_path / "x86", tmp_path / "arm", tmp_path / "none"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    none.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert P.cpu_flags(str(x86)) == ("amx_bf16", "avx512_bf16")
    assert P.cpu_flags(str(arm)) == ("bf16",)
    assert P.cpu_flags(str(none)) == ()
    assert P.cpu_flags(str(tmp_path / "absent")) is None


def test_cli_prints_auto_choice_and_records_the_resolved_precision(tmp_path, capsys, monkeypatch):
    out = tmp_path / "a.png"
    assert main(["a red circle", "-o", str(out), *STEPS]) == 0
    err = capsys.readouterr().err
    assert "gen: precision: fp32 (auto: GEN_NATIVE_BF16=0)\n" in err
    record = json.loads(Image.open(out).text["gen"])
    assert record["dtype"] == record["options"]["dtype"] == "fp32"

    monkeypatch.setenv(P.NATIVE_BF16, "1")  # as on a CPU with native bf16
    bf16 = tmp_path / "b.png"
    assert main(["a red circle", "-o", str(bf16), *STEPS]) == 0
    assert "gen: precision: bf16 (auto: GEN_NATIVE_BF16=1)\n" in capsys.readouterr().err
    record = json.loads(Image.open(bf16).text["gen"])
    assert record["dtype"] == record["options"]["dtype"] == "bf16"
    monkeypatch.setenv(P.NATIVE_BF16, "0")  # reproduce runs what the PNG records, not this machine's choice
    assert main(["reproduce", str(bf16), "--verify", "--tolerance", "0"]) == 0
    assert "precision:" not in capsys.readouterr().err


@pytest.mark.parametrize("forced", ["0", "1"])
def test_a_named_dtype_overrides_auto_and_prints_nothing(tmp_path, capsys, monkeypatch, forced):
    monkeypatch.setenv(P.NATIVE_BF16, forced)
    out = tmp_path / "a.png"
    assert main(["a red circle", "-o", str(out), "--dtype", "fp32", *STEPS]) == 0
    assert "precision:" not in capsys.readouterr().err
    assert json.loads(Image.open(out).text["gen"])["dtype"] == "fp32"


def test_quiet_prints_no_precision(tmp_path, capsys):
    assert main(["a red circle", "-o", str(tmp_path / "a.png"), "--quiet", *STEPS]) == 0
    assert "precision:" not in capsys.readouterr().err


@pytest.mark.parametrize("command", [["x", "-o", "a.png"], ["serve", "--port", "0"]])
def test_an_unknown_dtype_is_one_line_naming_auto(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gen: error: ") and err.count("\n") == 1, err
    assert "'int8'" in err and all(name in err for name in ("auto", "fp32", "bf16", "fp16")), err
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"dtype 'int8' must be one of \['auto', 'fp32', 'bf16', 'fp16'\]"):
        G.check_options(G.Options(dtype="int8"))


def test_bench_resolves_auto_and_prints_it(capsys):
    from gen.cli import tools

    args = tools.bench_parser().parse_args(["--dtype", "auto"])
    tools._bench_batches(args)
    assert (
        args.dtype == "fp32" and "gen: precision: fp32 (auto: GEN_NATIVE_BF16=0)" in capsys.readouterr().err
    )
    args = tools.bench_parser().parse_args([])
    tools._bench_batches(args)
    assert args.dtype is None  # bench's own default: fp32, or its fp32 and bf16 rows


def test_serve_resolves_auto_once_logs_it_and_requests_carry_it(caplog, monkeypatch):
    from gen.serve import tasks
    from gen.serve.app import create_app
    from gen.serve.config import ServeConfig
    from tests.serve_support import shared_models

    config = ServeConfig()
    assert config.dtype == "auto"
    with caplog.at_level(logging.INFO, logger="gen.serve.app"):
        app = create_app(config, shared_models())
    assert "precision: fp32 (auto: GEN_NATIVE_BF16=0)" in caplog.text
    assert config.dtype == "fp32" and tasks.server_values(config)["dtype"] == "fp32"
    task = tasks.build_task(config, app.state.gen.models, {"prompt": "a red circle", "steps": 2})
    assert task.options.dtype == "fp32"
    monkeypatch.setenv(P.NATIVE_BF16, "1")
    named, auto = ServeConfig(dtype="fp32"), ServeConfig()
    assert named.resolve_precision() is None and named.dtype == "fp32"
    assert auto.resolve_precision() == "auto: GEN_NATIVE_BF16=1" and auto.dtype == "bf16"


@pytest.mark.parametrize(
    ("flags", "pick"),
    [(("avx512_bf16",), "bf16"), (("amx_bf16", "avx512_bf16"), "bf16"), ((), "fp32"), (("bf16",), "bf16")],
)
def test_auto_takes_bf16_where_the_cpu_has_it_on_both_backends(monkeypatch, flags, pick):
    """AVX-512 BF16 without AMX too: OpenVINO's NaN there was its blob cache's, not the CPU's (re-measured); an
    Arm CPU's BF16 is torch's only (OpenVINO's bf16 is not measured there)."""
    import gen.loading.precision as P

    monkeypatch.delenv(P.NATIVE_BF16, raising=False)
    monkeypatch.setattr(P, "cpu_flags", lambda path: flags)
    assert P.pick_precision("auto", "cpu", "torch")[0] == pick
    assert P.pick_precision("auto", "cpu", "openvino")[0] == (pick if flags != ("bf16",) else "fp32")
    assert P.pick_precision("bf16", "cpu", "openvino") == ("bf16", None)  # named: as asked


def test_bench_times_openvino_bf16_where_auto_would_pick_it(monkeypatch):
    import argparse

    from gen.cli.tools import _openvino_rows

    monkeypatch.delenv(P.NATIVE_BF16, raising=False)
    args = argparse.Namespace(backend="openvino", dtype=None, device="cpu")
    monkeypatch.setattr(P, "cpu_flags", lambda path: ())
    assert _openvino_rows(args) == ("fp32",)
    monkeypatch.setattr(P, "cpu_flags", lambda path: ("avx512_bf16",))
    assert _openvino_rows(args) == ("fp32", "bf16")
    assert _openvino_rows(argparse.Namespace(backend="openvino", dtype="bf16", device="cpu")) == ("bf16",)

"""`gen bench --arch sd15` on a tiny SD-layout folder: the plumbing, the identical outputs, the memory probe.
The timings themselves are printed by the benchmark, not asserted here."""

import copy
import json

import numpy as np
import pytest
import torch

from gen.cli import main
from gen.tools import bench_sd


def tiny_spec() -> dict:
    spec = copy.deepcopy(bench_sd.sd15_spec())
    spec["unet"].update(
        block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
        cross_attention_dim=32,
        sample_size=8,
    )
    spec["vae"].update(block_out_channels=[8, 8, 16, 16], norm_num_groups=4, sample_size=64)
    spec["text_encoder"].update(
        hidden_size=32, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2, projection_dim=32
    )
    return spec


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return bench_sd.build_sd_folder(tmp_path_factory.mktemp("sd") / "tiny", tiny_spec(), seed=0)


def test_rows_agree_and_report_is_complete(tiny_folder):
    report = bench_sd.benchmark_sd(tiny_folder, size=64, steps=3, pairs=3, dtypes=("fp32",))
    names = [r["name"] for r in report["rows"]]
    assert names == ["gen fp32", "diffusers, gen's modules, fp32", bench_sd.OBVIOUS]
    for row in report["rows"]:
        s = row["s_per_image"]
        assert 0 < s["min"] <= s["median"] <= s["max"]
        # Same weights, same settings: the same image, to the pixel level gen's reproducibility promises.
        assert row["max_abs_diff_vs_gen_fp32"] <= 1.0, row
        assert row["weights_mb"] > 0
    gen_row = report["rows"][0]
    shares = gen_row["shares"]
    assert set(shares) == {"unet", "vae", "text_encoder"}
    assert all(v > 0 for v in shares.values()) and sum(shares.values()) < 1
    assert report["unet_flops_per_step"] > 0 and report["unet_s_per_step"] > 0
    assert "over_diffusers_same" in gen_row and "over_diffusers_same" not in report["rows"][1]
    text = bench_sd.format_report(report)
    assert "gen fp32" in text and "% of the fp32 matmul peak" in text


def test_bf16_rows_are_left_out_without_native_bf16(monkeypatch):
    peaks = {"fp32": 40e9, "bf16": 0.6e9}
    monkeypatch.setattr(bench_sd, "native_bf16", lambda device: (False, ""))
    chosen, why = bench_sd._pick_dtypes(None, torch.device("cpu"), peaks)
    assert chosen == ("fp32",) and "no native bf16" in why and "0.6 GFLOP/s" in why
    assert bench_sd._pick_dtypes(("bf16",), torch.device("cpu"), peaks) == (("fp32", "bf16"), None)
    monkeypatch.setattr(bench_sd, "native_bf16", lambda device: (True, ""))
    assert bench_sd._pick_dtypes(None, torch.device("cpu"), {"fp32": 1e9, "bf16": 4e9}) == (
        ("fp32", "bf16"),
        None,
    )


def test_component_timer_sees_each_part_and_restores_it(tiny_folder):
    from gen.generation.core import load
    from gen.generation.options import Options

    pipe = load(Options(model=str(tiny_folder)))
    with bench_sd.ComponentTimer(pipe) as timer:
        bench_sd._generate(pipe, 64, 2, 7.5, 0)
    assert all(s > 0 for s in timer.seconds.values())
    assert "forward" not in vars(pipe.unet) and "decode" not in vars(pipe.vae)


def test_call_peak_counts_what_a_call_allocates():
    if not bench_sd.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    out, mb = bench_sd.call_peak_mb(lambda: np.ones(64 * 2**20 // 8).sum())  # 64 MB touched
    assert out == 64 * 2**20 // 8 and 48 < mb < 200


def test_folder_is_built_once(tmp_path, monkeypatch):
    built = []
    spec = tiny_spec()
    monkeypatch.setattr(bench_sd, "sd15_spec", lambda: spec)
    real = bench_sd.build_sd_folder
    monkeypatch.setattr(bench_sd, "build_sd_folder", lambda *a, **k: built.append(1) or real(*a, **k))
    first = bench_sd.sd15_folder(seed=3, root=tmp_path)
    assert bench_sd.sd15_folder(seed=3, root=tmp_path) == first and built == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen-bench-sd15-s3"]  # no partial folder left


def test_cli_sd15(tiny_folder, capsys):
    argv = ["bench", "--arch", "sd15", "--model", str(tiny_folder), "--size", "64", "--steps", "2"]
    assert main([*argv, "--pairs", "1", "--dtype", "fp32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == 64 and report["pairs"] == 1 and len(report["rows"]) == 3
    assert main([*argv[:-4], "--size", "100"]) == 2
    assert "--size 100 must be a multiple of 8" in capsys.readouterr().err

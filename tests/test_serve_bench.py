"""`gen bench --serve`, small: two real `gen serve` processes, concurrent clients, every image checked."""

import json

import pytest

from gen.cli import main


@pytest.mark.slow
def test_load_script_reports_latency_and_throughput_and_finds_every_image(capsys):
    code = main(
        [
            "bench",
            "--serve",
            "--clients",
            "3",
            "--requests",
            "2",
            "--steps",
            "2",
            "--json",
            "--timeout",
            "600",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"], report
    batched, single = report["runs"]
    assert (batched["max_batch"], single["max_batch"]) == (8, 1)
    for run in report["runs"]:
        assert (run["requests"], run["images"], run["lost"], run["duplicated"], run["cli_equal"]) == (
            6,
            6,
            0,
            0,
            6,
        )
        assert 0 < run["p50_s"] <= run["p95_s"] and run["images_per_s"] > 0 and run["exit_code"] == 0
    assert batched["largest_batch"] > 1 and single["largest_batch"] == 1 and single["batches"] == 6
    assert report["speedup"] == round(batched["images_per_s"] / single["images_per_s"], 2)

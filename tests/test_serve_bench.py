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
    assert code == 0 and report["ok"], report["runs"]  # each run's counts, so a failure shows which
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


@pytest.mark.slow
def test_soak_mixes_the_apis_for_its_minutes_and_reports_memory_and_refusals(capsys):
    code = main(["bench", "--serve", "--minutes", "0.1", "--clients", "3", "--steps", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"], report["runs"]  # each run's counts, so a failure shows which
    assert (report["lost"], report["duplicated"], report["foreign"], report["failures"]) == (0, 0, 0, [])
    for api in ("a1111", "openai", "jobs"):
        row = report["apis"][api]
        assert row["requests"] > 0 and row["images"] > row["requests"] > 0, (api, row)  # batches of 1-4
    assert report["bad"] > 0 and report["bad_4xx"] == report["bad"]
    assert set(report["bad_statuses"]) <= {str(s) for s in range(400, 500)}
    # the soak ran its 6 s (the clients finish the requests under way), not much more
    assert 6 <= report["wall_s"] < 30 and report["requests"] <= report["clients"] * 6 * 20 + report["clients"]
    start, end = report["rss_start_mib"], report["rss_end_mib"]
    assert start > 100 and end > 100 and len(report["rss_samples"]) >= 4
    assert report["rss_growth_mib"] == round(end - start, 1) <= report["rss_bound_mib"] == 50
    assert 0 < report["checked"] == report["cli_equal"] and report["max_pixel_diff"] <= report["tolerance"]
    assert report["exit_code"] == 0


def test_soak_refuses_minutes_that_do_not_fit_the_timeout(capsys):
    for argv in (["--minutes", "0"], ["--minutes", "20", "--timeout", "600"]):
        assert main(["bench", "--serve", *argv]) == 2
        assert "--minutes" in capsys.readouterr().err

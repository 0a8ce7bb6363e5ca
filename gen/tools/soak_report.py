"""The soak's report as `gen bench --serve --minutes M` prints it (gen.tools.serve_soak builds it): one row per
API, then delivery, refusals, memory, the CLI comparison and the exit, each with its verdict.
"""

from __future__ import annotations

SOAK_COLUMNS = (
    ("API", "api", "{}"),
    ("requests", "requests", "{}"),
    ("images", "images", "{}"),
    ("lost", "lost", "{}"),
    ("duplicated", "duplicated", "{}"),
    ("4xx", "answered_4xx", "{}"),
    ("p50 s", "p50_s", "{:.2f}"),
    ("p95 s", "p95_s", "{:.2f}"),
)
API_NAMES = {"a1111": "A1111", "openai": "OpenAI", "jobs": "jobs", "bad": "bad"}


def _line(cells: list[str]) -> str:
    return "  ".join(
        f"{cell:>{max(len(title), 6)}}" for cell, (title, _, _) in zip(cells, SOAK_COLUMNS, strict=True)
    )


def _soak_row(api: str, row: dict) -> str:
    """An API's row; the bad requests' shows their 4xx answers, the others' their images."""
    hidden = ("images", "lost", "duplicated") if api == "bad" else ("answered_4xx",)
    row = {**row, "api": API_NAMES[api]} | dict.fromkeys(hidden)
    return _line([fmt.format(row[key]) if row[key] is not None else "-" for _, key, fmt in SOAK_COLUMNS])


def _pass(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def format_soak(r: dict) -> str:
    v = r["verdicts"]
    lines = [
        f"gen bench --serve --minutes {r['minutes']:g}: {r['clients']} clients, {r['steps']} steps, {r['model']}"
        f" model, --max-batch {r['max_batch']}, OMP_NUM_THREADS={r['torch_threads']}",
        _line([title for title, _, _ in SOAK_COLUMNS]),
        *(_soak_row(api, row) for api, row in r["apis"].items()),
    ]
    lines += [f"  failure: {f}" for f in r["failures"]]
    lines.append(
        f"{r['wall_s'] / 60:.2f} min, {r['requests']} good requests, {r['images']} images, {r['images_per_s']:.2f}"
        f" images/s, {r.get('batches')} pipeline calls, largest batch {r.get('largest_batch')}"
    )
    lines.append(
        f"delivery: lost {r['lost']}, duplicated {r['duplicated']}, foreign {r['foreign']}: {_pass(v['delivery'])}"
    )
    codes = ", ".join(f"{n}x {code}" for code, n in r["bad_statuses"].items())
    lines.append(
        f"bad requests answered 4xx: {r['bad_4xx']} of {r['bad']} ({codes}): {_pass(v['bad requests'])}"
    )
    times = " ".join(f"{t:.2f}" for t, _ in r["rss_samples"])
    values = " ".join("-" if m is None else f"{m:.1f}" for _, m in r["rss_samples"])
    lines.append(f"server VmRSS MiB at minutes {times}: {values}")
    lines.append(
        f"memory: {r['rss_start_mib']} -> {r['rss_end_mib']} MiB after warm-up, grew {r['rss_growth_mib']} MiB"
        f" (bound {r['rss_bound_mib']} MiB): {_pass(v['memory'])}"
    )
    lines.append(
        f"CLI-equal: {r['cli_equal']} of {r['checked']} sampled images within {r['tolerance']} level"
        f" ({r['bit_identical']} bit-identical, largest difference {r['max_pixel_diff']}): {_pass(v['images'])}"
    )
    lines.append(f"server exit {r['exit_code']}: {_pass(v['exit'])}")
    lines.append("PASS" if r["ok"] else "FAIL: " + ", ".join(k for k, ok in v.items() if not ok))
    return "\n".join(lines)

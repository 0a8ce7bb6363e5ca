"""The precisions a pipeline loads in, and the one refused on a CPU. Torch-free: the option checks read it before
anything heavy loads."""

from __future__ import annotations

PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(dtype: str, device: str) -> None:
    """A known precision, and not fp16 on a CPU (emulated there: ~10x slower than fp32)."""
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype {dtype!r} must be one of {list(PRECISIONS)}")
    if dtype == "fp16" and str(device).split(":")[0] == "cpu":
        raise ValueError("dtype fp16 is ~10x slower than fp32 on a CPU; use bf16 or fp32 there")

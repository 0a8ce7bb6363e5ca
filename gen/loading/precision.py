"""The precisions a pipeline loads in, the one refused on a CPU, and the backends it runs on. Torch-free: the option
checks read it before anything heavy loads."""

from __future__ import annotations

import importlib.util

PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(dtype: str, device: str) -> None:
    """A known precision, and not fp16 on a CPU (emulated there: ~10x slower than fp32)."""
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype {dtype!r} must be one of {list(PRECISIONS)}")
    if dtype == "fp16" and str(device).split(":")[0] == "cpu":
        raise ValueError("dtype fp16 is ~10x slower than fp32 on a CPU; use bf16 or fp32 there")


BACKENDS = ("torch", "openvino")
HINTS = {"fp32": "f32", "bf16": "bf16"}


def check_backend(backend: str, dtype: str, device: str) -> None:
    """The backend exists, fits the device and precision, and its package is installed: one line otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} must be one of {list(BACKENDS)}")
    if backend == "torch":
        return
    if str(device) != "cpu":
        raise ValueError(
            f"backend 'openvino' runs on the CPU here; got device {device!r} (use --backend torch)"
        )
    if dtype not in HINTS:
        raise ValueError(f"backend 'openvino' takes dtype fp32 or bf16, not {dtype!r}")
    if importlib.util.find_spec("openvino") is None:
        raise ValueError("backend 'openvino' needs the openvino package: pip install 'gen[openvino]'")

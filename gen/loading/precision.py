"""The precisions a request asks for, the one refused on a CPU, what "auto" picks, and the backends a pipeline runs
on. Torch-free on import: the option checks read it before anything heavy loads (native_bf16 imports torch only for
CUDA, and on a CPU whose /proc/cpuinfo does not answer)."""

from __future__ import annotations

import functools
import importlib.util
import os

AUTO = "auto"  # bf16 where the device computes it natively, else fp32: see pick_precision
PRECISIONS = (AUTO, "fp32", "bf16", "fp16")
NATIVE_BF16 = (
    "GEN_NATIVE_BF16"  # 1 or 0: native_bf16's answer, whatever the device (tests pin 0: fp32 images)
)
# x86's AMX and AVX-512 BF16, Arm's BF16, as Linux names them in /proc/cpuinfo's flags (x86) or Features (Arm)
CPU_BF16 = ("amx_bf16", "avx512_bf16", "bf16")
X86_BF16 = CPU_BF16[:2]


def check_precision(dtype: str, device: str) -> None:
    """A known precision, and not fp16 on a CPU (emulated there: ~10x slower than fp32)."""
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype {dtype!r} must be one of {list(PRECISIONS)}")
    if dtype == "fp16" and str(device).split(":")[0] == "cpu":
        raise ValueError("dtype fp16 is ~10x slower than fp32 on a CPU; use bf16 or fp32 there")


def pick_precision(dtype: str, device: str = "cpu", backend: str = "torch") -> tuple[str, str | None]:
    """The precision to load in and why: `dtype` as given (why None), or for "auto" bf16 where `device` computes
    bf16 natively and fp32 elsewhere, why saying so ("auto: this CPU has native bf16, avx512_bf16"). The same rule
    for both backends: OpenVINO's bf16 once gave NaN on an AMD EPYC with AVX-512 BF16 and no AMX, which was
    OpenVINO's blob cache handing the bf16 compile the f32 blob (gen.loading.backend keeps one folder per
    precision since); re-measured on that CPU, its bf16 SD 1.5 images are finite and within a few levels of
    torch fp32. OpenVINO's bf16 on an Arm CPU (its BF16 feature) is not measured, so auto keeps f32 there."""
    if dtype != AUTO:
        return dtype, None
    native, why = native_bf16(device)
    if native and backend == "openvino" and not os.environ.get(NATIVE_BF16, "").strip():
        if not set(X86_BF16) & set(cpu_flags("/proc/cpuinfo") or ()):
            return "fp32", "auto: OpenVINO's bf16 is measured on x86 CPUs with AVX-512 BF16 or AMX only"
    return "bf16" if native else "fp32", f"auto: {why}"


def native_bf16(device="cpu") -> tuple[bool, str]:
    """Does `device` (a name or torch.device) compute bf16 natively, and why we say so. A CPU: AMX or AVX-512 BF16
    (Arm: BF16) as /proc/cpuinfo lists them, else as oneDNN reports; without them a CPU emulates bf16 matmuls and
    convolutions at a few percent of its fp32 speed (measured on AVX2), and OpenVINO's bf16 hint needs the same.
    CUDA: compute capability 8 (Ampere) or later. $GEN_NATIVE_BF16=1|0 decides instead."""
    forced = os.environ.get(NATIVE_BF16, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{NATIVE_BF16}={forced!r} must be 1 (native bf16) or 0 (none), or unset")
        return forced == "1", f"{NATIVE_BF16}={forced}"
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch

        native = torch.cuda.is_available() and torch.cuda.get_device_capability(torch.device(device))[0] >= 8
        return native, f"this GPU has {'native' if native else 'no native'} bf16"
    if kind != "cpu":
        return False, f"bf16 is not measured on {kind}"
    found = cpu_flags("/proc/cpuinfo")
    if found is None:
        return _onednn_bf16()
    if not found:
        return False, "this CPU has no native bf16"
    return True, f"this CPU has native bf16, {', '.join(found)}"


@functools.cache
def cpu_flags(cpuinfo: str) -> tuple[str, ...] | None:
    """The CPU_BF16 flags Linux's /proc/cpuinfo lists for this CPU; None where it has no flags line (not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags = set(value.split())
                    return tuple(flag for flag in CPU_BF16 if flag in flags)
    except OSError:
        pass
    return None


def _onednn_bf16() -> tuple[bool, str]:
    import torch

    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN
        native = False
    return native, f"oneDNN sees {'native' if native else 'no native'} bf16 on this CPU"


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
    if dtype not in HINTS and dtype != AUTO:
        raise ValueError(f"backend 'openvino' takes dtype auto, fp32 or bf16, not {dtype!r}")
    if importlib.util.find_spec("openvino") is None:
        raise ValueError("backend 'openvino' needs the openvino package: pip install 'gen[openvino]'")

"""`gen bench --arch sd15`: gen at Stable Diffusion 1.5 scale against diffusers, with no download.

The SD 1.5 UNet, VAE and CLIP text encoder are built from gen's shipped configs (gen/assets/sd_configs/v1.json)
with seeded random weights and saved once to a temporary folder, so a second run loads in seconds. Random
weights do the same arithmetic as trained ones; the images are noise, but the time is the time.

Three pipelines are timed in one process, alternating so drift in a shared machine's speed hits all alike:
gen (its own load and fast paths), diffusers' StableDiffusionPipeline on gen's very components (the pipelines
alone compared), and diffusers called the obvious way (`StableDiffusionPipeline.from_pretrained(folder)`, fp32
defaults: what a user gets without gen).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gen.generation.core import load
from gen.generation.options import Options
from gen.loading.precision import native_bf16
from gen.pipelines.single_file import CONFIGS, config_folder
from gen.tools.bench import count_flops, matmul_peak, stats

logger = logging.getLogger(__name__)


def sd15_folder(seed: int = 0, root: str | Path | None = None) -> Path:
    """A diffusers SD 1.5 folder with seeded random weights, built on first use and reused after:
    <tmp>/gen-bench-sd15-s<seed> (4 GB)."""
    folder = Path(root or tempfile.gettempdir()) / f"gen-bench-sd15-s{seed}"
    if (folder / "model_index.json").is_file():
        return folder
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        build_sd_folder(partial, sd15_spec(), seed)
        # Whole or absent: an interrupted build leaves no half folder under the real name.
        partial.rename(folder)
    except OSError:
        if not (folder / "model_index.json").is_file():  # another process renamed its build first: fine
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def build_sd_folder(into: Path, spec: dict, seed: int = 0) -> Path:
    """Lay out a diffusers SD folder from `spec` (the layout of gen/assets/sd_configs/v1.json) with seeded random
    UNet, VAE and text-encoder weights; the tokenizer is the shipped CLIP tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    logger.info("building an SD architecture with random weights (seed %d) in %s", seed, into)
    config_folder("v1", into)  # model_index, scheduler and tokenizer; the models' configs are saved below
    index = into / "model_index.json"
    index.rename(into / "model_index.tmp")  # written last: its presence marks a complete folder
    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(spec["unet"]).save_pretrained(into / "unet")
    AutoencoderKL.from_config(spec["vae"]).save_pretrained(into / "vae")
    CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])).save_pretrained(into / "text_encoder")
    (into / "model_index.tmp").rename(index)
    return into


def sd15_spec() -> dict:
    """The shipped SD 1.5 configs (model_index, unet, vae, text_encoder, scheduler, tokenizer)."""
    return json.loads((CONFIGS / "v1.json").read_text())


# -- memory: the high-water mark of one call, in a process that holds several pipelines ----------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux: writing 5 to /proc/self/clear_refs); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def call_peak_mb(fn) -> tuple[object, float | None]:
    """fn()'s result and the most resident memory it added above what the process held when it began (MB)."""
    if not reset_peak_rss():
        return fn(), None
    before = _status_kib("VmRSS")
    out = fn()
    return out, (_status_kib("VmHWM") - before) / 1024


def weights_mb(pipe) -> float:
    seen, total = set(), 0
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for t in [*module.parameters(), *module.buffers()]:
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total / 2**20


# -- where the time goes -------------------------------------------------------------------------------------


class ComponentTimer:
    """Wall time spent inside the UNet, the VAE decode and the text encoder while a pipeline runs.

    Wraps the modules' `forward` (and `vae.decode`) on the instances, so it sees every call whichever pipeline
    makes it; not for a torch.compile'd module, whose graph would break at the timer."""

    PARTS = (("unet", "forward"), ("vae", "decode"), ("text_encoder", "forward"))

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.seconds = dict.fromkeys([name for name, _ in self.PARTS], 0.0)

    def _wrap(self, name: str, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed

    def __enter__(self) -> ComponentTimer:
        self._own = {}  # what the instances had themselves (the OpenVINO backend's forward), put back after
        for name, attr in self.PARTS:
            module = getattr(self.pipe, name)
            self._own[name] = vars(module).get(attr)
            setattr(module, attr, self._wrap(name, getattr(module, attr)))
        return self

    def __exit__(self, *exc) -> None:
        for name, attr in self.PARTS:
            module = getattr(self.pipe, name)
            vars(module).pop(attr, None)  # the class's method shows through again
            if self._own[name] is not None:
                setattr(module, attr, self._own[name])


# -- the pipelines timed -------------------------------------------------------------------------------------

PROMPT = "a photograph of an astronaut riding a horse"
OBVIOUS = "diffusers from_pretrained, fp32"


@dataclass
class Row:
    name: str
    pipe: object
    dtype: str
    is_gen: bool = False
    first_s: float | None = None  # loading and the first call (OpenVINO: conversion, then compilation)
    seconds: list[float] = field(default_factory=list)
    call_mb: list[float] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)
    image: np.ndarray | None = None  # (H, W, 3) in [0, 1], from the first round

    def run(self, size: int, steps: int, guidance: float, seed: int, time_parts: bool) -> None:
        call = lambda: _generate(self.pipe, size, steps, guidance, seed)  # noqa: E731
        timer = ComponentTimer(self.pipe) if time_parts else nullcontext()
        start = time.perf_counter()
        with timer:
            image, mb = call_peak_mb(call)
        self.seconds.append(time.perf_counter() - start)
        if mb is not None:
            self.call_mb.append(mb)
        if time_parts:
            for name, s in timer.seconds.items():
                self.parts[name] = self.parts.get(name, 0.0) + s
        if self.image is None:
            self.image = image


def _generate(pipe, size: int, steps: int, guidance: float, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    out = pipe(
        PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="np",
    )
    return out.images[0]


def _gen_pipeline(folder: Path, dtype: str, device: str):
    """gen as a user runs it: load() and prepare(), with every fast path gen applies by default."""
    return load(Options(model=str(folder), dtype=dtype, device=device))


def _diffusers_on(pipe):
    """StableDiffusionPipeline on gen's very modules (the pipelines alone compared). diffusers decodes in the
    UNet's dtype, so in bf16 it gets a bf16 copy of the VAE (gen keeps its VAE in fp32)."""
    import copy

    from diffusers import StableDiffusionPipeline

    vae = pipe.vae if pipe.vae.dtype == pipe.unet.dtype else copy.deepcopy(pipe.vae).to(pipe.unet.dtype)
    sd = StableDiffusionPipeline(
        vae=vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),  # own state: PNDM keeps history
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd


def _diffusers_obvious(folder: Path, device: str):
    """diffusers as its README calls it (fp32 defaults); the safety checker is not in the folder."""
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None).to(device)
    sd.set_progress_bar_config(disable=True)
    return sd


# -- the benchmark -------------------------------------------------------------------------------------------


def _rows(folder: Path, dtypes: tuple[str, ...], device: str, openvino: tuple[str, ...] = ()) -> list[Row]:
    rows = []
    for dtype in dtypes:
        gen = _gen_pipeline(folder, dtype, device)
        rows.append(Row(f"gen {dtype}", gen, dtype, is_gen=True))
        rows.append(Row(f"diffusers, gen's modules, {dtype}", _diffusers_on(gen), dtype))
    for dtype in openvino:  # timed from the load: a first process converts, a later one reads the cache
        start = time.perf_counter()
        pipe = load(Options(model=str(folder), dtype=dtype, device=device, backend="openvino"))
        row = Row(f"gen openvino {dtype} ({pipe._openvino['unet']})", pipe, dtype)
        row.first_s = time.perf_counter() - start
        rows.append(row)
    rows.append(Row(OBVIOUS, _diffusers_obvious(folder, device), "fp32"))
    return rows


def _pick_dtypes(
    dtypes: tuple[str, ...] | None, device: torch.device, peaks: dict
) -> tuple[tuple, str | None]:
    """fp32, and bf16 where the hardware has it (or where asked for by name); the reason when it is left out."""
    if dtypes is not None:
        return tuple(dict.fromkeys(("fp32", *dtypes))), None  # fp32 always: the ratios are against it
    if native_bf16(device)[0] and peaks["bf16"] > peaks["fp32"]:
        return ("fp32", "bf16"), None
    return ("fp32",), (
        f"bf16 rows left out: this {device.type} has no native bf16 (AVX-512 BF16 / AMX on a CPU); its bf16 matmul"
        f" ran at {peaks['bf16'] / 1e9:.1f} GFLOP/s against {peaks['fp32'] / 1e9:.1f} in fp32 (--dtype bf16 times"
        " it anyway)"
    )


def benchmark_sd(
    folder: str | Path | None = None,
    size: int = 512,
    steps: int = 20,
    guidance: float = 7.5,
    pairs: int = 3,
    dtypes: tuple[str, ...] | None = None,
    device: str = "cpu",
    seed: int = 0,
    openvino: tuple[str, ...] = (),
) -> dict:
    """Seconds per image of gen and diffusers on SD 1.5 (random weights unless `folder` is an SD folder), batch 1,
    in rounds that rotate the order of the pipelines; see the module's docstring for the rows. `openvino`: the
    precisions to add gen's OpenVINO backend in."""
    dev = torch.device(device)
    folder = Path(folder) if folder is not None else sd15_folder(seed)
    peaks = {
        name: matmul_peak(dt, dev, n=512) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    chosen, skipped = _pick_dtypes(dtypes, dev, peaks)
    rows = _rows(folder, chosen, device, openvino)
    for (
        row
    ) in rows:  # warm-up: oneDNN builds its kernels (OpenVINO compiles) for these shapes on the first call
        start = time.perf_counter()
        _generate(row.pipe, size, 1, guidance, seed)
        if row.first_s is not None:
            row.first_s += time.perf_counter() - start
    for k in range(pairs):
        for row in rows[k % len(rows) :] + rows[: k % len(rows)]:
            row.run(
                size,
                steps,
                guidance,
                seed,
                time_parts=not getattr(row.pipe.unet, "_compiled_call_impl", None),
            )
    base = next(r for r in rows if r.name == OBVIOUS)
    ref = rows[0]  # gen fp32
    report = {
        "arch": "sd15",
        "folder": str(folder),
        "size": size,
        "steps": steps,
        "guidance": guidance,
        "pairs": pairs,
        "device": device,
        "threads": torch.get_num_threads(),
        "matmul_peak_flops": peaks,
        "bf16_native": native_bf16(dev)[0],
        "skipped": skipped,
        "rows": [_summary(r, rows, base, ref) for r in rows],
    }
    latent = size // ref.pipe.vae_scale_factor
    x = torch.randn(2, ref.pipe.unet.config.in_channels, latent, latent, dtype=ref.pipe.unet.dtype)
    context = torch.randn(2, 77, ref.pipe.unet.config.cross_attention_dim, dtype=ref.pipe.unet.dtype)
    with torch.no_grad():
        report["unet_flops_per_step"] = count_flops(lambda: ref.pipe.unet(x, 500, context))
    if ref.parts:  # gen fp32's UNet against the machine's fp32 matmul peak
        report["unet_s_per_step"] = ref.parts["unet"] / (pairs * steps)
        report["unet_fraction_of_peak"] = (
            report["unet_flops_per_step"] / report["unet_s_per_step"] / peaks["fp32"]
        )
    return report


def _summary(row: Row, rows: list[Row], base: Row, ref: Row) -> dict:
    out = {
        "name": row.name,
        "dtype": row.dtype,
        "s_per_image": stats(row.seconds),
        "over_obvious": stats([a / b for a, b in zip(row.seconds, base.seconds, strict=True)]),
        "weights_mb": weights_mb(row.pipe),
        "call_peak_mb": max(row.call_mb) if row.call_mb else None,
        "max_abs_diff_vs_gen_fp32": float(np.abs(row.image - ref.image).max() * 255),
        "mean_abs_diff_vs_gen_fp32": float(np.abs(row.image - ref.image).mean() * 255),
        "first_call_s": row.first_s,
    }
    if row.first_s is not None:
        out["over_gen_fp32"] = stats([a / b for a, b in zip(row.seconds, ref.seconds, strict=True)])
    if row.is_gen:
        theirs = next(r for r in rows if r.name == f"diffusers, gen's modules, {row.dtype}")
        out["over_diffusers_same"] = stats([a / b for a, b in zip(row.seconds, theirs.seconds, strict=True)])
        out["over_gen_fp32"] = stats([a / b for a, b in zip(row.seconds, ref.seconds, strict=True)])
    if row.parts:
        total = sum(row.seconds)
        out["shares"] = {name: s / total for name, s in row.parts.items()}
    return out


def format_report(r: dict) -> str:
    peaks = r["matmul_peak_flops"]
    lines = [
        f"SD 1.5 architecture ({r['folder']}), {r['size']}x{r['size']}, {r['steps']} steps, CFG {r['guidance']},"
        f" batch 1, {r['device']}, {r['threads']} threads, {r['pairs']} rounds in rotating order",
        f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s"
        f" ({'native' if r['bf16_native'] else 'no native'} bf16)",
        f"{'pipeline':<34} {'s/image med (min-max)':>22} {'/obvious':>8} {'/diffusers':>10} {'weights MB':>10}"
        f" {'+call MB':>8}  {'UNet':>5} {'VAE':>5} {'text':>5}  {'max|diff| vs gen fp32 (0-255)':>29}",
    ]
    for row in r["rows"]:
        s = row["s_per_image"]
        same = f"{row['over_diffusers_same']['median']:.3f}" if "over_diffusers_same" in row else ""
        shares = row.get("shares")
        parts = (
            " ".join(f"{100 * shares[k]:4.0f}%" for k in ("unet", "vae", "text_encoder")) if shares else ""
        )
        call = f"{row['call_peak_mb']:.0f}" if row["call_peak_mb"] is not None else "n/a"
        lines.append(
            f"{row['name']:<34} {s['median']:8.2f} ({s['min']:.2f}-{s['max']:.2f}) {row['over_obvious']['median']:8.3f}"
            f" {same:>10} {row['weights_mb']:10.0f} {call:>8}  {parts:<17}  {row['max_abs_diff_vs_gen_fp32']:29.3f}"
        )
    for row in r["rows"]:
        if row["dtype"] != "fp32" and "over_gen_fp32" in row:
            o = row["over_gen_fp32"]
            lines.append(
                f"{row['name']} / gen fp32 time: median {o['median']:.3f} (min {o['min']:.3f}, max {o['max']:.3f})"
            )
    for row in r["rows"]:
        if row.get("first_call_s") is not None:
            lines.append(
                f"{row['name']}: load + first call {row['first_call_s']:.1f} s; image vs gen fp32: mean"
                f" {row['mean_abs_diff_vs_gen_fp32']:.3f}, max {row['max_abs_diff_vs_gen_fp32']:.0f} levels"
            )
    if r["skipped"]:
        lines.append(r["skipped"])
    if "unet_fraction_of_peak" in r:
        lines.append(
            f"UNet: {r['unet_flops_per_step'] / 1e9:.0f} GFLOP per step (CFG batch 2); gen fp32 {r['unet_s_per_step']:.2f}"
            f" s/step = {r['unet_flops_per_step'] / r['unet_s_per_step'] / 1e9:.1f} GFLOP/s,"
            f" {100 * r['unet_fraction_of_peak']:.0f}% of the fp32 matmul peak"
        )
    lines.append(
        "/obvious, /diffusers: median over rounds of the time ratio to diffusers from_pretrained (fp32 defaults) and"
        " to diffusers on gen's modules in the same dtype; +call MB: resident memory a call added above the"
        " loaded process (its peak)"
    )
    return "\n".join(lines)

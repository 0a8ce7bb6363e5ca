"""`gen bench`: how fast gen is, against diffusers on identical work and against the machine's own limit.

Everything is measured in one process after warm-up, over several repetitions. FLOPs are counted by
torch.utils.flop_counter (2 FLOPs per multiply-add; matmuls, convolutions and attention); the peak is a
measured square matmul in the same dtype on the same device.
"""

from __future__ import annotations

import copy
import resource
import statistics
import time
from collections.abc import Callable

import torch

from gen.generation import DTYPES
from gen.loading.pipeline import load_pipeline
from gen.pipelines import TextToImagePipeline
from gen.pipelines.attention_backend import set_attention


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an n x n x n matmul: the practical ceiling for dense work in this dtype here."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / min(timed(lambda: a @ b, device, reps, warmup=2))


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def bench_pipeline(pipe, batch: int, steps: int, reps: int, guidance: float = 5.0, **call) -> dict:
    """Seconds per image for a batch, and the parts: denoiser per step, text encoder, VAE decode, FLOPs."""
    device = pipe._execution_device
    prompts = ["a large red circle on a blue background"] * batch

    def generate():
        gens = [torch.Generator().manual_seed(k) for k in range(batch)]
        pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
            **call,
        )

    total = timed(generate, device, reps)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(prompts, device, 1, guidance > 1)
        context = torch.cat([negative, embeds]) if negative is not None else embeds  # (2B, L, D)
        size = pipe.default_size // pipe.vae_scale_factor
        x = torch.randn(
            context.shape[0],
            pipe.denoiser.config.in_channels,
            size,
            size,
            device=device,
            dtype=pipe.denoiser.dtype,
        )
        t = torch.tensor(500, device=device)
        step = timed(lambda: pipe.denoiser(x, t, encoder_hidden_states=context), device, reps)
        flops = count_flops(lambda: pipe.denoiser(x, t, encoder_hidden_states=context))
        text = timed(lambda: pipe.encode_prompt(prompts, device, 1, guidance > 1), device, reps)
        latents = x[:batch].to(pipe.vae.dtype)
        decode = timed(lambda: pipe.decode_latents(latents), device, reps)
    return {
        "batch": batch,
        "s_per_image": stats([s / batch for s in total]),
        "denoiser_s_per_step": stats(step),
        "text_encoder_s": stats(text),
        "vae_decode_s": stats(decode),
        "denoiser_flops_per_step": flops,
        "achieved_flops": flops / statistics.median(step),
    }


def dtype_speedup(pipe, batch: int, pairs: int) -> dict:
    """The denoiser in the pipeline's dtype against an fp32 copy of it, timed alternately in the same run."""
    device = pipe._execution_device
    fp32 = copy.deepcopy(pipe.denoiser).float()
    size = pipe.default_size // pipe.vae_scale_factor
    x = torch.randn(2 * batch, pipe.denoiser.config.in_channels, size, size, device=device)
    context = torch.randn(2 * batch, 77, pipe.text_encoder.config.hidden_size, device=device)
    t = torch.tensor(500, device=device)
    low = pipe.denoiser.dtype

    def step(model, dtype):
        return lambda: model(x.to(dtype), t, encoder_hidden_states=context.to(dtype))

    ratios = []
    with torch.no_grad():
        timed(step(fp32, torch.float32), device, 1), timed(step(pipe.denoiser, low), device, 1)
        for _ in range(pairs):
            slow = timed(step(fp32, torch.float32), device, 1, warmup=0)[0]
            fast = timed(step(pipe.denoiser, low), device, 1, warmup=0)[0]
            ratios.append(slow / fast)
    return {"batch": batch, "fp32_over_this_dtype": stats(ratios)}


def backend_speedup(model, dtype: str, batch: int, steps: int, pairs: int) -> dict:
    """Whole images at `batch` with the OpenVINO backend in `dtype` against gen's torch fp32, timed alternately
    in the same run; the OpenVINO load and first call (conversion or the cache, then compilation) apart; the
    pictures' mean and largest difference in 0-255 levels."""
    import numpy as np

    start = time.perf_counter()
    fast = load_pipeline(model, torch_dtype=DTYPES[dtype], backend="openvino")
    prompts = ["a red circle on a blue background"] * batch

    def run(pipe):
        generator = [torch.Generator().manual_seed(k) for k in range(batch)]
        return pipe(prompts, num_inference_steps=steps, generator=generator, output_type="np").images

    first = run(fast)
    first_s = time.perf_counter() - start
    slow = load_pipeline(model)
    reference = run(slow)
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        run(slow)
        t1 = time.perf_counter()
        run(fast)
        ratios.append((t1 - t0) / (time.perf_counter() - t1))
    diff = np.abs(first - reference) * 255
    return {
        "batch": batch,
        "dtype": dtype,
        "conversion": fast._openvino["transformer" if fast.denoiser_name == "transformer" else "unet"],
        "load_and_first_call_s": first_s,
        "torch_fp32_over_openvino": stats(ratios),
        "mean_diff_levels": float(diff.mean()),
        "max_diff_levels": float(diff.max()),
    }


def compare_with_diffusers(pipe, steps: int, pairs: int, batch: int = 1) -> dict:
    """gen's pipeline vs StableDiffusionPipeline on the same UNet components: ratio per paired run."""
    import warnings

    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():  # its complaint about steps_offset concerns SD's own hub configs
        warnings.simplefilter("ignore", FutureWarning)
        sd = StableDiffusionPipeline(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            unet=pipe.unet,
            scheduler=pipe.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    sd.set_progress_bar_config(disable=True)
    device = pipe._execution_device
    prompts = ["a large red circle on a blue background"] * batch

    def call(p):
        gens = [torch.Generator().manual_seed(k) for k in range(batch)]
        return lambda: p(
            prompts, num_inference_steps=steps, guidance_scale=5.0, generator=gens, output_type="np"
        )

    timed(call(pipe), device, 1), timed(call(sd), device, 1)  # warm both
    ratios, ours, theirs = [], [], []
    for k in range(pairs):  # alternate the order so drift in machine speed hits both alike
        first, second = (pipe, sd) if k % 2 == 0 else (sd, pipe)
        a = timed(call(first), device, 1, warmup=0)[0]
        b = timed(call(second), device, 1, warmup=0)[0]
        g, d = (a, b) if first is pipe else (b, a)
        ours.append(g)
        theirs.append(d)
        ratios.append(g / d)
    return {"gen_s": stats(ours), "diffusers_s": stats(theirs), "ratio": stats(ratios), "pairs": pairs}


def tiny_sd_pipeline(base):
    """An SD-architecture UNet (SD's block types, layers and attention; small widths) on `base`'s text encoder,
    tokenizer, VAE and scheduler: the same work StableDiffusionPipeline does, at a size this machine can time."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=base.default_size // base.vae_scale_factor,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 128, 128),
        attention_head_dim=8,
        norm_num_groups=32,
        cross_attention_dim=base.text_encoder.config.hidden_size,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).to(device=base.device, dtype=base.denoiser.dtype)
    # A scheduler of its own: StableDiffusionPipeline rewrites an old-style scheduler config it is given.
    scheduler = type(base.scheduler).from_config(base.scheduler.config)
    # diffusers' SD pipeline decodes in the UNet's dtype: both sides share one VAE copy in that dtype.
    vae = copy.deepcopy(base.vae).to(unet.dtype)
    pipe = TextToImagePipeline(
        vae=vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        scheduler=scheduler,
        unet=unet.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def benchmark(
    model=None,
    dtype: str = "fp32",
    device: str = "cpu",
    attention: str = "sdpa",
    compile: bool = False,
    batches=(1, 16),
    steps: int = 20,
    reps: int = 5,
    pairs: int = 5,
    unet: bool = True,
    backend: str = "torch",
) -> dict:
    torch_dtype = DTYPES[dtype]
    pipe = load_pipeline(model, torch_dtype=torch_dtype, device=device)
    report = {
        "device": device,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "attention": set_attention(pipe, attention),
    }
    dev = torch.device(device)
    report["matmul_peak_flops"] = matmul_peak(torch_dtype, dev)
    if compile:
        start = time.perf_counter()
        pipe.denoiser.compile()
        pipe("warm-up", num_inference_steps=2, output_type="np")
        report["compile_warmup_s"] = time.perf_counter() - start
    report["model"] = [bench_pipeline(pipe, b, steps, reps) for b in batches]
    if dtype != "fp32":
        report["speedup_vs_fp32"] = dtype_speedup(pipe, max(batches), pairs)
    for row in report["model"]:
        row["fraction_of_peak"] = row["achieved_flops"] / report["matmul_peak_flops"]
    if unet:
        sd = tiny_sd_pipeline(pipe)
        if device != "cpu" or dtype == "fp32":
            sd.unet.to(memory_format=torch.channels_last)
        report["unet_vs_diffusers"] = compare_with_diffusers(sd, steps, pairs)
    if backend == "openvino":
        report["openvino"] = backend_speedup(model, dtype, max(batches), steps, pairs)
    report["peak_memory_mb"] = peak_memory_mb(dev)
    return report


def format_report(r: dict) -> str:
    lines = [
        f"device {r['device']}, {r['dtype']}, {r['threads']} threads, attention {r['attention']}, {r['steps']} steps",
        f"measured {r['dtype']} matmul peak: {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s",
    ]
    if "compile_warmup_s" in r:
        lines.append(f"torch.compile warm-up: {r['compile_warmup_s']:.1f} s")
    lines.append(
        "batch  s/image (min/med/max)      denoiser s/step   text s   VAE s   GFLOP/step  GFLOP/s  of peak"
    )
    for m in r["model"]:
        s, d = m["s_per_image"], m["denoiser_s_per_step"]
        lines.append(
            f"{m['batch']:>5}  {s['min']:.3f}/{s['median']:.3f}/{s['max']:.3f}  {d['median']:>15.4f}"
            f"  {m['text_encoder_s']['median']:7.4f}  {m['vae_decode_s']['median']:6.4f}"
            f"  {m['denoiser_flops_per_step'] / 1e9:10.2f}  {m['achieved_flops'] / 1e9:7.1f}  {100 * m['fraction_of_peak']:6.1f}%"
        )
    if "speedup_vs_fp32" in r:
        sp = r["speedup_vs_fp32"]["fp32_over_this_dtype"]
        lines.append(
            f"denoiser fp32 / {r['dtype']} time at batch {r['speedup_vs_fp32']['batch']} (paired, same run):"
            f" min {sp['min']:.2f}x  median {sp['median']:.2f}x  max {sp['max']:.2f}x"
        )
    if "unet_vs_diffusers" in r:
        c = r["unet_vs_diffusers"]
        ratio = c["ratio"]
        lines.append(
            f"SD-architecture UNet, gen / diffusers time ratio over {c['pairs']} paired runs: min {ratio['min']:.3f}"
            f"  median {ratio['median']:.3f}  max {ratio['max']:.3f}  (gen {c['gen_s']['median']:.3f} s,"
            f" diffusers {c['diffusers_s']['median']:.3f} s per image)"
        )
    if "openvino" in r:
        o = r["openvino"]
        ratio = o["torch_fp32_over_openvino"]
        lines.append(
            f"OpenVINO {o['dtype']} ({o['conversion']}; load + first call {o['load_and_first_call_s']:.1f} s), whole"
            f" images at batch {o['batch']}: torch fp32 / OpenVINO time min {ratio['min']:.2f}x median"
            f" {ratio['median']:.2f}x max {ratio['max']:.2f}x; pictures differ by mean {o['mean_diff_levels']:.3f},"
            f" max {o['max_diff_levels']:.0f} levels"
        )
    lines.append(f"peak memory: {r['peak_memory_mb']:.0f} MB")
    return "\n".join(lines)

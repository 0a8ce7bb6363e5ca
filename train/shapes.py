"""Rebuild gen's embedded default model from nothing: python -m gen.train.shapes --out DIR

Stages, each saved when done so a rerun with the same --out skips it: render the shapes data; train a tiny CLIP
(its text tower becomes the pipeline's text encoder, its vision tower part of the evaluator); train the VAE;
train the DiT on VAE latents with captions as people write them (gen.data.captions) on gen.train.trainer's loop
(caption dropout, min-SNR, EMA, bf16; checkpointed and resumable); train and verify the judge; evaluate; write the pipeline folder DIR/model.
Every stage runs for a time budget (and a step cap), so the whole run has a known length on any machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from gen.evaluation import evaluate_model, format_report
from gen.files import atomic_folder, atomic_write_text
from gen.loading.assets import DEFAULT_MODEL
from gen.models import DiT, dit_from_preset
from gen.models.judge import Judge
from gen.pipelines import TextToImagePipeline
from gen.train import shapes_parts as P
from gen.train.common import exit_on_train_error, parse_options, save_options
from gen.train.shapes_dit import RenderedShapes, ShapesDiTTrainer
from gen.train.trainer import TrainOptions

logger = logging.getLogger("gen.train.shapes")


@dataclass
class ShapesOptions:
    out: Path = field(
        default=Path("runs/shapes"), metadata={"help": "run folder; the model lands in OUT/model"}
    )
    tokenizer: Path = field(default=DEFAULT_MODEL / "tokenizer", metadata={"help": "CLIP tokenizer folder"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    seed: int = 0
    resolution: int = 64
    dataset_size: int = field(default=60_000, metadata={"help": "training images rendered"})
    workers: int = field(default=1, metadata={"help": "processes rendering the data"})
    clip_minutes: float = 12.0
    clip_steps: int = 20_000
    clip_batch: int = 256
    vae_minutes: float = 10.0
    vae_steps: int = 20_000
    vae_batch: int = 32
    dit_minutes: float = 75.0
    dit_steps: int = 200_000
    dit_batch: int = 64
    dit_lr: float = 5e-4
    dit_preset: str = "shapes"
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    dit_warmup: int = 500
    token_lr: float = field(
        default=5e-3, metadata={"help": "learning rate of caption words new to the text encoder"}
    )
    # bf16 autocast is faster on GPUs and CPUs with native bf16 (AVX-512 BF16, AMX), but measured ~10x slower
    # than fp32 for the DiT's training step on an AVX2-only CPU.
    dit_precision: str = field(default="no", metadata={"help": "no or bf16 (autocast)"})
    dit_checkpoint_steps: int = 500
    judge_minutes: float = 4.0
    judge_steps: int = 3000
    eval_images_per_prompt: int = 4
    overwrite: bool = field(default=False, metadata={"help": "replace an existing OUT/model"})
    init_from: str = field(
        default="",
        metadata={
            "help": "a shapes model folder: reuse its CLIP, VAE and judge, "
            "and fine-tune its DiT instead of starting from scratch"
        },
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def stage_clip(o: ShapesOptions, tokenizer, data: P.Data, device) -> Path:
    folder = o.out / "stages" / "clip"
    if (folder / "report.json").exists():
        return folder
    clip = P.make_clip(tokenizer, o.resolution)
    P.train_clip(
        clip,
        data,
        device=device,
        minutes=o.clip_minutes,
        max_steps=o.clip_steps,
        batch=o.clip_batch,
        lr=0.001,
        seed=o.seed,
    )
    report = {"zero_shot_heldout": P.clip_zero_shot(clip, tokenizer, device)}
    logger.info("clip zero-shot on held-out renders: %s", report["zero_shot_heldout"])
    text, vision, projection = P.split_clip(clip.float().cpu())
    P.prune_embeddings(text, P.used_token_ids(tokenizer))

    def write(tmp: Path) -> None:
        text.save_pretrained(tmp / "text_encoder")
        vision.save_pretrained(tmp / "clip_vision")
        save_file(
            {"weight": projection.contiguous()}, str(tmp / "clip_vision" / "text_projection.safetensors")
        )
        _write_json(tmp / "report.json", report)

    return atomic_folder(folder, write, overwrite=True)


def stage_vae(o: ShapesOptions, data: P.Data, device) -> Path:
    folder = o.out / "stages" / "vae"
    if (folder / "report.json").exists():
        return folder
    vae = P.make_vae(o.resolution)
    P.train_vae(
        vae,
        data,
        device=device,
        minutes=o.vae_minutes,
        max_steps=o.vae_steps,
        batch=o.vae_batch,
        lr=0.0005,
        seed=o.seed,
    )
    report = P.vae_report(vae, device)
    # Latents are scaled to unit variance for the denoiser: scaling_factor = 1 / std, stored in the config.
    vae.register_to_config(scaling_factor=1.0 / report["latent_std"])
    logger.info("vae: %s", report)

    def write(tmp: Path) -> None:
        vae.save_pretrained(tmp / "vae")
        _write_json(tmp / "report.json", report)

    return atomic_folder(folder, write, overwrite=True)


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        timestep_spacing="trailing",
    )


def stage_dit(o: ShapesOptions, text_encoder, vae, tokenizer, data: P.Data) -> Path:
    """The DiT on gen.train.trainer's loop (see gen.train.shapes_dit), then its EMA weights as a stage."""
    folder = o.out / "stages" / "dit"
    if (folder / "report.json").exists():
        return folder
    latent = o.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    if o.init_from:
        dit = DiT.from_pretrained(Path(o.init_from) / "transformer").float()
    else:
        dit = dit_from_preset(
            o.dit_preset,
            sample_size=latent,
            in_channels=vae.config.latent_channels,
            cross_attention_dim=text_encoder.config.hidden_size,
        )
    pipe = TextToImagePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=train_scheduler(), transformer=dit
    )
    run = o.out / "stages" / "dit-run"
    # latent_mode: the shapes VAE's posterior is wide (std 0.36 against a latent std of 0.9), and its DiT learns
    # the means, which the decoder renders crisply; samples measured 10x the loss of the shipped model's.
    options = TrainOptions(
        output_dir=str(run),
        resolution=o.resolution,
        batch_size=o.dit_batch,
        max_steps=o.dit_steps,
        learning_rate=o.dit_lr,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=o.dit_warmup,
        mixed_precision=o.dit_precision,
        caption_dropout=o.caption_dropout,
        min_snr_gamma=o.min_snr_gamma,
        ema_decay=o.ema_decay,
        cache_latents=True,
        latent_mode=True,
        seed=o.seed,
        max_minutes=o.dit_minutes,
        checkpointing_steps=o.dit_checkpoint_steps,
        checkpoints_total_limit=1,
        resume="latest",
    )
    trainer = ShapesDiTTrainer(options, pipe, RenderedShapes(data.images, data.scenes), o.token_lr)
    started = time.monotonic()
    trainer.run()
    minutes = (time.monotonic() - started) / 60
    losses = trainer.losses[-200:]
    report = {
        "steps": trainer.step,
        "final_loss": sum(losses) / max(len(losses), 1),
        "minutes": round(minutes, 1),
        "images_per_second": round(trainer.images_seen / max(minutes * 60, 1e-9), 1),
        "parameters": sum(p.numel() for p in dit.parameters()),
        "precision": o.dit_precision,
    }

    def write(tmp: Path) -> None:
        for name in ("transformer", "text_encoder", "scheduler"):
            shutil.copytree(run / name, tmp / name)
        _write_json(tmp / "report.json", report)

    return atomic_folder(folder, write, overwrite=True)


def stage_judge(o: ShapesOptions, device) -> Path:
    folder = o.out / "stages" / "judge"
    if (folder / "report.json").exists():
        return folder
    judge = Judge()
    P.train_judge(
        judge,
        resolution=o.resolution,
        device=device,
        minutes=o.judge_minutes,
        max_steps=o.judge_steps,
        batch=256,
        seed=o.seed + 1,
        count=min(o.dataset_size, 40000),
        workers=o.workers,
    )
    report = P.judge_report(judge)
    logger.info("judge accuracy on rendered ground truth: %s", report)

    def write(tmp: Path) -> None:
        judge.save_pretrained(tmp / "judge")
        _write_json(tmp / "report.json", report)

    return atomic_folder(folder, write, overwrite=True)


def assemble(o: ShapesOptions, tokenizer: CLIPTokenizer, stages: dict[str, Path], device) -> Path:
    """The shipped folder: the pipeline (fp16 weights, loaded as fp32), the CLIP vision tower and the judge."""
    # The DiT stage's text encoder: the CLIP's, with the embeddings of words it learned alongside the DiT.
    text_encoder = CLIPTextModel.from_pretrained(stages["dit"] / "text_encoder")
    pipe = TextToImagePipeline(
        vae=_load_vae(stages["vae"]),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler.from_config(
            DDPMScheduler.from_pretrained(stages["dit"] / "scheduler").config
        ),
        transformer=_load_dit(stages["dit"]),
    )

    def write(tmp: Path) -> None:
        pipe.to(torch.float16).save_pretrained(tmp)
        # Ship CLIP's own vocab.json + merges.txt (transformers 5 would save only a 3.6 MB tokenizer.json).
        shutil.rmtree(tmp / "tokenizer")
        shutil.copytree(o.tokenizer, tmp / "tokenizer")
        vision = CLIPVisionModelWithProjection.from_pretrained(stages["clip"] / "clip_vision").to(
            torch.float16
        )
        vision.save_pretrained(tmp / "clip_vision")
        shutil.copy(stages["clip"] / "clip_vision" / "text_projection.safetensors", tmp / "clip_vision")
        Judge.from_pretrained(stages["judge"] / "judge").to(torch.float16).save_pretrained(tmp / "judge")
        reports = {k: json.loads((v / "report.json").read_text()) for k, v in stages.items()}
        report = {
            "command": " ".join(["python -m gen.train.shapes", *sys.argv[1:]]),
            "device": _device_name(device),
            "options": {k: str(v) for k, v in vars(o).items()},
            **reports,
        }
        base = Path(o.init_from) / "training_report.json" if o.init_from else None
        if base is not None and base.exists():  # provenance: the run this one continued from
            report["init_from_report"] = json.loads(base.read_text())
        _write_json(tmp / "training_report.json", report)

    return atomic_folder(o.out / "model", write, overwrite=True)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"


def seed_stages_from(o: ShapesOptions, model: Path) -> None:
    """Lay out a finished model's CLIP, VAE and judge as completed stages, so only the DiT trains."""
    reports = (
        json.loads((model / "training_report.json").read_text())
        if (model / "training_report.json").exists()
        else {}
    )
    parts = {"clip": ("text_encoder", "clip_vision"), "vae": ("vae",), "judge": ("judge",)}
    for stage, folders in parts.items():
        dest = o.out / "stages" / stage
        if (dest / "report.json").exists():
            continue

        def write(tmp: Path, folders=folders, stage=stage) -> None:
            for name in folders:
                shutil.copytree(model / name, tmp / name)
            _write_json(tmp / "report.json", reports.get(stage, {"from": str(model)}))

        atomic_folder(dest, write, overwrite=True)


def _load_vae(folder: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder / "vae")


def _load_dit(folder: Path):
    return DiT.from_pretrained(folder / "transformer")


def run_eval(o: ShapesOptions, model: Path, device) -> dict:
    report = evaluate_model(
        model, o.eval_images_per_prompt, device=str(device), grid=o.out / "grid.png", batch_size=64
    )
    _write_json(o.out / "eval.json", report)
    print(format_report(report))
    return report


@exit_on_train_error
def main(argv: list[str] | None = None) -> None:
    o = parse_options(ShapesOptions, argv, __doc__)
    if (o.out / "model").exists() and not o.overwrite:
        raise SystemExit(
            f"{o.out / 'model'} exists; pass --overwrite to replace it (finished stages are reused)"
        )
    o.out.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(), logging.FileHandler(o.out / "train.log")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", handlers=handlers)
    set_seed(o.seed)
    device = pick_device(o.device)
    save_options(o, o.out)
    t0 = time.monotonic()
    tokenizer = CLIPTokenizer.from_pretrained(o.tokenizer)
    if o.init_from:
        seed_stages_from(o, Path(o.init_from))
    data = P.render_data(
        o.dataset_size, seed=o.seed, resolution=o.resolution, tokenizer=tokenizer, workers=o.workers
    )
    logger.info("rendered %d images in %.1fs", len(data.images), time.monotonic() - t0)
    stages = {"clip": stage_clip(o, tokenizer, data, device), "vae": stage_vae(o, data, device)}
    text_encoder = CLIPTextModel.from_pretrained(stages["clip"] / "text_encoder").float().to(device).eval()
    vae = _load_vae(stages["vae"]).float().to(device).eval()
    stages["dit"] = stage_dit(o, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer, data=data)
    stages["judge"] = stage_judge(o, device)
    model = assemble(o, tokenizer, stages, device)
    print(f"model: {model} ({sum(f.stat().st_size for f in model.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    run_eval(o, model, device)
    print(
        f"done in {(time.monotonic() - t0) / 60:.1f} min; eval in {o.out / 'eval.json'}, grid {o.out / 'grid.png'}"
    )


if __name__ == "__main__":
    main()

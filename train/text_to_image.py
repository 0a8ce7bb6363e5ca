"""Train a text-to-image denoiser on an image-caption folder: fine-tune a pipeline folder (gen's or SD-layout), or
train a fresh DiT preset on its VAE and text encoder.

    accelerate launch -m gen.train.text_to_image --data-dir photos/ --output-dir runs/mine --max-steps 1000
    python -m gen.train.text_to_image --data-dir photos/ --from-scratch shapes --resume latest ...

Every random stream (data order, caption dropout, flips, noise, timesteps) lives in the checkpointed state, so a
run killed at any moment and resumed ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler

from gen.train import checkpoint
from gen.train.common import EMA, atomic_folder, denoiser_loss, parse_options, save_options
from gen.train.data import ImageCaptionFolder

logger = logging.getLogger("gen.train.text_to_image")


@dataclass
class Options:
    data_dir: str = field(
        default="", metadata={"help": "image-caption folder (images + .txt or metadata.jsonl)"}
    )
    output_dir: str = "runs/text_to_image"
    model: str = field(
        default="", metadata={"help": "pipeline folder to start from (default: the embedded model)"}
    )
    from_scratch: str = field(default="", metadata={"help": "train a fresh DiT of this preset instead"})
    resolution: int = 64
    batch_size: int = 4
    max_steps: int = 100
    learning_rate: float = 1e-4
    lr_scheduler: str = field(default="constant", metadata={"help": "diffusers.optimization name"})
    lr_warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16"})
    gradient_checkpointing: bool = False
    train_text_encoder: bool = False
    caption_dropout: float = 0.1
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    ema_decay: float = field(default=0.0, metadata={"help": "0 turns EMA off"})
    flip: bool = False
    seed: int = 0
    checkpointing_steps: int = 0
    checkpoints_total_limit: int = 0
    resume: str = field(default="", metadata={"help": "'latest' or a checkpoint folder"})
    save_every: int = field(default=0, metadata={"help": "also write a pipeline folder every N steps"})
    validation_steps: int = 0
    validation_prompt: str = ""
    overwrite: bool = False


class Trainer:
    def __init__(self, o: Options):
        from gen.weights import load_pipeline

        self.o, self.out = o, Path(o.output_dir)
        torch.manual_seed(o.seed)  # a fresh DiT's initial weights are part of the run's determinism
        self.acc = Accelerator(mixed_precision=o.mixed_precision, gradient_accumulation_steps=o.gradient_accumulation_steps,
                               cpu=not torch.cuda.is_available())  # fmt: skip
        self.pipe = load_pipeline(o.model or None)
        if o.from_scratch:
            self.pipe.transformer, self.pipe.unet = self._fresh_dit(), None
        self.denoiser = self.pipe.denoiser.train()
        self.pipe.vae.requires_grad_(False)
        self.pipe.text_encoder.requires_grad_(o.train_text_encoder).train(o.train_text_encoder)
        if o.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.data = ImageCaptionFolder(o.data_dir, o.resolution, o.flip)
        params = list(self.denoiser.parameters()) + (
            list(self.pipe.text_encoder.parameters()) if o.train_text_encoder else []
        )
        self.opt = torch.optim.AdamW(params, lr=o.learning_rate, weight_decay=1e-2)
        self.lr = get_scheduler(
            o.lr_scheduler, self.opt, num_warmup_steps=o.lr_warmup_steps, num_training_steps=o.max_steps
        )
        self.ema = EMA(self.denoiser, o.ema_decay) if o.ema_decay else None
        self.rng = random.Random(o.seed)  # caption dropout and flips
        self.noise = torch.Generator(self.acc.device).manual_seed(o.seed)  # noise, timesteps, VAE sampling
        self.step, self.epoch, self.position = 0, 0, 0
        self.model, self.opt = self.acc.prepare(self.denoiser, self.opt)

    def _fresh_dit(self):
        from gen.models import dit_from_preset

        latent = self.o.resolution // self.pipe.vae_scale_factor
        return dit_from_preset(self.o.from_scratch, sample_size=latent, in_channels=self.pipe.vae.config.latent_channels,
                               cross_attention_dim=self.pipe.text_encoder.config.hidden_size)  # fmt: skip

    # -- state ------------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": self.acc.unwrap_model(self.model).state_dict(), "optimizer": self.opt.state_dict(),
                "lr": self.lr.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "text_encoder": self.pipe.text_encoder.state_dict() if self.o.train_text_encoder else None,
                "step": self.step, "epoch": self.epoch, "position": self.position,
                "rng": list(self.rng.getstate()), "noise": self.noise.get_state(), "torch": torch.get_rng_state()}  # fmt: skip

    def restore(self, path: Path) -> None:
        s = checkpoint.load(path)
        self.acc.unwrap_model(self.model).load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.lr.load_state_dict(s["lr"])
        if self.ema and s["ema"]:
            self.ema.load_state_dict(s["ema"])
        if s["text_encoder"] is not None:
            self.pipe.text_encoder.load_state_dict(s["text_encoder"])
        self.step, self.epoch, self.position = s["step"], s["epoch"], s["position"]
        r = s["rng"]
        self.rng.setstate((r[0], tuple(r[1]), r[2]))
        self.noise.set_state(s["noise"])
        torch.set_rng_state(s["torch"])
        logger.info("resumed from %s at step %d", path, self.step)

    # -- data -------------------------------------------------------------------------------------------------------
    def next_batch(self) -> dict:
        """This process's share of the next global batch, in a seeded order per epoch."""
        world, rank = self.acc.num_processes, self.acc.process_index
        size = self.o.batch_size * world
        order = list(range(len(self.data)))
        random.Random(self.o.seed * 1000 + self.epoch).shuffle(order)
        if self.position + size > len(order) and self.position > 0:
            self.epoch, self.position = self.epoch + 1, 0
            order = list(range(len(self.data)))
            random.Random(self.o.seed * 1000 + self.epoch).shuffle(order)
        picks = [order[(self.position + k) % len(order)] for k in range(size)][rank * self.o.batch_size :][
            : self.o.batch_size
        ]
        self.position += size
        items = [self.data.load(i, self.rng) for i in picks]
        captions = ["" if self.rng.random() < self.o.caption_dropout else it["caption"] for it in items]
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items]), "captions": captions}

    # -- the loop ---------------------------------------------------------------------------------------------------
    def train_step(self) -> float:
        from gen.text import encode

        pipe, dev = self.pipe, self.acc.device
        for _ in range(self.o.gradient_accumulation_steps):
            batch = self.next_batch()
            with self.acc.accumulate(self.model):
                with torch.no_grad():
                    x = batch["pixel_values"].to(dev)  # (B, 3, R, R)
                    latents = (
                        pipe.vae.encode(x).latent_dist.sample(self.noise) * pipe.vae.config.scaling_factor
                    )
                with torch.set_grad_enabled(self.o.train_text_encoder):
                    context = encode(pipe.tokenizer, pipe.text_encoder, batch["captions"], dev)  # (B, L, D)
                noise, t = self._noise_and_timesteps(latents)
                with self.acc.autocast():
                    loss = denoiser_loss(self.model, self.scheduler, latents, context, self.o.min_snr_gamma,
                                         noise=noise, t=t)  # fmt: skip
                self.acc.backward(loss)
                if self.acc.sync_gradients:
                    self.acc.clip_grad_norm_(self.model.parameters(), 1.0)
                self.opt.step()  # the prepared optimizer skips these while gradients accumulate
                self.opt.zero_grad(set_to_none=True)
                if self.acc.sync_gradients:
                    self.lr.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.step}; stopping (last good checkpoint kept)"
            )
        if self.ema:
            self.ema.update(self.acc.unwrap_model(self.model))
        self.step += 1
        return loss.item()

    def _noise_and_timesteps(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drawn for the global batch and sliced: every process keeps the same generator state (so the main
        process's checkpoint fits all) while each gets different noise."""
        from gen.diffusion.training import sample_noise

        world, rank, b = self.acc.num_processes, self.acc.process_index, latents.shape[0]
        full = latents.new_empty((b * world, *latents.shape[1:]))
        noise = sample_noise(full, self.o.noise_offset, self.noise)[rank * b : (rank + 1) * b]
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (b * world,), device=latents.device, generator=self.noise)
        return noise, t[rank * b : (rank + 1) * b]

    def run(self) -> Path:
        o = self.o
        logger.info("process %d of %d on %s, %d images", self.acc.process_index, self.acc.num_processes,
                    self.acc.device, len(self.data))  # fmt: skip
        if self.acc.is_main_process:
            checkpoint.clean_stale(self.out)
        resume = checkpoint.resolve(self.out, o.resume)
        if resume:
            self.restore(resume)
        while self.step < o.max_steps:
            loss = self.train_step()
            if self.step % 10 == 0 or self.step == o.max_steps:
                logger.info("step %d loss %.4f lr %.2e", self.step, loss, self.lr.get_last_lr()[0])
            if o.checkpointing_steps and self.step % o.checkpointing_steps == 0 and self.acc.is_main_process:
                checkpoint.save(self.out, self.step, self.state(), o.checkpoints_total_limit or None)
            if o.save_every and self.step % o.save_every == 0 and self.acc.is_main_process:
                self.save_pipeline(self.out / f"model-{self.step}")
            if (
                o.validation_steps
                and o.validation_prompt
                and self.step % o.validation_steps == 0
                and self.acc.is_main_process
            ):
                self.validate()
        self.acc.wait_for_everyone()
        if self.acc.num_processes > 1:  # every replica must hold the same weights (DDP keeps them in step)
            digest = sum(
                float(p.detach().double().sum()) for p in self.acc.unwrap_model(self.model).parameters()
            )
            logger.info("process %d weight checksum %.12e", self.acc.process_index, digest)
        return self.save_pipeline(self.out / "model") if self.acc.is_main_process else self.out / "model"

    def save_pipeline(self, dest: Path) -> Path:
        model = self.acc.unwrap_model(self.model)
        if self.ema:
            backup = [p.detach().clone() for p in model.parameters()]
            self.ema.copy_to(model)
        try:
            return atomic_folder(dest, lambda tmp: self.pipe.save_pretrained(tmp), overwrite=True)
        finally:
            if self.ema:
                with torch.no_grad():
                    for p, b in zip(model.parameters(), backup, strict=True):
                        p.copy_(b)

    @torch.no_grad()
    def validate(self) -> None:
        from gen.run import contact_sheet

        self.model.eval()
        gens = [torch.Generator().manual_seed(k) for k in range(4)]
        images = self.pipe([self.o.validation_prompt] * 4, generator=gens, num_inference_steps=20).images
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        contact_sheet(images).save(self.out / "samples" / f"step-{self.step:06d}.png")
        self.model.train()


def main(argv: list[str] | None = None) -> Path:
    o = parse_options(Options, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(o.output_dir)
    if not o.data_dir:
        raise SystemExit("--data-dir is required: a folder of images with .txt captions or metadata.jsonl")
    if (out / "model").exists() and not (o.overwrite or o.resume):
        raise SystemExit(f"{out / 'model'} exists; pass --overwrite, or --resume latest to continue")
    save_options(o, out)
    return Trainer(o).run()


if __name__ == "__main__":
    main()

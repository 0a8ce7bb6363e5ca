"""The training loop gen's scripts share: accelerate, one diffusion loss, EMA, caching, checkpoints, validation.

A script (text_to_image, dreambooth) subclasses Trainer and overrides what differs: which parameters train
(`prepare_models`), what a batch holds (`next_batch`) and what is written at the end (`save`). Everything random
(data order, flips, caption dropout, noise, timesteps, VAE sampling) lives in the checkpointed state, so a run
killed at any moment and resumed ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler

from gen.diffusion.training import sample_noise
from gen.files import atomic_folder, atomic_write
from gen.loading.pipeline import load_pipeline
from gen.pipelines.images import scale_latents
from gen.pixels import contact_sheet
from gen.text.encode import embed, encode, pad_chunks
from gen.train import flow, resume
from gen.train.common import (
    EMA,
    TrainError,
    denoiser_loss,
    drop_captions,
    inference_scheduler,
    make_optimizer,
    noise_scheduler,
)

logger = logging.getLogger("gen.train")


@dataclass
class TrainOptions:
    """Options every training script takes; a script's own dataclass adds to them."""

    output_dir: str = "runs/train"
    model: str = field(
        default="", metadata={"help": "pipeline folder to start from (default: the embedded model)"}
    )
    resolution: int = 64
    batch_size: int = 4
    max_steps: int = 100
    learning_rate: float = 1e-4
    lr_scheduler: str = field(default="constant", metadata={"help": "diffusers.optimization name"})
    lr_warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16"})
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes' 8-bit AdamW"})
    train_text_encoder: bool = False
    caption_dropout: float = field(
        default=0.1, metadata={"help": "share of captions replaced by '' (for CFG)"}
    )
    min_snr_gamma: float = field(
        default=0.0, metadata={"help": "min-SNR loss weighting; 0 turns it off, 5 is usual"}
    )
    noise_offset: float = 0.0
    prediction_type: str = field(
        default="", metadata={"help": "epsilon or v_prediction (default: the model's)"}
    )
    zero_terminal_snr: bool = field(
        default=False, metadata={"help": "rescale betas to zero terminal SNR (needs v_prediction)"}
    )
    ema_decay: float = field(default=0.0, metadata={"help": "0 turns EMA off"})
    flip: bool = False
    cache_latents: bool = field(default=False, metadata={"help": "encode each image once (kept in memory)"})
    latent_mode: bool = field(
        default=False,
        metadata={"help": "train on each posterior's mean instead of a sample (VAEs with a wide posterior)"},
    )
    cache_text: bool = field(
        default=False, metadata={"help": "embed each caption once (frozen text encoder)"}
    )
    seed: int = 0
    max_minutes: float = field(
        default=0.0, metadata={"help": "stop (checkpoint and save) after this long; 0: no limit"}
    )
    checkpointing_steps: int = 0
    checkpoints_total_limit: int = 0
    resume: str = field(default="", metadata={"help": "'latest' or a checkpoint folder"})
    validation_steps: int = 0
    validation_prompt: str = ""
    report_to: str = field(default="", metadata={"help": "'tensorboard' logs loss, lr and validation grids"})
    overwrite: bool = False


def _check_report_to(report_to: str) -> None:
    if report_to not in ("", "tensorboard"):
        raise TrainError(f"--report-to {report_to!r}: only 'tensorboard' is supported")
    if report_to:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise TrainError(
                "--report-to tensorboard needs tensorboard, which is not installed (pip install 'gen[train]')"
            ) from None


class Trainer:
    def __init__(self, o: TrainOptions):
        self.o, self.out = o, Path(o.output_dir)
        self.frozen_rows: torch.Tensor | None = None  # token-embedding rows put back after each step
        if o.cache_text and self.text_encoder_trains():
            raise TrainError("--cache-text needs a frozen text encoder, and this run trains it")
        _check_report_to(o.report_to)
        # Fresh weights (a DiT preset, LoRA adapters) are part of the run's determinism.
        torch.manual_seed(o.seed)
        self.acc = Accelerator(
            mixed_precision=o.mixed_precision,
            gradient_accumulation_steps=o.gradient_accumulation_steps,
            cpu=not torch.cuda.is_available(),
            log_with=o.report_to or None,
            project_dir=self.out / "logs",
        )
        # Every part on the accelerator's device: the frozen VAE and text encoder encode there (accelerate's
        # prepare moves only what trains).
        self.pipe = self.load().to(self.acc.device)
        self.flow = getattr(self.pipe, "is_flow", False)  # SD3, Flux: gen.train.flow's objective
        if self.flow:
            flow.check_options(o, self.acc.num_processes)
            self.scheduler = self.pipe.scheduler
        else:
            self.scheduler = noise_scheduler(
                self.pipe.scheduler.config, o.prediction_type, o.zero_terminal_snr
            )
            self.pipe.scheduler = inference_scheduler(
                self.pipe.scheduler, o.prediction_type, o.zero_terminal_snr
            )
        self.pipe.vae.requires_grad_(False)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self.pipe, name, None) is not None:
                getattr(self.pipe, name).requires_grad_(False)
        self.prepare_models()
        self.params = [p for m in self.trained_modules().values() for p in m.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.param_groups(), o.learning_rate, o.use_8bit_adam)
        self.lr = get_scheduler(
            o.lr_scheduler, self.opt, num_warmup_steps=o.lr_warmup_steps, num_training_steps=o.max_steps
        )
        self.ema = EMA(self.params, o.ema_decay) if o.ema_decay else None
        self.rng = random.Random(o.seed)  # data order, flips, caption dropout
        self.noise = torch.Generator(self.acc.device).manual_seed(o.seed)  # noise, timesteps, VAE sampling
        self.step, self.cursors, self.images_seen = 0, {}, 0
        self.latent_cache: dict | None = {} if o.cache_latents else None
        self.text_cache: dict | None = {} if o.cache_text else None
        self.model = self.acc.prepare(self.pipe.denoiser)
        # A trained text encoder is prepared too, so its gradients are averaged across processes like the model's.
        te = self.pipe.text_encoder
        self.text_model = self.acc.prepare(te) if self.text_encoder_trains() else te
        self.opt = self.acc.prepare(self.opt)

    # -- what a script changes ----------------------------------------------------------------------------------------
    def load(self):
        """The pipeline to train (default: --model, or the embedded model)."""
        return load_pipeline(self.o.model or None)

    def prepare_models(self) -> None:
        """Make the parameters that train require grad (default: the whole denoiser, and the text encoder if asked)."""
        self.pipe.denoiser.requires_grad_(True).train()
        if self.o.train_text_encoder:
            self.pipe.text_encoder.requires_grad_(True).train()
        if self.o.gradient_checkpointing:
            self.pipe.denoiser.enable_gradient_checkpointing()

    def text_encoder_trains(self) -> bool:
        return self.o.train_text_encoder

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        mods = {"denoiser": self.pipe.denoiser}
        if self.text_encoder_trains():
            mods["text_encoder"] = self.pipe.text_encoder
        return mods

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups (a script may give some parameters their own learning rate)."""
        return [{"params": self.params}]

    def next_batch(self) -> dict:
        """{"items": [(dataset, index, flip)], "captions": [...], "weights": (B,) or None, optionally
        "pixel_weights": (B, 1, h, w)} for this process."""
        raise NotImplementedError

    def save(self) -> Path:
        return self.save_pipeline(self.out / "model")

    # -- data -----------------------------------------------------------------------------------------------------------
    def take(self, name: str, dataset, n: int) -> list[int]:
        """This process's `n` indices of the next global batch from `dataset`, in a seeded order per epoch."""
        world, rank = self.acc.num_processes, self.acc.process_index
        size = n * world
        epoch, position = self.cursors.get(name, (0, 0))
        if position + size > len(dataset) and position > 0:
            epoch, position = epoch + 1, 0
        order = list(range(len(dataset)))
        random.Random(f"{self.o.seed}/{name}/{epoch}").shuffle(order)
        picks = [order[(position + k) % len(order)] for k in range(size)][rank * n : (rank + 1) * n]
        self.cursors[name] = (epoch, position + size)
        return picks

    def items(self, dataset, indices: list[int]) -> list[tuple]:
        return [(dataset, i, self.o.flip and self.rng.random() < 0.5) for i in indices]

    def dropped(self, captions: list[str]) -> list[str]:
        return drop_captions(captions, self.o.caption_dropout, self.rng)

    @torch.no_grad()
    def latents(self, items: list[tuple]) -> torch.Tensor:
        """VAE latents (B, C, h, w) sampled from each image's posterior; the posteriors are cached if asked."""
        vae, dev = self.pipe.vae, self.acc.device
        cache = self.latent_cache if self.latent_cache is not None else {}
        keys = [(id(ds), i, flip) for ds, i, flip in items]
        missing = [(k, it) for k, it in zip(keys, items, strict=True) if k not in cache]
        if missing:
            x = torch.stack([ds.load(i, flip=flip)["pixel_values"] for _, (ds, i, flip) in missing]).to(dev)
            moments = vae.encode(x).latent_dist.parameters  # (M, 2C, h, w): mean and log-variance
            for (k, _), m in zip(missing, moments, strict=True):
                cache[k] = m
        posterior = DiagonalGaussianDistribution(torch.stack([cache[k] for k in keys]))
        x = posterior.mode() if self.o.latent_mode else posterior.sample(self.noise)  # (B, C, h, w)
        return scale_latents(vae, x)

    def context(self, captions: list[str]) -> torch.Tensor | dict:
        """Caption embeddings (B, L*K, D); with --cache-text each caption is embedded once. SD3 and Flux: their
        transformer's text inputs (gen.train.flow.conditioning)."""
        dev, tokenizer = self.acc.device, self.pipe.tokenizer
        if self.flow:
            with torch.set_grad_enabled(self.text_encoder_trains()):
                return flow.conditioning(self.pipe, captions, dev)
        if self.text_cache is None:
            with torch.set_grad_enabled(self.text_encoder_trains()):
                return encode(tokenizer, self.text_model, captions, dev)
        with torch.no_grad():
            missing = sorted({*captions, ""} - set(self.text_cache))
            if missing:
                rows, self.text_cache[""] = embed(tokenizer, self.text_model, missing, dev)
                self.text_cache.update(zip(missing, rows, strict=True))
        rows, empty = [self.text_cache[c] for c in captions], self.text_cache[""]
        return pad_chunks(rows, max(r.shape[0] for r in rows) // empty.shape[0], empty)

    # -- the loop ---------------------------------------------------------------------------------------------------
    def train_step(self) -> float:
        for _ in range(self.o.gradient_accumulation_steps):
            batch = self.next_batch()
            with self.acc.accumulate(self.model):
                latents = self.latents(batch["items"])
                context = self.context(batch["captions"])
                noise, t = self._noise_and_timesteps(latents)
                with self.acc.autocast():
                    if self.flow:  # t: sigmas
                        loss = flow.flow_loss(
                            self.pipe,
                            self.model,
                            latents,
                            context,
                            noise,
                            t,
                            batch.get("weights"),
                            batch.get("pixel_weights"),
                        )
                    else:
                        loss = denoiser_loss(
                            self.model,
                            self.scheduler,
                            latents,
                            context,
                            min_snr_gamma=self.o.min_snr_gamma,
                            noise=noise,
                            t=t,
                            sample_weights=batch.get("weights"),
                            pixel_weights=batch.get("pixel_weights"),
                        )
                self.acc.backward(loss)
                if self.acc.sync_gradients:
                    self.acc.clip_grad_norm_(self.params, 1.0)
                self.opt.step()  # the prepared optimizer skips these while gradients accumulate
                self.opt.zero_grad(set_to_none=True)
                self.after_optimizer_step()
                if self.acc.sync_gradients:
                    self.lr.step()
            self.images_seen += len(batch["items"]) * self.acc.num_processes
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.step}; stopping (last good checkpoint kept)"
            )
        if self.ema:
            self.ema.update(self.params)
        self.step += 1
        return loss.item()

    def _noise_and_timesteps(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drawn for the global batch and sliced: every process keeps the same generator state (so the main
        process's checkpoint fits all) while each gets different noise."""
        world, rank, b = self.acc.num_processes, self.acc.process_index, latents.shape[0]
        full = latents.new_empty((b * world, *latents.shape[1:]))
        noise = sample_noise(full, self.o.noise_offset, self.noise)[rank * b : (rank + 1) * b]
        if self.flow:  # sigmas, not timesteps
            shift = self.scheduler.config.get("shift", 1.0)
            sigmas = flow.sample_sigmas(b * world, shift, self.noise, latents.device)
            return noise, sigmas[rank * b : (rank + 1) * b].to(latents.dtype)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (b * world,), device=latents.device, generator=self.noise)
        return noise, t[rank * b : (rank + 1) * b]

    def run(self) -> Path:
        o, main = self.o, self.acc.is_main_process
        logger.info("process %d of %d on %s", self.acc.process_index, self.acc.num_processes, self.acc.device)
        if o.report_to:
            self.acc.init_trackers("gen-train", config=dataclasses.asdict(o))
        resume.resume(self)
        started, first = time.perf_counter(), self.step
        while self.step < o.max_steps and not self._out_of_time(started):
            self._after_step(self.train_step())
        self._log_speed(time.perf_counter() - started, self.step - first)
        self.acc.wait_for_everyone()
        if self.acc.num_processes > 1:  # every replica must hold the same weights (DDP keeps them in step)
            digest = sum(float(p.detach().double().sum()) for p in self.params)
            logger.info("process %d weight checksum %.12e", self.acc.process_index, digest)
        result = self.save() if main else self.out
        self.release()
        return result

    def _out_of_time(self, started: float) -> bool:
        """Whether --max-minutes are over; then a checkpoint (if checkpointing), so a later run with more time
        continues from here."""
        o = self.o
        if not (o.max_minutes and time.perf_counter() - started > o.max_minutes * 60):
            return False
        logger.info("time budget of %.1f min reached at step %d", o.max_minutes, self.step)
        if self.acc.is_main_process and o.checkpointing_steps:
            resume.save(self)
        return True

    def _after_step(self, loss: float) -> None:
        """Logging, the checkpoint, the script's every_step and validation, each on its own schedule."""
        o, main = self.o, self.acc.is_main_process
        if self.step % 10 == 0 or self.step == o.max_steps:
            logger.info("step %d loss %.4f lr %.2e", self.step, loss, self.lr.get_last_lr()[0])
        if o.report_to:
            self.acc.log({"loss": loss, "lr": self.lr.get_last_lr()[0]}, step=self.step)
        if o.checkpointing_steps and self.step % o.checkpointing_steps == 0 and main:
            resume.save(self)
        self.every_step()
        if o.validation_steps and o.validation_prompt and self.step % o.validation_steps == 0 and main:
            self.validate()

    def _log_speed(self, seconds: float, steps: int) -> None:
        if steps > 0:
            images = self.images_seen
            logger.info(
                "%d steps, %d images in %.1f s: %.1f images/s", steps, images, seconds, images / seconds
            )

    def release(self) -> None:
        """Tear down in step: every process waits for the main one to finish writing, then drops its
        distributed wrappers while the process group still lives (a DDP wrapper freed after the group was
        destroyed can hang at exit), then ends the trackers and the group."""
        self.acc.wait_for_everyone()
        self.model, self.text_model = self.pipe.denoiser, self.pipe.text_encoder
        self.acc.free_memory()
        self.acc.end_training()

    def learn_tokens(self, ids: list[int]) -> None:
        """Only these rows of the token-embedding table learn (pivotal tuning, new words); prompts without them
        encode as before. The other rows are put back after every step (AdamW's weight decay moves every row)."""
        table = self.pipe.text_encoder.get_input_embeddings().weight
        table.requires_grad_(True)
        self.frozen_rows = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
        self.frozen_rows[ids] = False
        self.frozen_table = table.detach().clone()
        self.pipe.text_encoder.train()

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step: puts back the token embeddings that must not move."""
        if self.frozen_rows is not None:
            table = self.pipe.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                table[self.frozen_rows] = self.frozen_table[self.frozen_rows]

    def every_step(self) -> None:
        """Called after each step (text_to_image writes --save-every folders here)."""

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights in place of the live ones for the duration (saving, validation)."""
        if not self.ema:
            yield
            return
        backup = [p.detach().clone() for p in self.params]
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    p.copy_(b)

    def save_pipeline(self, dest: Path) -> Path:
        with self.ema_weights():
            return atomic_folder(dest, lambda tmp: self.pipe.save_pretrained(tmp), overwrite=True)

    @torch.no_grad()
    def validate(self) -> None:
        self.pipe.denoiser.eval()
        with self.ema_weights():
            gens = [torch.Generator().manual_seed(k) for k in range(4)]
            images = self.pipe([self.o.validation_prompt] * 4, generator=gens, num_inference_steps=20).images
        self.pipe.denoiser.train()
        grid = contact_sheet(images)
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        with atomic_write(self.out / "samples" / f"step-{self.step:06d}.png") as tmp:
            grid.save(tmp, format="PNG")
        if self.o.report_to == "tensorboard":
            writer = self.acc.get_tracker("tensorboard", unwrap=True)
            writer.add_image("validation", np.asarray(grid), self.step, dataformats="HWC")

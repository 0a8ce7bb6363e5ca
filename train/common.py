"""Pieces every training script shares: options as a dataclass turned into flags, the diffusion loss step,
caption dropout, EMA, the optimizer and noise schedule. (Atomic file and folder writes are gen.files.)"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import random
import typing
from pathlib import Path

import torch

from gen.diffusion.training import diffusion_loss, min_snr_weights, sample_noise, training_target
from gen.files import atomic_write_text

logger = logging.getLogger(__name__)


class TrainError(ValueError):
    """An option or input a run cannot work with, said in one line. The library raises it; a script's main()
    ends with it (exit_on_train_error), as the command-line user has always seen it."""


def exit_on_train_error(main):
    """For a script's main(): a TrainError ends it as SystemExit(message), which Python prints as that one line
    with exit status 1. Any other error keeps its traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except TrainError as e:
            raise SystemExit(str(e)) from None

    return run


# -- options ---------------------------------------------------------------------------------------------------
def options_parser(cls: type, description: str = "") -> argparse.ArgumentParser:
    """argparse flags from a dataclass: field `learning_rate` -> `--learning-rate`; bools get `--no-…` too.

    `--config FILE.json` supplies defaults; flags given on the command line win.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=None, help="JSON file of options (flags override it)")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        help_text = field.metadata.get("help", "")
        if field.default is not None:  # a None default is described by the help itself
            help_text += " (default: %(default)s)"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text
            )
            continue
        parser.add_argument(flag, type=_flag_type(kind), default=field.default, help=help_text)
    return parser


def _flag_type(kind):
    # `str | None` -> str; plain types stay as they are.
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def parse_options(cls: type, argv: list[str] | None = None, description: str = ""):
    parser = options_parser(cls, description)
    args = parser.parse_args(argv)
    if args.config is not None:
        if not args.config.is_file():
            parser.error(f"--config {args.config}: no such file")
        given = json.loads(args.config.read_text())
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            parser.error(f"--config {args.config}: unknown options {sorted(unknown)}")
        parser.set_defaults(**given)
        args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**values)


def save_options(options, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(options).items()}
    atomic_write_text(folder / "train_config.json", json.dumps(data, indent=2))


# -- the diffusion training step ---------------------------------------------------------------------------------
def drop_captions(captions: list[str], probability: float, rng: random.Random) -> list[str]:
    """Replace captions with "" at random, so the model also learns the unconditional branch CFG needs."""
    return ["" if rng.random() < probability else c for c in captions]


def denoiser_loss(
    denoiser: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,  # (B, C, h, w), already scaled by the VAE's scaling_factor
    context: torch.Tensor,  # (B, L, D_text)
    min_snr_gamma: float = 0.0,
    noise_offset: float = 0.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,  # (B, C, h, w) drawn by the caller, e.g. its slice of a global batch's
    t: torch.Tensor | None = None,  # (B,)
    sample_weights: torch.Tensor | None = None,  # (B,), e.g. DreamBooth's prior-loss weight on class images
    pixel_weights: torch.Tensor | None = None,  # (B, 1, h, w), e.g. more weight on an object
) -> torch.Tensor:
    """Noise the latents at random timesteps, predict, and return the (optionally min-SNR weighted) loss."""
    b = latents.shape[0]
    if noise is None:
        noise = sample_noise(latents, noise_offset, generator)
    if t is None:
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (b,), device=latents.device, generator=generator
        )
    x_t = scheduler.add_noise(latents, noise, t)  # (B, C, h, w)
    pred = denoiser(x_t, t, encoder_hidden_states=context, return_dict=False)[0]
    target = training_target(scheduler, latents, noise, t)
    weights = min_snr_weights(scheduler, t, min_snr_gamma) if min_snr_gamma > 0 else None
    if sample_weights is not None:
        weights = sample_weights if weights is None else weights * sample_weights
    return diffusion_loss(pred, target, weights, pixel_weights)


class EMA:
    """Exponential moving average of parameters (the weights that get shipped): a whole model's, or only the
    trainable ones, e.g. LoRA adapters."""

    def __init__(
        self, params: torch.nn.Module | list[torch.nn.Parameter], decay: float = 0.999, warmup: bool = True
    ):
        self.decay, self.warmup, self.steps = decay, warmup, 0
        self.shadow = [p.detach().clone().float() for p in _params(params)]

    @torch.no_grad()
    def update(self, params: torch.nn.Module | list[torch.nn.Parameter]) -> None:
        self.steps += 1
        # Warm-up (1 + n) / (10 + n) lets early, fast-changing weights through instead of the random init.
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps)) if self.warmup else self.decay
        for s, p in zip(self.shadow, _params(params), strict=True):
            s.lerp_(p.detach().float(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, params: torch.nn.Module | list[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, _params(params), strict=True):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.steps = state["decay"], state["steps"]
        self.shadow = [s.clone() for s in state["shadow"]]


def _params(params) -> list[torch.nn.Parameter]:
    return list(params.parameters()) if isinstance(params, torch.nn.Module) else list(params)


# -- optimizer and noise schedule --------------------------------------------------------------------------------
def make_optimizer(params: list, lr: float, use_8bit: bool = False, weight_decay: float = 1e-2):
    """AdamW; with use_8bit, bitsandbytes' 8-bit AdamW (optimizer state in 8 bits: ~75 % less of its memory)."""
    if not use_8bit:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TrainError(
            "--use-8bit-adam needs bitsandbytes, which is not installed (pip install bitsandbytes)"
        ) from None
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def noise_scheduler(config, prediction_type: str = "", zero_terminal_snr: bool = False):
    """The DDPM schedule training noises with, from a pipeline's scheduler config.

    zero_terminal_snr rescales the betas so the last timestep is pure noise (Lin et al., "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", 2024); it needs v-prediction, since predicting the noise from pure
    noise teaches nothing.
    """
    from diffusers import DDPMScheduler

    if prediction_type not in ("", "epsilon", "v_prediction", "sample"):
        raise TrainError(f"--prediction-type {prediction_type!r}: choose epsilon, v_prediction or sample")
    changes = {"prediction_type": prediction_type} if prediction_type else {}
    if zero_terminal_snr:
        kind = prediction_type or config.get("prediction_type", "epsilon")
        if kind != "v_prediction":
            raise TrainError(
                f"--zero-terminal-snr needs v-prediction; this model predicts {kind!r} (add --prediction-type v_prediction)"
            )
        changes["rescale_betas_zero_snr"] = True
    return DDPMScheduler.from_config(config, **changes)


def inference_scheduler(scheduler, prediction_type: str = "", zero_terminal_snr: bool = False):
    """The pipeline's own sampler, told what training changed, so the saved model samples as it was trained."""
    changes = {"prediction_type": prediction_type} if prediction_type else {}
    if zero_terminal_snr:  # the paper's sampling fix: start from the last timestep
        changes |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return type(scheduler).from_config(scheduler.config, **changes) if changes else scheduler

"""Training targets and loss weights for noise-prediction diffusion, written once for every training script.

Parameterisations follow diffusers' schedulers: "epsilon" (Ho et al. 2020), "v_prediction" (Salimans & Ho 2022),
"sample". Min-SNR-γ weighting: Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy" (2023).
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser should predict for x_t = add_noise(x0, noise, t), by the scheduler's prediction_type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"prediction_type={kind!r} must be 'epsilon', 'v_prediction' or 'sample'")


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights min(SNR, γ) / SNR, adjusted to the parameterisation's own loss scale: (B,)."""
    s = compute_snr(scheduler, t).float()  # alpha_bar / (1 - alpha_bar), (B,)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / s
    if kind == "v_prediction":
        return clipped / (s + 1)
    return clipped  # "sample"


def diffusion_loss(
    pred: torch.Tensor,  # (B, C, h, w)
    target: torch.Tensor,  # (B, C, h, w)
    weights: torch.Tensor | None = None,  # (B,)
    pixel_weights: torch.Tensor | None = None,  # (B, 1, h, w), positive
) -> torch.Tensor:
    """Mean squared error per sample, optionally weighted, averaged over the batch. `pixel_weights` makes some
    positions count more within each sample; each sample's weights are normalised to mean 1, so they move the
    emphasis rather than multiply the loss (its value still rises where the error gathers in the heavier positions).
    All weights must be above 0."""
    error = (pred.float() - target.float()).square()
    if pixel_weights is not None:
        wanted = (pred.shape[0], 1, *pred.shape[2:])
        if tuple(pixel_weights.shape) != wanted:
            raise ValueError(f"pixel_weights of shape {tuple(pixel_weights.shape)}: must be {wanted}")
        w = pixel_weights.float()
        error = error * (w / w.mean(dim=tuple(range(1, w.ndim)), keepdim=True))
    per_sample = error.mean(dim=tuple(range(1, pred.ndim)))  # (B,)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def sample_noise(
    latents: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise, plus an optional per-channel offset (Guttenberg 2023) that lets models learn dark/bright."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset:
        shape = (latents.shape[0], latents.shape[1], 1, 1)
        noise = noise + offset * torch.randn(
            shape, generator=generator, device=latents.device, dtype=latents.dtype
        )
    return noise

"""Classifier-free guidance: the one place the CFG formula lives.

Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022); rescale from Lin et al., "Common Diffusion Noise
Schedules and Sample Steps are Flawed" (2023), section 3.4.
"""

from __future__ import annotations

import torch


def guidance(
    pred_uncond: torch.Tensor,  # (B, C, h, w)
    pred_text: torch.Tensor,  # (B, C, h, w)
    scale: float,
    rescale: float = 0.0,
) -> torch.Tensor:
    """Combine the unconditional and text-conditioned predictions; optionally rescale to the text branch's std.

    `rescale` in [0, 1] blends the guided prediction with a copy rescaled to the conditional prediction's
    per-sample standard deviation, which undoes the over-exposure large scales cause.
    """
    pred = pred_uncond + scale * (pred_text - pred_uncond)
    if rescale > 0:
        dims = list(range(1, pred.ndim))
        std_text = pred_text.std(dim=dims, keepdim=True)
        std_cfg = pred.std(dim=dims, keepdim=True)
        pred = rescale * (pred * (std_text / std_cfg)) + (1 - rescale) * pred
    return pred

"""Euler ancestral for flow-matching models (SD3, Flux), as ComfyUI and Forge run "Euler a" on them.

Why our own: diffusers has no such sampler. Its FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) jumps to
the predicted clean latents and re-noises them to the next sigma with fresh noise alone, which is a different
sampler (more noise, softer images) from the one A1111-family users mean by "Euler a". ComfyUI's
sample_euler_ancestral_RF (k-diffusion's ancestral step rewritten for x_t = (1 - s) x0 + s noise) steps down
to sigma_down with Euler, then scales up and adds noise to land on the next sigma's noise level; with eta = 1,
sigma_down = s_next^2 / s. This scheduler is that step on diffusers' FlowMatchEuler schedule (same timesteps,
shift, dynamic shifting, img2img noising), drawing its noise from the call's generator so a seed reproduces.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


def rf_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float, float]:
    """(sigma_down, renoise, alpha_ratio) of one rectified-flow ancestral step from `sigma` to `sigma_next`:
    Euler to sigma_down, then x * alpha_ratio + noise * renoise has noise level sigma_next exactly."""
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    ratio = alpha_next / alpha_down
    renoise = max(sigma_next**2 - sigma_down**2 * ratio**2, 0.0) ** 0.5
    return sigma_down, renoise, ratio


class FlowMatchEulerAncestralScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEuler's schedule with ComfyUI's Euler-ancestral step (eta 1, noise scale 1)."""

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """FlowMatchEuler's step signature; the churn, noise scale and per-token timesteps it takes are not part
        of ComfyUI's Euler a and are refused rather than ignored."""
        if s_churn != 0.0 or s_noise != 1.0 or per_token_timesteps is not None:
            raise ValueError("Euler a on flow models takes no s_churn, s_noise or per_token_timesteps")
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError("pass one of scheduler.timesteps to step(), not an integer index")
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma = float(self.sigmas[self.step_index])
        sigma_next = float(self.sigmas[self.step_index + 1])
        denoised = sample - sigma * model_output.to(torch.float32)  # velocity -> the predicted clean latents
        if sigma_next == 0:
            prev = denoised
        else:
            sigma_down, renoise, ratio = rf_ancestral_step(sigma, sigma_next)
            prev = (sigma_down / sigma) * sample + (1 - sigma_down / sigma) * denoised
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev = ratio * prev + renoise * noise
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

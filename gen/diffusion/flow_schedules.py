"""ComfyUI's "simple" and "beta" schedules for flow-matching models (SD3, Flux), the two that Flux and SD3 users
pick in ComfyUI and Forge ("Euler" + "Simple" / "Beta").

Why our own: diffusers' FlowMatchEuler has `use_beta_sigmas`, but it spaces the beta quantiles linearly between
the shifted end sigmas (and ends on sigma_min), where ComfyUI picks them on the model's table of timesteps and
shifts after. ComfyUI's schedules choose *where on the timestep grid* the steps fall, as fractions t of the
model's timesteps (its ModelSamplingDiscreteFlow table is sigma(t) for t = 1/N ... N/N); the model's shift then
maps t to sigma. So here each schedule gives those unshifted t, and diffusers' FlowMatchEuler set_timesteps
shifts them as it shifts any custom sigmas: the static shift (SD3's and SD3.5's 3.0, as ComfyUI's) or, where the
scheduler shifts dynamically (Flux), the image size's `mu` (ComfyUI's ModelSamplingFlux node computes the same from
the size). ComfyUI's tables have 1000 entries for SD3 and 10,000 for Flux; gen's pipelines pass theirs.

simple (comfy.samplers.simple_scheduler): every N/steps-th entry of the table from the top.
beta (comfy.samplers.beta_scheduler, Lee et al. 2024, arXiv:2407.12173): the table's entries at the Beta(0.6, 0.6)
quantiles of 1 - k/steps, rounded, repeats dropped (so a few steps fewer at high step counts on a short table).
"""

from __future__ import annotations

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler

from gen.diffusion.flow_ancestral import FlowMatchEulerAncestralScheduler

SCHEDULES = ("simple", "beta")
BETA = (0.6, 0.6)  # ComfyUI's alpha and beta


def schedule_positions(schedule: str, steps: int, train_timesteps: int = 1000) -> list[float]:
    """The unshifted t in (0, 1] of each step, descending, on a table of `train_timesteps` entries (t = i / N)."""
    if steps < 1:
        raise ValueError(f"steps {steps} must be at least 1")
    n = train_timesteps
    if schedule == "simple":
        every = n / steps  # as ComfyUI computes it (k * every, not k * n / steps: they round apart)
        indices = [n - 1 - int(k * every) for k in range(steps)]
    elif schedule == "beta":
        import scipy.stats  # a dependency of gen (LMS needs it too); here only when asked for

        quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
        rounded = np.rint(scipy.stats.beta.ppf(quantiles, *BETA) * (n - 1)).astype(int)
        indices = [int(i) for k, i in enumerate(rounded) if k == 0 or i != rounded[k - 1]]
    else:
        raise ValueError(f"schedule {schedule!r} must be one of {list(SCHEDULES)}")
    return [(i + 1) / n for i in indices]


class _Scheduled:
    """A FlowMatch scheduler whose steps, when the caller gives no sigmas of its own, fall where `schedule` puts
    them (shifted by the scheduler as usual)."""

    schedule = ""

    def schedule_sigmas(self, num_inference_steps: int, table: int | None = None) -> list[float]:
        """The unshifted sigmas of the schedule, on a table of `table` entries (ComfyUI's for the model family,
        which the pipeline knows: SD3's 1000, Flux's 10,000; default: the scheduler's training timesteps)."""
        return schedule_positions(
            self.schedule, num_inference_steps, table or self.config.num_train_timesteps
        )

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if sigmas is None and timesteps is None:
            sigmas = self.schedule_sigmas(num_inference_steps)
            num_inference_steps = None  # beta may drop repeats: the schedule's length decides
        return super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)


class FlowMatchEulerSimpleScheduler(_Scheduled, FlowMatchEulerDiscreteScheduler):
    schedule = "simple"


class FlowMatchEulerBetaScheduler(_Scheduled, FlowMatchEulerDiscreteScheduler):
    schedule = "beta"


class FlowMatchEulerAncestralSimpleScheduler(_Scheduled, FlowMatchEulerAncestralScheduler):
    schedule = "simple"


class FlowMatchEulerAncestralBetaScheduler(_Scheduled, FlowMatchEulerAncestralScheduler):
    schedule = "beta"


SCHEDULED = {
    cls.__name__: cls
    for cls in (
        FlowMatchEulerSimpleScheduler,
        FlowMatchEulerBetaScheduler,
        FlowMatchEulerAncestralSimpleScheduler,
        FlowMatchEulerAncestralBetaScheduler,
    )
}

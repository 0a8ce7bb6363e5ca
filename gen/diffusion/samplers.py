"""Samplers by the names AUTOMATIC1111 and ComfyUI users know, mapped to diffusers schedulers.

The mapping follows diffusers' own table of A1111 equivalents. Each scheduler is built from the model's scheduler
config, so training-time settings (prediction type, betas, timestep count) are kept; only the sampler's own
options change.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampler:
    cls: str  # diffusers scheduler class name
    description: str
    kwargs: dict = field(default_factory=dict)
    a1111: str = ""  # the name A1111 writes in PNG metadata


SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler(
        "EulerDiscreteScheduler", "Euler: first-order ODE solver, a solid default", a1111="Euler"
    ),
    "euler_a": Sampler(
        "EulerAncestralDiscreteScheduler",
        "Euler ancestral: adds fresh noise each step (varied, never converges)",
        a1111="Euler a",
    ),
    "heun": Sampler("HeunDiscreteScheduler", "Heun: second order, two model calls per step", a1111="Heun"),
    "dpm2": Sampler("KDPM2DiscreteScheduler", "DPM2: second order, two model calls per step", a1111="DPM2"),
    "dpm2_a": Sampler("KDPM2AncestralDiscreteScheduler", "DPM2 ancestral", a1111="DPM2 a"),
    "lms": Sampler("LMSDiscreteScheduler", "LMS: linear multistep", a1111="LMS"),
    "ddim": Sampler("DDIMScheduler", "DDIM: deterministic, the classic", a1111="DDIM"),
    "pndm": Sampler("PNDMScheduler", "PNDM / PLMS: pseudo linear multistep", a1111="PLMS"),
    "ddpm": Sampler("DDPMScheduler", "DDPM: the original ancestral sampler, needs many steps", a1111="DDPM"),
    "unipc": Sampler(
        "UniPCMultistepScheduler", "UniPC: fast predictor-corrector, good at 10-20 steps", a1111="UniPC"
    ),
    "dpm++_2m": Sampler(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M: fast and sharp at 20 steps",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        "DPM++ 2M",
    ),
    "dpm++_2m_karras": Sampler(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M with Karras sigmas",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "dpm++_2m_sde": Sampler(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M SDE: stochastic variant",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        "DPM++ 2M SDE",
    ),
    "dpm++_2m_sde_karras": Sampler(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M SDE with Karras sigmas",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M SDE Karras",
    ),
    "dpm++_sde": Sampler(
        "DPMSolverSinglestepScheduler",
        "DPM++ SDE (single-step solver, as diffusers maps it)",
        {"use_karras_sigmas": False},
        "DPM++ SDE",
    ),
    "dpm++_sde_karras": Sampler(
        "DPMSolverSinglestepScheduler",
        "DPM++ SDE with Karras sigmas",
        {"use_karras_sigmas": True},
        "DPM++ SDE Karras",
    ),
    "lcm": Sampler(
        "LCMScheduler", "LCM: 2-8 steps, only for LCM-distilled models (others give poor images)", a1111="LCM"
    ),
}


def unknown_sampler(name: str) -> ValueError:
    close = difflib.get_close_matches(name, SAMPLERS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown sampler {name!r}{hint}; choose one of: {', '.join(SAMPLERS)}")


def make_scheduler(name: str, config):
    """A diffusers scheduler for `name`, built from a model's scheduler config (keeps betas, prediction type)."""
    if name not in SAMPLERS:
        raise unknown_sampler(name)
    spec = SAMPLERS[name]
    import diffusers  # here, not at import: `gen samplers` and argument checks must not load torch

    cls = getattr(diffusers, spec.cls)
    return cls.from_config(config, **spec.kwargs)


def sampler_name(scheduler) -> str:
    """The gen name of a scheduler instance (best match by class and options), for metadata."""
    cfg = scheduler.config
    for name, spec in SAMPLERS.items():
        if type(scheduler).__name__ == spec.cls and all(cfg.get(k) == v for k, v in spec.kwargs.items()):
            return name
    return type(scheduler).__name__

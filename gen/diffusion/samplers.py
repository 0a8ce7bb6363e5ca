"""Samplers by the names AUTOMATIC1111 and ComfyUI users know, mapped to diffusers schedulers.

The mapping follows diffusers' own table of A1111 equivalents. Each scheduler is built from the model's scheduler
config, so training-time settings (prediction type, betas, timestep count) are kept; only the sampler's own
options change.

Flow-matching models (SD3, Flux: their scheduler config is a FlowMatch one) take the same names where the
sampler is defined for a velocity model, as Forge and ComfyUI offer them: Euler and Heun are diffusers' FlowMatch
schedulers, DPM++ 2M and UniPC diffusers' multistep solvers on flow sigmas (`use_flow_sigmas`, the model's shift),
Euler a gen's FlowMatchEulerAncestralScheduler (ComfyUI's rectified-flow ancestral step; diffusers has none);
`*_simple` / `*_beta` the Euler samplers on ComfyUI's simple and beta schedules (gen.diffusion.flow_schedules), which
Forge and A1111 clients ask for as a schedule type ("Simple", "Beta") beside the sampler name.
The other ancestral samplers, Karras, LMS, DDIM/PNDM/DDPM and LCM samplers are defined on a noise-prediction schedule and are
refused for these models rather than run on a schedule they were not made for.
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
    flow: str = ""  # the diffusers scheduler class for flow-matching models ("": not defined for them)
    flow_kwargs: dict = field(default_factory=dict)


SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler(
        "EulerDiscreteScheduler",
        "Euler: first-order ODE solver, a solid default",
        a1111="Euler",
        flow="FlowMatchEulerDiscreteScheduler",
    ),
    "euler_a": Sampler(
        "EulerAncestralDiscreteScheduler",
        "Euler ancestral: adds fresh noise each step (varied, never converges)",
        a1111="Euler a",
        flow="FlowMatchEulerAncestralScheduler",  # gen's (flow_ancestral.py): ComfyUI's RF ancestral step
    ),
    "heun": Sampler(
        "HeunDiscreteScheduler",
        "Heun: second order, two model calls per step",
        a1111="Heun",
        flow="FlowMatchHeunDiscreteScheduler",
    ),
    # ComfyUI's simple and beta schedules (gen.diffusion.flow_schedules), defined here for flow models only
    "euler_simple": Sampler(
        "",
        "Euler on ComfyUI's simple schedule",
        a1111="Euler Simple",
        flow="FlowMatchEulerSimpleScheduler",
    ),
    "euler_beta": Sampler(
        "",
        "Euler on ComfyUI's beta schedule: more steps at both ends",
        a1111="Euler Beta",
        flow="FlowMatchEulerBetaScheduler",
    ),
    "euler_a_simple": Sampler(
        "",
        "Euler ancestral on ComfyUI's simple schedule",
        a1111="Euler a Simple",
        flow="FlowMatchEulerAncestralSimpleScheduler",
    ),
    "euler_a_beta": Sampler(
        "",
        "Euler ancestral on ComfyUI's beta schedule",
        a1111="Euler a Beta",
        flow="FlowMatchEulerAncestralBetaScheduler",
    ),
    "dpm2": Sampler("KDPM2DiscreteScheduler", "DPM2: second order, two model calls per step", a1111="DPM2"),
    "dpm2_a": Sampler("KDPM2AncestralDiscreteScheduler", "DPM2 ancestral", a1111="DPM2 a"),
    "lms": Sampler("LMSDiscreteScheduler", "LMS: linear multistep", a1111="LMS"),
    "ddim": Sampler("DDIMScheduler", "DDIM: deterministic, the classic", a1111="DDIM"),
    "pndm": Sampler("PNDMScheduler", "PNDM / PLMS: pseudo linear multistep", a1111="PLMS"),
    "ddpm": Sampler("DDPMScheduler", "DDPM: the original ancestral sampler, needs many steps", a1111="DDPM"),
    "unipc": Sampler(
        "UniPCMultistepScheduler",
        "UniPC: fast predictor-corrector, good at 10-20 steps",
        a1111="UniPC",
        flow="UniPCMultistepScheduler",
        flow_kwargs={"use_flow_sigmas": True, "prediction_type": "flow_prediction"},
    ),
    "dpm++_2m": Sampler(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M: fast and sharp at 20 steps",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        "DPM++ 2M",
        flow="DPMSolverMultistepScheduler",
        flow_kwargs={
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "use_flow_sigmas": True,
            "prediction_type": "flow_prediction",
        },
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


def is_flow(config) -> bool:
    """Is this scheduler config a flow-matching model's (SD3, Flux): a FlowMatch scheduler's (a shift and no betas:
    an instance's config does not name its class), or a solver on flow sigmas?"""
    flow_match = "shift" in config and "beta_schedule" not in config
    return (
        flow_match
        or bool(config.get("use_flow_sigmas"))
        or config.get("prediction_type") == "flow_prediction"
    )


def samplers_for(config) -> list[str]:
    """The sampler names a model with this scheduler config can run (flow models: those defined for them)."""
    flow = is_flow(config)
    return [name for name, spec in SAMPLERS.items() if (spec.flow if flow else spec.cls)]


def unknown_sampler(name: str) -> ValueError:
    close = difflib.get_close_matches(name, SAMPLERS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown sampler {name!r}{hint}; choose one of: {', '.join(SAMPLERS)}")


def _flow_class(name: str) -> type:
    """A diffusers scheduler class, or gen's own where diffusers has none (Euler ancestral on flow sigmas)."""
    import diffusers

    if name == "FlowMatchEulerAncestralScheduler":
        from gen.diffusion.flow_ancestral import FlowMatchEulerAncestralScheduler

        return FlowMatchEulerAncestralScheduler
    from gen.diffusion.flow_schedules import SCHEDULED

    return SCHEDULED[name] if name in SCHEDULED else getattr(diffusers, name)


def make_scheduler(name: str, config):
    """A diffusers scheduler for `name`, built from a model's scheduler config (keeps betas, prediction type)."""
    if name not in SAMPLERS:
        raise unknown_sampler(name)
    spec = SAMPLERS[name]
    import diffusers  # here, not at import: `gen samplers` and argument checks must not load torch

    if is_flow(config):
        if not spec.flow:
            raise ValueError(
                f"sampler {name!r} is not defined for flow-matching models (SD3, Flux); choose one of:"
                f" {', '.join(samplers_for(config))}"
            )
        cls = _flow_class(spec.flow)
        # The multistep solvers call the model's shift flow_shift, and take dynamic shifting's mu from the call.
        shift = {"flow_shift": config.get("shift", 1.0)} if spec.flow_kwargs.get("use_flow_sigmas") else {}
        return cls.from_config(config, **shift, **spec.flow_kwargs)
    if not spec.cls:
        raise ValueError(
            f"sampler {name!r} is defined here for flow-matching models (SD3, Flux) only; for this model choose"
            f" one of: {', '.join(samplers_for(config))}"
        )
    cls = getattr(diffusers, spec.cls)
    return cls.from_config(config, **spec.kwargs)


def sampler_name(scheduler) -> str:
    """The gen name of a scheduler instance (best match by class and options), for metadata."""
    cfg, cls = scheduler.config, type(scheduler).__name__
    flow = is_flow(cfg)
    for name, spec in SAMPLERS.items():
        want, kwargs = (spec.flow, spec.flow_kwargs) if flow else (spec.cls, spec.kwargs)
        if cls == want and all(cfg.get(k) == v for k, v in kwargs.items()):
            return name
    return cls

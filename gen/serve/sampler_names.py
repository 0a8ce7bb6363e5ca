"""A1111's sampler and scheduler names for gen's samplers (gen.diffusion.samplers holds the mapping to diffusers).

A1111 1.9+ names a sampler and, apart, a noise schedule ("DPM++ 2M" + "Karras"); older clients send one name
("DPM++ 2M Karras") or a k-diffusion alias ("k_dpmpp_2m_ka"). All are accepted, case-insensitively.
"""

from __future__ import annotations

from gen.diffusion.samplers import SAMPLERS

# k-diffusion function aliases A1111 lists beside each name (modules/sd_samplers_kdiffusion.py).
ALIASES = {
    "euler": ["k_euler"],
    "euler_a": ["k_euler_a", "k_euler_ancestral"],
    "heun": ["k_heun"],
    "dpm2": ["k_dpm_2"],
    "dpm2_a": ["k_dpm_2_a"],
    "lms": ["k_lms"],
    "pndm": ["plms"],
    "dpm++_2m": ["k_dpmpp_2m"],
    "dpm++_2m_karras": ["k_dpmpp_2m_ka"],
    "dpm++_2m_sde": ["k_dpmpp_2m_sde"],
    "dpm++_2m_sde_karras": ["k_dpmpp_2m_sde_ka"],
    "dpm++_sde": ["k_dpmpp_sde"],
    "dpm++_sde_karras": ["k_dpmpp_sde_ka"],
    "lcm": ["k_lcm"],
}
SCHEDULERS = [  # what A1111's "scheduler" field may say here: the sampler's own spacing, Karras sigmas, or
    # ComfyUI's simple and beta schedules (flow models)
    {
        "name": "automatic",
        "label": "Automatic",
        "aliases": None,
        "default_rho": -1.0,
        "need_inner_model": False,
    },
    {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
    {"name": "simple", "label": "Simple", "aliases": None, "default_rho": -1.0, "need_inner_model": True},
    {"name": "beta", "label": "Beta", "aliases": None, "default_rho": -1.0, "need_inner_model": True},
]
KARRAS = "_karras"
SCHEDULE_SUFFIX = {"karras": KARRAS, "simple": "_simple", "beta": "_beta"}  # gen's names: sampler + suffix


def _lookup() -> dict[str, str]:
    table = {}
    for name, spec in SAMPLERS.items():
        for key in (name, spec.a1111, *ALIASES.get(name, [])):
            table[key.lower()] = name
    return table


_TABLE = _lookup()


def a1111_samplers() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111's name, then gen's name and the k-diffusion aliases."""
    return [
        {
            "name": spec.a1111,
            "aliases": [name, *ALIASES.get(name, [])],
            "options": next(({"scheduler": k} for k, x in SCHEDULE_SUFFIX.items() if name.endswith(x)), {}),
        }
        for name, spec in SAMPLERS.items()
    ]


def resolve(sampler: str | None, scheduler: str | None = None) -> str | None:
    """gen's sampler name for an A1111 (sampler, scheduler) pair; None: the model's own scheduler."""
    name = None
    if sampler is not None and sampler.strip():
        name = _TABLE.get(sampler.strip().lower())
        if name is None:
            allowed = ", ".join(s.a1111 for s in SAMPLERS.values())
            raise ValueError(f"unknown sampler {sampler!r}; choose one of: {allowed} (or gen's names)")
    schedule = (scheduler or "automatic").strip().lower()
    if schedule == "automatic":
        return name
    if schedule not in SCHEDULE_SUFFIX:
        labels = ", ".join(entry["label"] for entry in SCHEDULERS)
        raise ValueError(f"scheduler {scheduler!r} is not supported here; choose one of: {labels}")
    label = schedule.capitalize()
    if name is None:
        raise ValueError(f"scheduler {label!r} needs a sampler_name (e.g. 'DPM++ 2M' or 'Euler')")
    suffix = SCHEDULE_SUFFIX[schedule]
    if name.endswith(suffix):
        return name
    if name + suffix in SAMPLERS:
        return name + suffix
    with_it = ", ".join(s.a1111 for n, s in SAMPLERS.items() if n.endswith(suffix))
    raise ValueError(f"sampler {sampler!r} has no {label} variant; those with one: {with_it}")

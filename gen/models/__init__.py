"""Networks: our text-conditioned DiT (diffusers' UNet2DConditionModel is used as is); the shapes judge (judge.py,
imported by name: it is not loaded with the DiT)."""

from gen.models.dit import DIT_PRESETS, DiT, dit_from_preset

__all__ = ["DIT_PRESETS", "DiT", "dit_from_preset"]

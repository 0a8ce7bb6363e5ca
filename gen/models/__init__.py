"""Networks: our text-conditioned DiT (diffusers' UNet2DConditionModel is used as is)."""

from gen.models.dit import DIT_PRESETS, DiT, dit_from_preset

__all__ = ["DIT_PRESETS", "DiT", "dit_from_preset"]

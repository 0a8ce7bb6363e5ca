"""Pure math on tensors, no model code: guidance, training targets and loss weights."""

from gen.diffusion.guidance import guidance

__all__ = ["guidance"]

"""One seed through three samplers: python examples/swap_scheduler.py [MODEL_DIR] [OUT_PREFIX]"""

import sys

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

import gen

pipe = gen.load_pipeline(sys.argv[1] if len(sys.argv) > 1 else None)
prefix = sys.argv[2] if len(sys.argv) > 2 else "sampler"
for scheduler_cls in (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler):
    # from_config keeps the model's training-time settings (betas, prediction type).
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(42)
    image = pipe("a small yellow star on a black background", generator=generator).images[0]
    image.save(f"{prefix}-{scheduler_cls.__name__}.png")
    print(f"{prefix}-{scheduler_cls.__name__}.png")

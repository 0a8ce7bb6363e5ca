"""The pipeline in ten lines: python examples/generate.py [MODEL_DIR] [OUT.png]"""

import sys

import torch

import gen

pipe = gen.load_pipeline(sys.argv[1] if len(sys.argv) > 1 else None)  # no argument: the embedded model
image = pipe(
    "a large red circle on a blue background",
    num_inference_steps=20,
    guidance_scale=5.0,
    generator=torch.Generator().manual_seed(0),
).images[0]
image.save(sys.argv[2] if len(sys.argv) > 2 else "example.png")

"""Prompts as people type them, on the embedded model: a contact sheet of short and paraphrased prompts for
seen and held-out (colour, shape, background) combinations, one row per prompt, one column per seed.

    python examples/prompt_styles.py [MODEL_DIR] [OUT.png]
"""

import random
import sys

import torch

import gen
from gen.data import captions, shapes
from gen.pixels import contact_sheet

ROWS = [  # (colour, shape, background, style); held-out: combinations never in training
    ("red", "circle", "blue", "short"),
    ("yellow", "star", "black", "short"),
    ("green", "cross", "white", "paraphrased"),
    ("white", "triangle", "purple", "paraphrased"),
    *[
        (c, s, b, style)
        for (c, s, b), style in zip(sorted(shapes.HELD_OUT)[:4], ["short", "paraphrased"] * 2, strict=True)
    ],
]


def main(model: str | None = None, out: str = "prompt-styles-grid.png", seeds: int = 6) -> None:
    pipe = gen.load_pipeline(model or None)
    rng = random.Random(0)
    prompts = [
        captions.prompt(shapes.Scene(c, s, b, "large", "centre"), style, rng) for c, s, b, style in ROWS
    ]
    images = []
    for prompt in prompts:
        gens = [torch.Generator().manual_seed(k) for k in range(seeds)]
        images += pipe([prompt] * seeds, generator=gens, num_inference_steps=20).images
        print(prompt)
    contact_sheet(images, columns=seeds).save(out)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""The `gen` command: parse, call the pipeline, save. No sampling logic of its own."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gen", description="Generate an image from a text prompt.")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("-o", "--output", default="gen.png", help="PNG file to write (default: %(default)s)")
    p.add_argument("--model", default=None, help="local pipeline folder (default: the embedded shapes model)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: %(default)s)")
    p.add_argument("--guidance", "--cfg", type=float, default=5.0, help="CFG scale (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from gen.weights import load_pipeline

    try:
        pipe = load_pipeline(args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"gen: error: {e}", file=sys.stderr)
        return 2
    image = pipe(
        args.prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(args.seed),
    ).images[0]
    image.save(args.output)
    print(args.output)
    return 0

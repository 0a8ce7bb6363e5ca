"""The `gen` command: parse, call the pipeline or evaluator, save. No sampling logic of its own.

gen "a red circle on a blue background" -o out.png     generate (the default subcommand)
gen generate "eval"                                    a prompt that equals a subcommand's name
gen eval [--json]                                      score the embedded model's prompt adherence
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SUBCOMMANDS = ("generate", "eval")


class CliError(Exception):
    """Bad input: printed as one line on stderr, exit status 2."""


def _quiet_libraries() -> None:
    # Library progress bars and warnings about loading are noise on a command line.
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gen", description="Generate an image from a text prompt.")
    p.add_argument("prompt", help="what to draw")
    p.add_argument(
        "-o", "--output", type=Path, default=Path("gen.png"), help="PNG file to write (default: %(default)s)"
    )
    p.add_argument("--model", default=None, help="local pipeline folder (default: the embedded shapes model)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: %(default)s)")
    p.add_argument(
        "--guidance",
        "--cfg",
        type=float,
        default=5.0,
        help="classifier-free guidance scale (default: %(default)s)",
    )
    p.add_argument("--negative", default=None, help="negative prompt (default: none)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gen eval", description="Measure how often images obey their prompts.")
    p.add_argument("--model", default=None, help="shapes model folder (default: the embedded model)")
    p.add_argument(
        "--images-per-prompt", type=int, default=4, help="images per prompt (default: %(default)s)"
    )
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: %(default)s)")
    p.add_argument(
        "--guidance",
        "--cfg",
        type=float,
        default=5.0,
        help="CFG scale compared with 1.0 (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument(
        "--grid", type=Path, default=None, help="also save a prompts x seeds contact sheet PNG here"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def cmd_generate(argv: list[str]) -> int:
    args = generate_parser().parse_args(argv)
    if args.output.exists() and not args.overwrite:
        raise CliError(f"{args.output} exists; pass --overwrite to replace it")
    import torch

    from gen.weights import load_pipeline

    _quiet_libraries()
    pipe = load_pipeline(args.model)
    image = pipe(
        args.prompt,
        negative_prompt=args.negative,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(args.seed),
    ).images[0]
    save_png(image, args.output)
    print(args.output)
    return 0


def save_png(image, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, then one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_eval(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    if args.images_per_prompt < 1:
        raise CliError(f"--images-per-prompt {args.images_per_prompt} must be >= 1")
    from gen import eval as gen_eval

    _quiet_libraries()
    report = gen_eval.run(args.model, args.images_per_prompt, args.guidance, args.steps, args.seed, args.grid)
    print(json.dumps(report, indent=2) if args.json else gen_eval.format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        command, rest = "generate", argv[1:]
    elif argv and argv[0] in SUBCOMMANDS:
        command, rest = argv[0], argv[1:]
    else:
        command, rest = "generate", argv
    try:
        return {"generate": cmd_generate, "eval": cmd_eval}[command](rest)
    except (CliError, FileNotFoundError, ValueError) as e:
        print(f"gen: error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """Console-script entry point. Skips interpreter teardown: unloading torch and diffusers takes over a second
    on a 2-core machine, a fifth of a cold `gen` call, and every file was already written atomically and closed."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

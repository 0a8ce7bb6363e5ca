"""The `gen` command: parse, call the pipeline or evaluator, save. No sampling logic of its own.

    gen "a red circle on a blue background" -o out.png      generate (the default subcommand)
    gen generate "eval"  |  gen -- "eval"                   a prompt that equals a subcommand's name
    gen samplers | gen info PATH | gen eval | gen reproduce IMAGE.png [--verify]

Bad input: one line on stderr, exit status 2 (--debug shows the traceback). Paths written go to stdout, one per
line; everything else (seed, progress, summary) to stderr.

The flags come from the request (gen.generation.Options) and the server's config (gen.serve.config.ServeConfig).
Commands import what they run inside their functions: `gen --help` and argument errors must not load torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gen.cli.common import CliError, Parser, err, quiet_libraries
from gen.cli.flags import add_flags, values
from gen.generation.options import check_precision
from gen.loading.assets import model_folder

SUBCOMMANDS = (
    "generate",
    "samplers",
    "info",
    "eval",
    "reproduce",
    "prompt",
    "convert",
    "bench",
    "serve",
    "control",
)
EPILOG = """output naming: -o out.png writes out.png; with -n/--from-file giving several images, out-00000.png,
out-00001.png, ... (image k of the run is number k and gets seed S+k); -o DIR/ writes DIR/00000.png, ...
If names are taken, the run goes on after the highest number there, unless --overwrite.

other commands (gen COMMAND --help for each):
  samplers              the sampler names (A1111's and ComfyUI's)
  info [MODEL]          a model's components, sizes, dtypes and scheduler (a folder or single file)
  prompt PROMPT         how a prompt is tokenized, weighted and chunked
  eval                  does the embedded model obey its prompts? (a judge network scores the images)
  reproduce IMAGE.png   make a PNG's image again from its metadata (--verify: exit 1 if it differs)
  convert MODEL         convert between model formats (--to-single-file)
  bench                 speed: gen against diffusers (--arch sd15), the server under load (--serve)
  serve                 HTTP server: A1111's, OpenAI's and a jobs API, and a web page
  control detect        a ControlNet's control image from a picture (canny, scribble_xdog, ...; `control modules`)
Many images on several processes: accelerate launch -m gen --from-file prompts.txt ..."""


def generate_parser() -> argparse.ArgumentParser:
    """The request's flags (from gen.generation.Options, each written once there) and the command's own."""
    from gen.generation.options import Options

    p = Parser(
        prog="gen",
        description="Generate images from text.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("prompt", nargs="?", help=Options.__dataclass_fields__["prompt"].metadata["spec"].help)
    a(
        "-o",
        "--output",
        default="gen.png",
        help="PNG file or folder/ (default: %(default)s; see naming below)",
    )
    add_flags(p, Options)
    a(
        "--from-file",
        type=Path,
        default=None,
        help="read prompts from this file, one per line (blank lines skipped)",
    )
    a("--grid", default=None, help="also save a contact sheet of this run's images to this PNG")
    a("--overwrite", action="store_true", help="replace existing files instead of numbering around them")
    a("--quiet", action="store_true", help="no progress bar, seed or summary; only the paths written")
    a("--debug", action="store_true", help="show tracebacks")
    return p


def read_prompts(path: Path):
    """Stream prompts, one a line (a file of a million lines is not read at once); blank lines and lines starting
    with # are skipped; bad bytes name their line."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise CliError(f"cannot read prompt file {path}: {e.strerror}") from None
    with f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise CliError(f"{path}:{number}: not valid UTF-8 text") from None
            if any(ord(c) < 32 and c != "\t" for c in line):
                raise CliError(f"{path}:{number}: contains control characters")
            if line.lstrip().startswith("#"):  # a comment; a prompt that starts with # is written \#
                continue
            if line.strip():
                yield line[1:] if line.startswith("\\#") else line


def _options(args):
    from gen.generation import Options

    return Options(prompt=args.prompt or "", **values(args, Options))


def cmd_generate(argv: list[str]) -> int:
    args = generate_parser().parse_args(argv)
    from gen import generation as G
    from gen.cli import outputs

    if (args.prompt is None) == (args.from_file is None):
        raise CliError("give a prompt or --from-file FILE (one, not both)")
    o = _options(args)
    G.check_options(o)
    prompts = (lambda: read_prompts(args.from_file)) if args.from_file else (lambda: iter([args.prompt]))
    total = sum(1 for _ in prompts()) * o.num_images
    if total == 0:
        raise CliError(f"{args.from_file} has no prompts")
    name = outputs.namer(args.output, total)
    outputs.check_writable(args.output)
    picked = o.seed is None
    if picked:
        o.seed = G.pick_seed()
    quiet_libraries()
    from gen.cli.loop import Runner

    return Runner(o, args, name, total, announce_seed=picked).run(G.plan(prompts(), o.num_images, o.seed))


def cmd_samplers(argv: list[str]) -> int:
    Parser(prog="gen samplers", description="List sampler names.").parse_args(argv)
    from gen.diffusion.samplers import SAMPLERS

    for name, s in SAMPLERS.items():
        flow = ("  [also SD3/Flux]" if s.cls else "  [SD3/Flux only]") if s.flow else ""
        print(f"{name:<22}{s.description}{flow}")
    return 0


def cmd_info(argv: list[str]) -> int:
    p = Parser(
        prog="gen info",
        description="What a model folder or single file holds (an SD3/Flux file: also what it still needs).",
    )
    p.add_argument(
        "path",
        nargs="?",
        default=None,
        help="pipeline folder or .safetensors file (default: the embedded model)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    from gen.loading.info import describe, format_description

    info = describe(args.path)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def cmd_prompt(argv: list[str]) -> int:
    p = Parser(prog="gen prompt", description="Show how a prompt is tokenized, weighted and chunked.")
    p.add_argument("prompt", help="the prompt, in A1111 syntax: (word:1.2), [word], BREAK")
    p.add_argument(
        "--model", default=None, help="model folder whose tokenizer to use (default: the embedded model)"
    )
    p.add_argument(
        "--truncate", action="store_true", help="show what truncation to one 77-token window would cut"
    )
    args = p.parse_args(argv)
    from transformers import CLIPTokenizer

    from gen.text.prompts import explain

    folder = model_folder(args.model)
    if not (folder / "tokenizer").is_dir():
        raise CliError(f"{folder} has no tokenizer/ folder")
    print(explain(CLIPTokenizer.from_pretrained(folder / "tokenizer"), args.prompt, args.truncate))
    return 0


def serve_parser() -> argparse.ArgumentParser:
    from gen.serve.config import ServeConfig  # torch- and FastAPI-free: the fields and defaults live there

    p = Parser(
        prog="gen serve",
        description="HTTP server: A1111's /sdapi/v1 and OpenAI's /v1/images APIs, gen's jobs API, a web page at /.",
    )
    add_flags(p, ServeConfig, ServeConfig.command_line_defaults())
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def cmd_serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    from gen.serve.config import ServeConfig

    config = ServeConfig(**values(args, ServeConfig))
    config.check()
    check_precision(config.dtype, config.device)
    quiet_libraries()
    import logging

    logging.basicConfig(level=logging.INFO, format="gen: %(message)s")
    from gen.serve.app import serve

    return serve(config)


def cmd_convert(argv: list[str]) -> int:
    p = Parser(prog="gen convert", description="Convert between model formats.")
    p.add_argument("model", help="a UNet pipeline folder (Stable Diffusion layout)")
    p.add_argument(
        "--to-single-file", required=True, type=Path, help="write one .safetensors in the original SD layout"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    out = args.to_single_file
    if out.suffix.lower() != ".safetensors":
        raise CliError(f"--to-single-file {out} must end in .safetensors")
    if out.exists() and not args.overwrite:
        raise CliError(f"{out} exists; pass --overwrite to replace it")
    quiet_libraries()
    from gen.loading.pipeline import load_pipeline
    from gen.pipelines.single_file import save_single_file

    print(save_single_file(load_pipeline(args.model), out))
    return 0


def cmd_reproduce(argv: list[str]) -> int:
    p = Parser(prog="gen reproduce", description="Make an image again from its PNG metadata.")
    p.add_argument("image", type=Path, help="a PNG written by gen")
    p.add_argument("-o", "--output", default=None, help="also save the re-made image here")
    p.add_argument(
        "--verify", action="store_true", help="exit 1 if the re-made image differs beyond --tolerance"
    )
    from gen.generation.metadata import PIXEL_TOLERANCE

    p.add_argument(
        "--tolerance",
        type=int,
        default=PIXEL_TOLERANCE,
        help="largest allowed pixel difference, 0-255 (default: %(default)s)",
    )
    p.add_argument("--model", default=None, help="use this model folder instead of the recorded one")
    p.add_argument(
        "--base",
        default=None,
        metavar="DIR",
        help="an SD3/Flux transformer file's diffusers folder, if not at its recorded path",
    )
    p.add_argument(
        "--text-encoder",
        action="append",
        default=None,
        metavar="FILE",
        help="an SD3/Flux transformer file's text encoder files, if not at their recorded paths (repeatable)",
    )
    p.add_argument("--vae", default=None, metavar="FILE", help="its VAE file, if not at its recorded path")
    p.add_argument("--init-image", default=None, help="the init image, if not at its recorded path")
    p.add_argument("--mask", default=None, help="the mask, if not at its recorded path")
    p.add_argument(
        "--control-image",
        action="append",
        default=None,
        metavar="PNG",
        help="ControlNet units' pictures, in unit order, if not at their recorded paths (repeatable)",
    )
    args = p.parse_args(argv)
    quiet_libraries()
    from gen.cli.loop import reproduce

    return reproduce(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        command, rest = "generate", argv[1:]
    elif argv and argv[0] in SUBCOMMANDS:
        command, rest = argv[0], argv[1:]
    else:
        command, rest = "generate", argv
    commands = {
        "generate": cmd_generate,
        "samplers": cmd_samplers,
        "info": cmd_info,
        "eval": _tool("cmd_eval"),
        "reproduce": cmd_reproduce,
        "prompt": cmd_prompt,
        "convert": cmd_convert,
        "bench": _tool("cmd_bench"),
        "serve": cmd_serve,
        "control": _control,
    }
    try:
        return commands[command](rest)
    except (CliError, ValueError, FileNotFoundError, OSError) as e:
        if "--debug" in rest:
            raise
        err("error: " + " ".join(str(e).split()))  # one line, whatever a library put in its message
        return 2
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if "--debug" in rest or not isinstance(e, MemoryError) and "out of memory" not in str(e).lower():
            raise
        err(
            "error: out of memory; try a smaller --batch-size or size, --dtype bf16, or VAE tiling / CPU offload"
        )
        return 2


def _tool(name: str):
    """A command of gen/cli/tools.py, imported when run (it is the tools' front-end, this module the generator's)."""

    def run(argv: list[str]) -> int:
        from gen.cli import tools

        return getattr(tools, name)(argv)

    return run


def _control(argv: list[str]) -> int:
    from gen.cli.control import cmd_control  # its own module: this one holds the generation command

    return cmd_control(argv)


def entry() -> None:
    """Console-script entry point. Skips interpreter teardown: unloading torch and diffusers takes over a second
    on a 2-core machine, a fifth of a cold `gen` call, and every file was already written atomically and closed."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

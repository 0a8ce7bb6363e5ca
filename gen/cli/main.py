"""The `gen` command: parse, call the pipeline or evaluator, save. No sampling logic of its own.

    gen "a red circle on a blue background" -o out.png      generate (the default subcommand)
    gen generate "eval"  |  gen -- "eval"                   a prompt that equals a subcommand's name
    gen samplers | gen info PATH | gen eval | gen reproduce IMAGE.png [--verify]

Bad input: one line on stderr, exit status 2 (--debug shows the traceback). Paths written go to stdout, one per
line; everything else (seed, progress, summary) to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gen.generation.options import ATTENTION, PRECISIONS, check_precision

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
  info [MODEL]          a model's components, sizes, dtypes and scheduler
  prompt PROMPT         how a prompt is tokenized, weighted and chunked
  eval                  does the embedded model obey its prompts? (a judge network scores the images)
  reproduce IMAGE.png   make a PNG's image again from its metadata (--verify: exit 1 if it differs)
  convert MODEL         convert between model formats (--to-single-file)
  bench                 speed: gen against diffusers (--arch sd15), the server under load (--serve)
  serve                 HTTP server: A1111's, OpenAI's and a jobs API, and a web page
  control detect        a ControlNet's control image from a picture (canny, scribble_xdog, ...; `control modules`)
Many images on several processes: accelerate launch -m gen --from-file prompts.txt ..."""


class CliError(Exception):
    """Bad input: printed as one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (via CliError), not a usage block."""

    def error(self, message: str):
        raise CliError(f"{message} (see `{self.prog} --help`)")


def err(message: str) -> None:
    print(f"gen: {message}", file=sys.stderr)


def _quiet_libraries() -> None:
    # Library progress bars and load-time warnings are noise on a command line.
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text} is outside 0 .. 2**64-1")
    return value


def _interval(text: str) -> tuple[float, float]:
    try:
        start, end = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not START,END (e.g. 0,0.6)") from None
    if not 0 <= start < end <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= START < END <= 1")
    return start, end


def generate_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gen",
        description="Generate images from text.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("prompt", nargs="?", help="what to draw (or --from-file)")
    a(
        "-o",
        "--output",
        default="gen.png",
        help="PNG file or folder/ (default: %(default)s; see naming below)",
    )
    a("-n", "--num-images", type=int, default=1, help="images per prompt (default: %(default)s)")
    a(
        "--batch-size",
        type=int,
        default=1,
        help="images computed together; never changes them (default: %(default)s)",
    )
    a(
        "--seed",
        type=_seed,
        default=None,
        help="seed of the first image; image k gets seed+k (default: random, printed)",
    )
    a("--steps", type=int, default=20, help="sampling steps (default: %(default)s)")
    a("--sampler", default=None, help="sampler name, see `gen samplers` (default: the model's own)")
    a(
        "--guidance",
        "--cfg",
        type=float,
        default=5.0,
        help="classifier-free guidance scale; <= 1 turns CFG off (default: %(default)s)",
    )
    a(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="rescale CFG towards the text branch's std, 0..1 (default: %(default)s)",
    )
    a("--negative", default="", help="negative prompt (default: none)")
    a("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    a("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    a(
        "--clip-skip",
        type=int,
        default=None,
        metavar="N",
        help="A1111's Clip skip: read the text encoder's Nth layer from the end (1 the last, 2 the penultimate);"
        " as in A1111, not applied to SD 2.x, nor to SDXL without --sdxl-clip-l-skip",
    )
    a(
        "--sdxl-clip-l-skip",
        action="store_true",
        help="SDXL: apply --clip-skip to the first text encoder (CLIP-L), A1111's 'Clip skip SDXL' setting",
    )
    a(
        "--model",
        default=None,
        help="local pipeline folder, ours or a Stable Diffusion 1.x/2.x one (default: embedded)",
    )
    a("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    a("--dtype", default="fp32", choices=PRECISIONS, help="precision (default: %(default)s)")
    a(
        "--attention",
        default="sdpa",
        choices=ATTENTION,
        help="attention kernels (default: %(default)s)",
    )
    a("--compile", action="store_true", help="torch.compile the denoiser (slow first call, faster after)")
    a(
        "--guidance-interval",
        type=_interval,
        default=None,
        help="START,END: CFG only in this part of the schedule, 0..1",
    )
    a(
        "--from-file",
        type=Path,
        default=None,
        help="read prompts from this file, one per line (blank lines skipped)",
    )
    a(
        "--init-image",
        default=None,
        metavar="PNG",
        help="image-to-image: start from this picture (its size unless --width/--height)",
    )
    a(
        "--strength",
        type=float,
        default=0.75,
        help="how much of the init image is re-drawn, 0..1 (default: %(default)s)",
    )
    a(
        "--mask",
        default=None,
        metavar="PNG",
        help="inpaint: repaint where this mask is white (needs --init-image)",
    )
    a(
        "--mask-blur",
        type=int,
        default=4,
        help="blur the mask's edge by this many pixels (default: %(default)s)",
    )
    a("--invert-mask", action="store_true", help="repaint where the mask is black instead")
    a("--grid", default=None, help="also save a contact sheet of this run's images to this PNG")
    a("--overwrite", action="store_true", help="replace existing files instead of numbering around them")
    a(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="apply a LoRA file or folder, diffusers' or kohya's format (repeatable; weight 1 by default)",
    )
    a(
        "--allow-pickle",
        action="store_true",
        help="also load .bin/.ckpt weights (pickle can run code; read weights-only)",
    )
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

    return Options(
        prompt=args.prompt or "",
        negative=args.negative,
        model=args.model,
        num_images=args.num_images,
        batch_size=args.batch_size,
        seed=args.seed,
        steps=args.steps,
        sampler=args.sampler,
        guidance=args.guidance,
        guidance_rescale=args.guidance_rescale,
        width=args.width,
        height=args.height,
        device=args.device,
        dtype=args.dtype,
        clip_skip=args.clip_skip,
        sdxl_clip_l_skip=args.sdxl_clip_l_skip,
        attention=args.attention,
        compile=args.compile,
        guidance_interval=args.guidance_interval,
        allow_pickle=args.allow_pickle,
        lora=args.lora,
        init_image=args.init_image,
        mask=args.mask,
        strength=args.strength,
        mask_blur=args.mask_blur,
        invert_mask=args.invert_mask,
    )


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
    _quiet_libraries()
    from gen.cli.loop import Runner

    return Runner(o, args, name, total, announce_seed=picked).run(G.plan(prompts(), o.num_images, o.seed))


def cmd_samplers(argv: list[str]) -> int:
    Parser(prog="gen samplers", description="List sampler names.").parse_args(argv)
    from gen.diffusion.samplers import SAMPLERS

    for name, s in SAMPLERS.items():
        print(f"{name:<22}{s.description}")
    return 0


def cmd_info(argv: list[str]) -> int:
    p = Parser(prog="gen info", description="What a model folder holds.")
    p.add_argument("path", nargs="?", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    from gen.loading.info import describe, format_description

    info = describe(args.path)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def cmd_eval(argv: list[str]) -> int:
    p = Parser(prog="gen eval", description="Measure how often images obey their prompts.")
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
    p.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="precision (default: %(default)s)"
    )
    p.add_argument(
        "--guidance-interval", type=_interval, default=None, help="START,END: CFG only in this part"
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the guidance_scale=1 comparison")
    p.add_argument("--no-styles", action="store_true", help="skip the prompt-style table and the probes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--task",
        default="text",
        choices=["text", "img2img", "inpaint"],
        help="text-to-image prompts; img2img: a strength sweep on rendered scenes; inpaint: a new object in a"
        " masked square (default: %(default)s)",
    )
    p.add_argument(
        "--count", type=int, default=40, help="scenes for --task img2img|inpaint (default: %(default)s)"
    )
    args = p.parse_args(argv)
    if args.images_per_prompt < 1 or args.steps < 1 or args.count < 1:
        raise CliError("--images-per-prompt, --steps and --count must be >= 1")
    _quiet_libraries()
    if args.task != "text":
        from gen.tools import eval_images

        report = eval_images.evaluate_task(
            args.task, args.model, args.count, args.steps, args.guidance, args.seed, args.dtype
        )
        print(
            json.dumps(report, indent=2)
            if args.json
            else eval_images.format_task(args.task, report["result"])
        )
        return 0
    from gen.tools import eval as gen_eval

    report = gen_eval.evaluate_model(
        args.model,
        images_per_prompt=args.images_per_prompt,
        guidance_scale=args.guidance,
        num_inference_steps=args.steps,
        seed=args.seed,
        grid=args.grid,
        dtype=args.dtype,
        guidance_interval=args.guidance_interval,
        no_cfg=not args.no_baseline,
        styles=not args.no_styles,
    )
    print(json.dumps(report, indent=2) if args.json else gen_eval.format_report(report))
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

    from gen.loading.pipeline import DEFAULT_MODEL
    from gen.text.prompts import explain

    folder = Path(args.model) if args.model else DEFAULT_MODEL
    if not (folder / "tokenizer").is_dir():
        raise CliError(f"{folder} has no tokenizer/ folder")
    print(explain(CLIPTokenizer.from_pretrained(folder / "tokenizer"), args.prompt, args.truncate))
    return 0


def cmd_bench(argv: list[str]) -> int:
    if "--serve" in argv:
        return cmd_bench_serve([a for a in argv if a != "--serve"])
    p = Parser(prog="gen bench", description="Measure speed, against diffusers and the machine.")
    p.add_argument(
        "--serve", action="store_true", help="load-test `gen serve` instead (gen bench --serve --help)"
    )
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument(
        "--arch",
        default="dit",
        choices=("dit", "sd15"),
        help="dit: the model given (default: the embedded one); sd15: the SD 1.5 architecture, random weights unless"
        " --model is an SD folder, gen against diffusers (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=PRECISIONS,
        help="precision (default: fp32; with --arch sd15, fp32 rows and bf16 rows where the hardware has bf16)",
    )
    p.add_argument(
        "--size", type=int, default=512, help="--arch sd15: pixels per side (default: %(default)s)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--attention", default="sdpa", choices=ATTENTION, help="(default: %(default)s)")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the denoiser; warm-up reported apart"
    )
    p.add_argument("--batch", default="1,16", help="batch sizes, comma-separated (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: %(default)s)")
    p.add_argument(
        "--reps", type=int, default=5, help="timed repetitions after warm-up (default: %(default)s)"
    )
    p.add_argument("--pairs", type=int, default=None, help="paired gen/diffusers runs (default: 5; sd15: 3)")
    p.add_argument("--no-unet", action="store_true", help="skip the SD-architecture UNet comparison")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise CliError(f"--batch {args.batch!r} must be comma-separated integers, e.g. 1,16") from None
    args.pairs = args.pairs if args.pairs is not None else (3 if args.arch == "sd15" else 5)
    if min(batches) < 1 or args.steps < 1 or args.reps < 1 or args.pairs < 1:
        raise CliError("--batch, --steps, --reps and --pairs must be >= 1")
    check_precision(args.dtype or "fp32", args.device)
    if args.arch == "sd15":
        return _bench_sd(args)
    _quiet_libraries()
    from gen.tools import bench

    report = bench.benchmark(
        args.model,
        dtype=args.dtype or "fp32",
        device=args.device,
        attention=args.attention,
        compile=args.compile,
        batches=batches,
        steps=args.steps,
        reps=args.reps,
        pairs=args.pairs,
        unet=not args.no_unet,
    )
    print(json.dumps(report, indent=2) if args.json else bench.format_report(report))
    return 0


def serve_parser() -> argparse.ArgumentParser:
    from gen.serve.config import ServeConfig as C  # torch- and FastAPI-free: the defaults live there
    from gen.serve.config import default_state_dir

    p = Parser(
        prog="gen serve",
        description="HTTP server: A1111's /sdapi/v1 and OpenAI's /v1/images APIs, gen's jobs API, a web page at /.",
    )
    a = p.add_argument
    a("--host", default=C.host, help="address to listen on (default: %(default)s, this machine only)")
    a("--port", type=int, default=C.port, help="(default: %(default)s)")
    a(
        "--model",
        action="append",
        default=None,
        help="model folder or file; repeat to serve several (first: default)",
    )
    a("--device", default="cpu", help="cpu, cuda, cuda:1, ... one worker per device (default: %(default)s)")
    a("--dtype", default="fp32", choices=PRECISIONS, help="precision (default: %(default)s)")
    a("--attention", default="sdpa", choices=ATTENTION, help="attention kernels (default: %(default)s)")
    a(
        "--api-auth",
        default=os.environ.get("GEN_API_AUTH"),
        metavar="USER:PASS[,U2:P2]",
        help="HTTP Basic on every route (default: $GEN_API_AUTH, else none)",
    )
    a(
        "--api-key",
        default=os.environ.get("GEN_API_KEY"),
        help="Bearer key for /v1 (default: $GEN_API_KEY, else none)",
    )
    a(
        "--cors",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser calls from ORIGIN (repeatable)",
    )
    a("--max-batch", type=int, default=C.max_batch, help="images in one pipeline call (default: %(default)s)")
    a(
        "--batch-wait-ms",
        type=float,
        default=C.batch_wait_ms,
        help="after a batch, wait this long for compatible requests to fill the next (default: %(default)s)",
    )
    a("--max-queue", type=int, default=C.max_queue, help="requests waiting before 429 (default: %(default)s)")
    a(
        "--max-pixels",
        type=int,
        default=C.max_pixels,
        help="width x height of an image (default: %(default)s)",
    )
    a("--max-steps", type=int, default=C.max_steps, help="(default: %(default)s)")
    a("--max-images", type=int, default=C.max_images, help="images in one request (default: %(default)s)")
    a(
        "--max-body-mb",
        type=float,
        default=C.max_body / 2**20,
        help="request body size in MiB (default: %(default)s)",
    )
    a(
        "--state-dir",
        default=str(default_state_dir()),
        metavar="DIR",
        help="store jobs of /gen/v1/jobs here (SQLite + PNGs), so a restart or crash resumes them; none: memory"
        " only (default: %(default)s)",
    )
    a(
        "--keep-jobs",
        type=float,
        default=C.keep_hours,
        metavar="HOURS",
        help="finished jobs stay fetchable this long, then are deleted (default: %(default)s)",
    )
    a("--debug", action="store_true", help="show tracebacks")
    return p


def cmd_serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    from gen.serve.config import ServeConfig

    config = ServeConfig(
        host=args.host,
        port=args.port,
        models=args.model or [None],
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        api_auth=args.api_auth,
        api_key=args.api_key,
        cors=args.cors,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        max_pixels=args.max_pixels,
        max_steps=args.max_steps,
        max_images=args.max_images,
        max_body=int(args.max_body_mb * 2**20),
        state_dir=None if args.state_dir.strip().lower() == "none" else args.state_dir,
        keep_hours=args.keep_jobs,
    )
    config.check()
    check_precision(args.dtype, args.device)
    _quiet_libraries()
    import logging

    logging.basicConfig(level=logging.INFO, format="gen: %(message)s")
    from gen.serve.app import serve

    return serve(config)


def cmd_bench_serve(argv: list[str]) -> int:
    p = Parser(
        prog="gen bench --serve",
        description="Load-test `gen serve`: C clients x R requests, batching vs --max-batch 1, images vs the CLI's;"
        " or, with --minutes M, a soak of M minutes with the server's memory.",
    )
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    p.add_argument(
        "--requests",
        type=int,
        default=4,
        help="requests per client (default: %(default)s; not used by --minutes)",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="soak instead: one server, the clients sending mixed requests (every API, 1-4 images, bad ones)"
        " for this many minutes (0.1 allowed); adds the server's memory and its bound",
    )
    p.add_argument("--steps", type=int, default=8, help="sampling steps (default: %(default)s)")
    p.add_argument(
        "--max-batch", type=int, default=8, help="the batching run's --max-batch (default: %(default)s)"
    )
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds (default: 900; with --minutes M, M minutes + 600)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    timeout = 1 if args.timeout is None else args.timeout  # None: the run's own default
    if min(args.clients, args.requests, args.steps, args.max_batch, timeout) < 1:
        raise CliError("--clients, --requests, --steps, --max-batch and --timeout must be >= 1")
    if args.minutes is not None and not 0 < args.minutes * 60 < (args.timeout or float("inf")):
        raise CliError(f"--minutes {args.minutes} must be > 0 and end within --timeout")
    _quiet_libraries()
    from gen.tools import serve_bench, serve_soak

    if args.minutes is not None:
        report = serve_soak.soak_benchmark(
            args.model, args.clients, args.minutes, args.steps, args.max_batch, timeout=args.timeout
        )
        print(json.dumps(report, indent=2) if args.json else serve_soak.format_soak(report))
        return 0 if report["ok"] else 1
    report = serve_bench.benchmark(
        args.model, args.clients, args.requests, args.steps, args.max_batch, timeout=args.timeout or 900
    )
    print(json.dumps(report, indent=2) if args.json else serve_bench.format_report(report))
    return 0 if report["ok"] else 1


def _bench_sd(args: argparse.Namespace) -> int:
    if args.size < 64 or args.size % 8:
        raise CliError(f"--size {args.size} must be a multiple of 8, at least 64")
    _quiet_libraries()
    from gen.tools import bench_sd

    report = bench_sd.benchmark_sd(
        args.model,
        size=args.size,
        steps=args.steps,
        pairs=args.pairs,
        dtypes=(args.dtype,) if args.dtype else None,
        device=args.device,
    )
    print(json.dumps(report, indent=2) if args.json else bench_sd.format_report(report))
    return 0


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
    _quiet_libraries()
    from gen.loading.pipeline import load_pipeline
    from gen.loading.single_file import save_single_file

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
    p.add_argument("--init-image", default=None, help="the init image, if not at its recorded path")
    p.add_argument("--mask", default=None, help="the mask, if not at its recorded path")
    args = p.parse_args(argv)
    _quiet_libraries()
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
        "eval": cmd_eval,
        "reproduce": cmd_reproduce,
        "prompt": cmd_prompt,
        "convert": cmd_convert,
        "bench": cmd_bench,
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

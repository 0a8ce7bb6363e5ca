"""The tools' commands: `gen eval` (does the embedded model obey its prompts?) and `gen bench` (speed against
diffusers, the server under load, a soak)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gen.cli.common import CliError, Parser, err, quiet_libraries
from gen.cli.flags import argparse_type
from gen.generation.options import ATTENTION, PRECISIONS, check_precision, parse_interval
from gen.loading.precision import BACKENDS, check_backend, pick_precision


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
        "--backend",
        default="torch",
        choices=BACKENDS,
        help="what runs the model whose images are judged: torch, or openvino (text-to-image; default: %(default)s)",
    )
    p.add_argument(
        "--guidance-interval",
        type=argparse_type(parse_interval),
        default=None,
        help="START,END: CFG only in this part",
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
    if args.backend != "torch" and args.task != "text":
        raise CliError(
            f"--backend {args.backend} judges text-to-image only; --task {args.task} runs in torch"
        )
    quiet_libraries()
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
    from gen import evaluation as gen_eval

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
        backend=args.backend,
    )
    print(json.dumps(report, indent=2) if args.json else gen_eval.format_report(report))
    return 0


def cmd_bench(argv: list[str]) -> int:
    if "--serve" in argv:
        return cmd_bench_serve([a for a in argv if a != "--serve"])
    args = bench_parser().parse_args(argv)
    batches = _bench_batches(args)
    if args.arch == "sd15":
        return _bench_sd(args)
    quiet_libraries()
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
        backend=args.backend,
    )
    print(json.dumps(report, indent=2) if args.json else bench.format_report(report))
    return 0


def _bench_batches(args: argparse.Namespace) -> tuple[int, ...]:
    """--batch's sizes; the counts checked, --pairs' default by architecture."""
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise CliError(f"--batch {args.batch!r} must be comma-separated integers, e.g. 1,16") from None
    args.pairs = args.pairs if args.pairs is not None else (3 if args.arch == "sd15" else 5)
    if min(batches) < 1 or args.steps < 1 or args.reps < 1 or args.pairs < 1:
        raise CliError("--batch, --steps, --reps and --pairs must be >= 1")
    check_precision(args.dtype or "fp32", args.device)
    check_backend(args.backend, args.dtype or "fp32", args.device)
    if args.dtype:
        args.dtype, why = pick_precision(args.dtype, args.device, args.backend)
        if why:
            err(f"precision: {args.dtype} ({why})")
    return batches


def bench_parser() -> argparse.ArgumentParser:
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
        help="precision (default: fp32; with --arch sd15, fp32 rows and bf16 rows where the hardware has bf16;"
        " auto: gen's choice, printed)",
    )
    p.add_argument(
        "--size", type=int, default=512, help="--arch sd15: pixels per side (default: %(default)s)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--attention", default="sdpa", choices=ATTENTION, help="(default: %(default)s)")
    p.add_argument(
        "--backend",
        default="torch",
        choices=BACKENDS,
        help="openvino: with --arch sd15, add gen's OpenVINO rows; else time that backend (default: %(default)s)",
    )
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
    return p


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
    quiet_libraries()
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


def _openvino_rows(args: argparse.Namespace) -> tuple[str, ...]:
    """--backend openvino: its rows in --dtype, else f32 and bf16 too where auto would pick OpenVINO's bf16 (native
    bf16: gen.loading.precision.pick_precision)."""
    if args.backend != "openvino":
        return ()
    check_backend("openvino", args.dtype or "fp32", args.device)
    if args.dtype:
        return (args.dtype,)
    return ("fp32", "bf16") if pick_precision("auto", "cpu", "openvino")[0] == "bf16" else ("fp32",)


def _bench_sd(args: argparse.Namespace) -> int:
    if args.size < 64 or args.size % 8:
        raise CliError(f"--size {args.size} must be a multiple of 8, at least 64")
    quiet_libraries()
    from gen.tools import bench_sd

    report = bench_sd.benchmark_sd(
        args.model,
        size=args.size,
        steps=args.steps,
        pairs=args.pairs,
        dtypes=(args.dtype,) if args.dtype else None,
        device=args.device,
        openvino=_openvino_rows(args),
    )
    print(json.dumps(report, indent=2) if args.json else bench_sd.format_report(report))
    return 0

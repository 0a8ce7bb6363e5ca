"""`gen control`: ControlNet helpers on the command line (the preprocessors of gen.control)."""

from __future__ import annotations

from pathlib import Path

from gen.cli.common import CliError, Parser


def cmd_control(argv: list[str]) -> int:
    if not argv or argv[0] not in ("detect", "modules"):
        raise CliError("gen control: say `detect` (a control image from a picture) or `modules` (the list)")
    return detect(argv[1:]) if argv[0] == "detect" else modules(argv[1:])


def modules(argv: list[str]) -> int:
    Parser(prog="gen control modules", description="The preprocessors that need no weights.").parse_args(argv)
    from gen.control import MODULES

    for name, m in MODULES.items():
        settings = [
            f"{field}: {s.name} (default {s.default:g}, {s.low:g}-{s.high:g})"
            for field, s in (("threshold_a", m.a), ("threshold_b", m.b))
            if s is not None
        ]
        print(f"{name:<18}{'; '.join(settings)}")
    return 0


def detect(argv: list[str]) -> int:
    p = Parser(
        prog="gen control detect",
        description="Make a ControlNet's control image from a picture (e.g. Canny edges).",
    )
    p.add_argument("image", type=Path, help="the picture")
    p.add_argument(
        "--module",
        required=True,
        help="preprocessor: canny, invert, threshold, binary, scribble_xdog,"
        " lineart_standard, tile_resample, shuffle, none (`gen control modules`)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="the control image (.png)")
    p.add_argument(
        "--threshold-a", type=float, default=None, help="the module's first setting (A1111's threshold_a)"
    )
    p.add_argument("--threshold-b", type=float, default=None, help="its second (A1111's threshold_b)")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="pixels on the short side to detect at (A1111's processor_res; default: the picture's)",
    )
    p.add_argument("--seed", type=int, default=0, help="for shuffle (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    from gen.cli import outputs
    from gen.control import detect as run
    from gen.generation.inputs import read_image

    picture = read_image(args.image, "picture")
    made = run(picture, args.module, args.threshold_a, args.threshold_b, args.resolution, args.seed)
    print(outputs.save(made, outputs.namer(args.output), k=0, total=1, overwrite=args.overwrite))
    return 0

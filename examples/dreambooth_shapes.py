"""DreamBooth on the embedded shapes model: teach it a shape it has never seen, and measure what that costs.

    python examples/dreambooth_shapes.py --out runs/heart            # about 10 minutes on 2 CPU cores

Five renders of a red heart on white (drawn by gen's dataset code, never in the base model's training) become the
instance images for "a sks shape on a white background"; the class prompt is "a shape on a white background".
The LoRA is trained twice, with and without prior preservation, and each result is judged the way `gen eval`
judges the base model: does "a sks shape on a <colour> background" show a heart (fidelity), on that colour
(background adherence), and how much does the base model's adherence on the standard prompts drop with the
LoRA loaded. Extra arguments after `--` go to gen.train.dreambooth.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gen.data import shapes as S
from gen.evaluation import evaluate
from gen.loading.pipeline import DEFAULT_MODEL, load_pipeline
from gen.models.judge import Judge, corrupt, to_tensor
from gen.train import dreambooth

INSTANCE = "a sks shape on a white background"
CLASS = "a shape on a white background"
# No tuning flags: gen.train.dreambooth fills in the recipe measured for gen's DiT (its RECIPES), and finds the
# identifier ("sks") as the instance prompt's word the class prompt lacks.
RECIPE = ["--lora", "--class-prompt", CLASS, "--num-class-images", "100"]


def instance_images(folder: Path, shape: str, colour: str, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):  # both sizes, large first (a subject's pictures show it well), anywhere
        size = ("large", "small")[i % 2]
        scene = S.Scene(colour, shape, "white", size, rng.choice(S.POSITIONS))
        S.render(scene, 64, jitter=rng).save(folder / f"{i}.png")


def judge_subject(pipe, judge: Judge, shape: str, colour: str, seeds: int) -> dict[str, float]:
    """Fidelity (the judge sees `shape`) and background adherence over every background but the subject's colour."""
    backgrounds = [c for c in S.COLOURS if c != colour]
    scenes = [S.Scene(colour, shape, b, "large", "centre") for b in backgrounds for _ in range(seeds)]
    prompts = [f"a sks shape on a {s.background} background" for s in scenes]
    gens = [torch.Generator().manual_seed(k % seeds) for k in range(len(prompts))]
    images = pipe(prompts, generator=gens, output_type="pt").images * 2 - 1
    pred = judge.predict(images)
    right = {a: pred[a] == torch.tensor([s.labels()[a] for s in scenes]) for a in ("shape", "background")}
    return {
        "fidelity": right["shape"].float().mean().item(),
        "background": right["background"].float().mean().item(),
        "both": (right["shape"] & right["background"]).float().mean().item(),
    }


def judge_on_renders(judge: Judge, shape: str, count: int = 200) -> dict[str, float]:
    """How often the judge itself recognises rendered `shape`s (clean, blurred, noisy): the ceiling of fidelity."""
    rng = random.Random(0)
    colours = [c for c in S.COLOURS if c != "white"]
    scenes = [
        S.Scene(rng.choice(colours), shape, "white", rng.choice(S.SIZES), rng.choice(S.POSITIONS))
        for _ in range(count)
    ]
    x = to_tensor(np.stack([np.array(S.render(s, 64, jitter=rng)) for s in scenes]))
    label = scenes[0].labels()["shape"]
    g = torch.Generator().manual_seed(0)
    return {
        kind: (judge.predict(corrupt(x, kind, g))["shape"] == label).float().mean().item()
        for kind in ("clean", "blur", "noise")
    }


def base_adherence(pipe, judge: Judge, images_per_prompt: int) -> dict[str, float]:
    r = evaluate(pipe, judge, images_per_prompt=images_per_prompt)
    return {split: acc["all"] for split, acc in r.accuracy.items()}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/dreambooth-shapes"))
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="a shapes model folder (has judge/)"
    )
    parser.add_argument("--shape", default="heart", choices=S.EXTRA_SHAPES)
    parser.add_argument("--colour", default="red", choices=list(S.COLOURS))
    parser.add_argument("--instances", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=8, help="images per background colour")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="for the base-adherence evaluation")
    o = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    judge = Judge.from_pretrained(o.model / "judge").float().eval()
    instance_images(o.out / "instances", o.shape, o.colour, o.instances, seed=7)
    pipe = load_pipeline(o.model)
    pipe.set_progress_bar_config(disable=True)
    report = {
        "shape": o.shape,
        "colour": o.colour,
        "instances": o.instances,
        "judge on renders": judge_on_renders(judge, o.shape),
        "base": {"adherence": base_adherence(pipe, judge, o.images_per_prompt)},
    }
    for name, prior in (("prior preservation", True), ("no prior preservation", False)):
        out = o.out / name.replace(" ", "-")
        args = [
            "--model",
            str(o.model),
            "--instance-dir",
            str(o.out / "instances"),
            "--instance-prompt",
            INSTANCE,
            "--output-dir",
            str(out),
            "--max-steps",
            str(o.max_steps),
            "--overwrite",
            *RECIPE,
        ]
        if prior:
            args += ["--with-prior-preservation", "--class-dir", str(o.out / "class_images")]
        start = time.perf_counter()
        lora = dreambooth.main(args + extra)
        minutes = (time.perf_counter() - start) / 60
        pipe.load_lora_weights(lora, adapter_name=name.replace(" ", "_"))
        row = judge_subject(pipe, judge, o.shape, o.colour, o.seeds)
        row |= {"adherence": base_adherence(pipe, judge, o.images_per_prompt), "minutes": minutes}
        config = json.loads((out / "train_config.json").read_text())
        row["recipe"] = {k: config[k] for k in dreambooth.TUNING_FLAGS}  # what the run trained with
        pipe.unload_lora_weights()
        report[name] = row
    (o.out / "report.json").write_text(json.dumps(report, indent=2))
    print(table(report))
    return report


def table(report: dict) -> str:
    base = report["base"]["adherence"]
    judged = ", ".join(f"{k} {100 * v:.1f}" for k, v in report["judge on renders"].items())
    lines = [
        f"subject: a {report['colour']} {report['shape']} from {report['instances']} images",
        f"judge recognises rendered {report['shape']}s (%): {judged}",
        f"{'run':24} {'fidelity':>9} {'background':>11} {'both':>6} {'seen':>6} {'held-out':>9} {'drop':>6} {'minutes':>8}",
        f"{'base model':24} {'':>9} {'':>11} {'':>6} {100 * base['seen']:6.1f} {100 * base['held-out']:9.1f}",
    ]
    for name in ("prior preservation", "no prior preservation"):
        r = report[name]
        a = r["adherence"]
        drop = 100 * np.mean([base[s] - a[s] for s in base])
        lines.append(
            f"{name:24} {100 * r['fidelity']:9.1f} {100 * r['background']:11.1f} {100 * r['both']:6.1f} "
            f"{100 * a['seen']:6.1f} {100 * a['held-out']:9.1f} {drop:6.1f} {r['minutes']:8.1f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Judging image-to-image and inpainting on the embedded shapes model (`gen eval --task img2img|inpaint`).

Inpainting: rendered scenes, the square around the object masked, a prompt asking for another colour and shape in
the same place. The judge must see the new object and the original background, and the pixels outside the
mask (dilated by the blur) must stay the original's: exactly, after the paste-back every front-end does, and
within the VAE's round-trip error in the pipeline's own output.

Image-to-image: rendered scenes and a prompt that changes colour, shape, background and position, over a
strength sweep: at low strength the original's shape and position should survive, at high strength the
prompt should win.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from gen.data import captions as C
from gen.data import shapes as S
from gen.evaluation import load_judged
from gen.generation.inputs import init_images, paste_back
from gen.generation.options import Options, seed_of
from gen.models.judge import Judge, to_tensor
from gen.pipelines import ImageToImagePipeline, InpaintPipeline

TASKS = ("img2img", "inpaint")
RATES = (
    "new object",
    "background kept",
    "position kept",
    "shape kept",
    "colour kept",
    "prompt followed",
)  # shown as percentages


def _other(rng: random.Random, options, *avoid: str) -> str:
    return rng.choice([o for o in options if o not in avoid])


def inpaint_cases(count: int, seed: int) -> list[tuple[S.Scene, S.Scene]]:
    """(original, wanted) scenes: the same background, size and position; another colour and shape."""
    rng = random.Random(f"inpaint/{seed}")
    cases = []
    for _ in range(count):
        a = S.sample_scene(rng, "all")
        colour = _other(rng, S.COLOURS, a.colour, a.background)
        cases.append((a, S.Scene(colour, _other(rng, S.SHAPES, a.shape), a.background, a.size, a.position)))
    return cases


def img2img_cases(count: int, seed: int) -> list[tuple[S.Scene, S.Scene]]:
    """(original, prompted) scenes: the prompt names another colour, shape, background and position."""
    rng = random.Random(f"img2img/{seed}")
    cases = []
    for _ in range(count):
        a = S.sample_scene(rng, "all")
        background = _other(rng, S.COLOURS, a.background)
        colour = _other(rng, S.COLOURS, a.colour, background)
        shape, position = _other(rng, S.SHAPES, a.shape), _other(rng, S.POSITIONS, a.position)
        cases.append((a, S.Scene(colour, shape, background, a.size, position)))
    return cases


def box_mask(scene: S.Scene, resolution: int, grow: int = 0) -> Image.Image:
    """White over the square the scene's object fits in (grown by `grow` pixels), black elsewhere."""
    x0, y0, x1, y1 = S.object_box(scene, resolution)
    mask = Image.new("L", (resolution, resolution), 0)
    ImageDraw.Draw(mask).rectangle([x0 - grow, y0 - grow, x1 - 1 + grow, y1 - 1 + grow], fill=255)
    return mask


def _judged(judge: Judge, images: list[Image.Image]) -> dict[str, list[str]]:
    x = to_tensor(np.stack([np.asarray(i.convert("RGB")) for i in images]))
    pred = judge.predict(x.to(judge.device))
    return {a: [S.LABELS[a][i] for i in pred[a].tolist()] for a in S.ATTRIBUTES}


def _rate(flags: list[bool]) -> float:
    return sum(flags) / max(len(flags), 1)


def evaluate_inpaint(
    pipe,
    judge: Judge,
    count: int = 40,
    strengths: tuple[float, ...] = (Options.strength, 1.0),
    mask_blur: int = Options.mask_blur,
    seed: int = 0,
    **kwargs,
) -> dict[str, dict[str, float]]:
    """Per strength: the new object right (colour and shape), the background kept, and the largest and mean
    pixel change outside the mask dilated by its blur (after the paste-back; and the pipeline's own)."""
    inpaint = InpaintPipeline.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    side = pipe.default_size
    cases = inpaint_cases(count, seed)
    inits = [init_images(S.render(a, side), box_mask(a, side), mask_blur=mask_blur) for a, _ in cases]
    prompts = [C.canonical(b) for _, b in cases]
    out = {}
    for strength in strengths:
        generators = [torch.Generator().manual_seed(seed_of(seed, k)) for k in range(len(cases))]
        images = [i.image for i in inits]
        masks = [i.mask for i in inits]
        raw = inpaint(
            prompts, image=images, mask_image=masks, strength=strength, generator=generators, **kwargs
        )
        pasted = [paste_back(i, r) for i, r in zip(inits, raw.images, strict=True)]
        out[f"{strength:g}"] = {
            **_inpaint_rates(_judged(judge, pasted), cases),
            **_outside_changes(inits, raw.images, pasted),
        }
    return out


def _inpaint_rates(judged: dict[str, list[str]], cases: list[tuple[S.Scene, S.Scene]]) -> dict[str, float]:
    """The share of pictures with the wanted object (colour and shape both), and with the original background."""
    new = [
        judged["colour"][k] == b.colour and judged["shape"][k] == b.shape for k, (_, b) in enumerate(cases)
    ]
    kept = [judged["background"][k] == a.background for k, (a, _) in enumerate(cases)]
    return {"new object": _rate(new), "background kept": _rate(kept)}


def _outside_changes(inits: list, raw: list[Image.Image], pasted: list[Image.Image]) -> dict[str, float]:
    """_outside over the pictures whose mask leaves something outside: the largest change after the paste-back,
    the mean change after it and in the pipeline's own output."""
    diffs = [_outside(i, r, p) for i, r, p in zip(inits, raw, pasted, strict=True)]
    diffs = [d for d in diffs if d is not None]
    return {
        "outside max": max(d[0] for d in diffs),
        "outside mean": float(np.mean([d[1] for d in diffs])),
        "outside mean, pipeline": float(np.mean([d[2] for d in diffs])),
    }


def _outside(init, raw: Image.Image, pasted: Image.Image) -> tuple[int, float, float] | None:
    """Largest and mean change where the blurred mask is 0 (the mask dilated by its blur) after the paste-back;
    the mean change there in the pipeline's own output (the VAE's round trip). None if the mask covers all."""
    outside = np.asarray(init.mask) == 0
    if not outside.any():
        return None
    ref = np.asarray(init.image, np.int16)[outside]
    diff = np.abs(np.asarray(pasted, np.int16)[outside] - ref)
    return int(diff.max()), float(diff.mean()), float(np.abs(np.asarray(raw, np.int16)[outside] - ref).mean())


def evaluate_img2img(
    pipe,
    judge: Judge,
    count: int = 40,
    strengths: tuple[float, ...] = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0),
    seed: int = 0,
    **kwargs,
) -> dict[str, dict[str, float]]:
    """Per strength: the original's position, shape and colour kept (each); the prompt's colour, shape,
    background and position all drawn."""
    img2img = ImageToImagePipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    side = pipe.default_size
    cases = img2img_cases(count, seed)
    originals = [S.render(a, side) for a, _ in cases]
    prompts = [C.canonical(b) for _, b in cases]
    out = {}
    for strength in strengths:
        generators = [torch.Generator().manual_seed(seed_of(seed, k)) for k in range(len(cases))]
        images = img2img(prompts, image=originals, strength=strength, generator=generators, **kwargs).images
        judged = _judged(judge, images)
        kept = {
            f"{attr} kept": _rate([judged[attr][k] == getattr(a, attr) for k, (a, _) in enumerate(cases)])
            for attr in ("position", "shape", "colour")
        }
        followed = [
            all(judged[attr][k] == getattr(b, attr) for attr in ("colour", "shape", "background", "position"))
            for k, (_, b) in enumerate(cases)
        ]
        out[f"{strength:g}"] = {**kept, "prompt followed": _rate(followed)}
    return out


def format_task(task: str, result: dict) -> str:
    """The table README shows: one row per strength, percentages (pixel differences in 0-255 levels)."""
    first = next(iter(result.values()))
    cols = list(first)
    lines = [
        f"{task}: " + ("new colour and shape in the masked square" if task == "inpaint" else "strength sweep")
    ]
    lines.append(f"{'strength':<10}" + "".join(f"{c:>24}" for c in cols))
    for strength, row in result.items():
        cells = [f"{100 * row[c]:23.1f}%" if c in RATES else f"{row[c]:24.2f}" for c in cols]
        lines.append(f"{strength:<10}" + "".join(cells))
    return "\n".join(lines)


def evaluate_task(
    task: str,
    model=None,
    count: int = 40,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
    dtype: str = "fp32",
    device: str = "cpu",
) -> dict:
    """`gen eval --task img2img|inpaint` on a shapes model folder (default: the embedded one)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} must be one of {list(TASKS)}")
    folder, pipe, judge = load_judged(model, dtype, device)
    run = evaluate_img2img if task == "img2img" else evaluate_inpaint
    kwargs = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    return {
        "model": str(folder),
        "task": task,
        "images": count,
        "result": run(pipe, judge, count, seed=seed, **kwargs),
    }

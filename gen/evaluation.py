"""Judging generated shapes images: does the picture obey its prompt?

Like GenEval for real models, each image is checked attribute by attribute — background colour, object colour,
shape, size, position — by a judge that is itself verified on rendered ground truth (clean, blurred and noisy)
before its verdicts are trusted. The judge is a small CNN trained on the shapes data (gen.models.judge, trained by
train/shapes.py); the tiny CLIP's vision tower adds a CLIP score. Library code: `gen eval` and the shapes recipe's
last stage both call it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.image_processor import VaeImageProcessor
from torch import nn

from gen.data import captions as C
from gen.data import shapes as S
from gen.generation import DTYPES
from gen.generation.options import seed_of
from gen.loading.assets import model_folder
from gen.loading.pipeline import load_pipeline
from gen.models.judge import CLASSES, Judge, judge_accuracy
from gen.pixels import contact_sheet

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Accuracy per split ("seen", "held-out") and attribute, plus "all" (every attribute right)."""

    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    clip_score: dict[str, float] = field(default_factory=dict)
    images: int = 0


def eval_scenes(per_split: int = 20, seed: int = 4242) -> dict[str, list[S.Scene]]:
    """The fixed prompt set: `per_split` seen scenes (training combinations) and held-out ones (all 20 triples)."""
    rng = random.Random(seed)
    seen = []
    while len(seen) < per_split:
        scene = S.sample_scene(rng, "train")
        if scene not in seen:
            seen.append(scene)
    held = [S.Scene(c, s, b, rng.choice(S.SIZES), rng.choice(S.POSITIONS)) for c, s, b in sorted(S.HELD_OUT)]
    return {"seen": seen, "held-out": held[:per_split]}


def score(judge: Judge, images: torch.Tensor, scenes: list[S.Scene]) -> dict[str, float]:
    """Per-attribute and all-attribute accuracy of images (B, 3, H, W) in [-1, 1] against their scenes."""
    pred = judge.predict(images.to(judge.device))
    right = {a: pred[a].cpu() == torch.tensor([s.labels()[a] for s in scenes]) for a in S.ATTRIBUTES}
    out = {a: r.float().mean().item() for a, r in right.items()}
    out["all"] = torch.stack(list(right.values())).all(0).float().mean().item()
    return out


def generate(
    pipe, prompts: list[str], seeds: list[int], guidance_scale: float, batch_size: int = 32, **kwargs
) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1], one per (prompt, seed)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(sd) for sd in seeds[i : i + batch_size]]
        images = pipe(
            prompts[i : i + batch_size],
            guidance_scale=guidance_scale,
            generator=gens,
            output_type="pt",
            **kwargs,
        ).images
        out.append(images * 2 - 1)
    return torch.cat(out)


def generate_for(
    pipe,
    scenes: list[S.Scene],
    images_per_prompt: int,
    guidance_scale: float,
    seed: int,
    batch_size: int = 32,
    **kwargs,
) -> tuple[torch.Tensor, list[S.Scene]]:
    """Images (N, 3, H, W) in [-1, 1] for each scene's canonical caption, one fixed seed per image."""
    jobs = [(s, seed_of(seed, k)) for s in scenes for k in range(images_per_prompt)]
    prompts, seeds = [S.caption(s) for s, _ in jobs], [sd for _, sd in jobs]
    return generate(
        pipe, prompts, seeds=seeds, guidance_scale=guidance_scale, batch_size=batch_size, **kwargs
    ), [s for s, _ in jobs]


def score_named(judge: Judge, images: torch.Tensor, scenes: list[S.Scene], named: tuple[str, ...]) -> dict:
    """Accuracy of each attribute a prompt named, "named" (all of them right), "clean" (one confidently
    recognised shape whose colour differs from the background's: not a blob, not a half-drawn or colour-swapped
    picture), and "all" (named and clean)."""
    with torch.no_grad():
        logits = judge(images.to(judge.device, judge.dtype))
    pred = {a: v.argmax(-1).cpu() for a, v in logits.items()}
    right = {a: pred[a] == torch.tensor([s.labels()[a] for s in scenes]) for a in named}
    clean = (logits["shape"].float().softmax(-1).amax(-1).cpu() >= 0.9) & (
        pred["colour"] != pred["background"]
    )
    out = {a: r.float().mean().item() for a, r in right.items()}
    named_right = torch.stack(list(right.values())).all(0)
    out["named"] = named_right.float().mean().item()
    out["clean"] = clean.float().mean().item()
    out["all"] = (named_right & clean).float().mean().item()
    return out


def evaluate_styles(
    pipe,
    judge: Judge,
    images_per_prompt: int = 2,
    guidance_scale: float = 5.0,
    seed: int = 0,
    per_split: int = 20,
    **kwargs,
) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy per prompt style (gen.data.captions.STYLES) and split, judging only what each style names."""
    result: dict = {}
    for style in C.STYLES:
        rng = random.Random(f"{seed}/{style}")
        for split, scenes in eval_scenes(per_split).items():
            jobs = [(s, seed_of(seed, k)) for s in scenes for k in range(images_per_prompt)]
            prompts = [C.prompt(s, style, rng) for s, _ in jobs]
            images = generate(pipe, prompts, [sd for _, sd in jobs], guidance_scale, **kwargs)
            result.setdefault(style, {})[split] = score_named(
                judge, images, [s for s, _ in jobs], C.NAMED[style]
            )
    return result


# under-specified prompts (issue 25, item 6): what each names, and a scene holding it (the rest is not judged)
UNDER_SPECIFIED = {
    "a circle": (S.Scene("red", "circle", "white", "large", "centre"), ("shape",)),
    "a shape on a white background": (S.Scene("red", "circle", "white", "large", "centre"), ("background",)),
    "a red circle": (S.Scene("red", "circle", "white", "large", "centre"), ("colour", "shape")),
}


def probe(pipe, judge: Judge, seeds: int = 16, guidance_scale: float = 5.0, **kwargs) -> dict:
    """The README's first prompt over many seeds; for under-specified prompts, whether the pictures are valid (what
    the prompt names, drawn), clean (one confident shape, its colour not the background's), and how varied what
    it leaves open is (distinct values judged over the seeds)."""
    target = S.Scene("red", "circle", "blue", "large", "centre")
    images = generate(
        pipe, ["a red circle on a blue background"] * seeds, list(range(seeds)), guidance_scale, **kwargs
    )
    first = score_named(judge, images, [target] * seeds, ("colour", "shape", "background"))
    out: dict = {
        "a red circle on a blue background": f"right {round(first['named'] * seeds)}/{seeds}, right and clean"
        f" {round(first['all'] * seeds)}/{seeds}"
    }
    for text, (scene, named) in UNDER_SPECIFIED.items():
        images = generate(pipe, [text] * seeds, list(range(seeds)), guidance_scale, **kwargs)
        scored = score_named(judge, images, [scene] * seeds, named)
        with torch.no_grad():
            pred = judge.predict(images.to(judge.device))
        names = {a: [CLASSES[a][i] for i in pred[a].tolist()] for a in ("background", "colour", "shape")}
        out[text] = {
            "valid": f"{round(scored['named'] * seeds)}/{seeds}",
            "clean": f"{round(scored['clean'] * seeds)}/{seeds}",
            "distinct": {a: len(set(v)) for a, v in names.items() if a not in named},
        }
    return out


def evaluate(
    pipe,
    judge: Judge,
    images_per_prompt: int = 4,
    guidance_scale: float = 5.0,
    seed: int = 0,
    per_split: int = 20,
    clip: ClipScorer | None = None,
    **kwargs,
) -> EvalResult:
    """Generate every prompt of the fixed set `images_per_prompt` times and score the images."""
    result = EvalResult()
    for split, scenes in eval_scenes(per_split).items():
        images, judged = generate_for(
            pipe,
            scenes,
            images_per_prompt=images_per_prompt,
            guidance_scale=guidance_scale,
            seed=seed,
            **kwargs,
        )
        result.accuracy[split] = score(judge, images, judged)
        if clip is not None:
            result.clip_score[split] = clip.score(images, [S.caption(s) for s in judged])
        result.images += len(judged)
    return result


class ClipScorer:
    """CLIP score (100 x cosine similarity, floored at 0) from the tiny CLIP trained with the text encoder."""

    def __init__(self, folder: Path, text_encoder, tokenizer):
        from safetensors.torch import load_file
        from transformers import CLIPVisionModelWithProjection

        self.vision = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=torch.float32).eval()
        self.text_projection = load_file(str(Path(folder) / "text_projection.safetensors"))["weight"]
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    @torch.no_grad()
    def score(self, images: torch.Tensor, captions: list[str]) -> float:
        image_embeds = self.vision(pixel_values=images.float()).image_embeds.float().cpu()  # (B, P)
        ids = self.tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(ids.to(self.text_encoder.device)).pooler_output.float().cpu()  # (B, D)
        text_embeds = pooled @ self.text_projection.float().T  # (B, P)
        cos = nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        return (100 * cos.clamp(min=0)).mean().item()


def save_grid(
    pipe, path: Path, scenes: list[S.Scene], seeds: list[int], guidance_scale: float = 5.0, **kwargs
) -> Path:
    """A contact sheet: one row per prompt, one column per seed."""
    images, _ = generate_for(
        pipe, scenes, images_per_prompt=len(seeds), guidance_scale=guidance_scale, seed=seeds[0], **kwargs
    )  # (N, 3, H, W)
    pil = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(VaeImageProcessor.denormalize(images)))
    contact_sheet(pil, columns=len(seeds)).save(path)
    return path


def load_judged(
    model: str | Path | None, dtype: str = "fp32", device: str = "cpu", backend: str = "torch"
) -> tuple[Path, object, Judge]:
    """A shapes model folder's pipeline (run by `backend`: torch, or openvino) and its judge (on `device`, in
    torch)."""
    folder = model_folder(model)
    pipe = load_pipeline(folder, torch_dtype=DTYPES[dtype], device=device, backend=backend)
    if not (folder / "judge").is_dir():
        raise FileNotFoundError(f"{folder} has no judge/ folder; `gen eval` needs a shapes model folder")
    return folder, pipe, Judge.from_pretrained(folder / "judge").float().eval().to(device)


def evaluate_model(
    model: str | Path | None = None,
    images_per_prompt: int = 4,
    guidance_scale: float = 5.0,
    num_inference_steps: int = 20,
    seed: int = 0,
    grid: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    dtype: str = "fp32",
    guidance_interval: tuple[float, float] | None = None,
    no_cfg: bool = True,
    styles: bool = True,
    backend: str = "torch",
) -> dict:
    """The full evaluation of a shapes model folder (default: the embedded one): judge check, CFG on/off, prompt
    styles (template, short, minimal, paraphrased), the README's prompt over 16 seeds, grid. backend="openvino"
    measures the images OpenVINO makes (the judge stays torch fp32; the CLIP score reads the pipeline's text
    encoder, so it runs as the pipeline's does)."""
    import time

    folder, pipe, judge = load_judged(model, dtype, device, backend)
    report: dict = {"model": str(folder), "judge": judge_accuracy(judge.cpu(), count=500)}
    judge.to(device)
    clip = (
        ClipScorer(folder / "clip_vision", pipe.text_encoder, pipe.tokenizer)
        if (folder / "clip_vision").is_dir()
        else None
    )
    if clip is not None:
        clip.vision.to(device)
    common = dict(num_inference_steps=num_inference_steps, batch_size=batch_size)
    report["dtype"], report["backend"], report["guidance_interval"] = dtype, backend, guidance_interval
    settings = [(f"cfg {guidance_scale:g}", guidance_scale, {"guidance_interval": guidance_interval})]
    if no_cfg:
        settings.append(("no cfg", 1.0, {}))
    for name, scale, extra in settings:
        start = time.perf_counter()
        r = evaluate(
            pipe,
            judge,
            images_per_prompt=images_per_prompt,
            guidance_scale=scale,
            seed=seed,
            clip=clip,
            **common,
            **extra,
        )
        seconds = time.perf_counter() - start
        report[name] = {
            "accuracy": r.accuracy,
            "clip_score": r.clip_score,
            "images": r.images,
            "s_per_image": seconds / r.images,
        }
    if styles:
        report["styles"] = evaluate_styles(
            pipe,
            judge,
            images_per_prompt=images_per_prompt,
            guidance_scale=guidance_scale,
            seed=seed,
            **common,
        )
        report["probe"] = probe(pipe, judge, 16, guidance_scale, **common)
    if grid is not None:
        scenes = eval_scenes(8)
        save_grid(
            pipe,
            Path(grid),
            scenes=scenes["seen"][:4] + scenes["held-out"][:4],
            seeds=[seed_of(seed, k) for k in range(4)],
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
        )
        report["grid"] = str(grid)
    return report


def format_report(report: dict) -> str:
    """A table people can read: judge accuracy first, then per split x setting accuracies in percent."""
    cols = list(S.ATTRIBUTES) + ["all"]
    lines = [
        f"model: {report['model']}  dtype {report.get('dtype', 'fp32')}"
        f"  backend {report.get('backend', 'torch')}  guidance interval"
        f" {report.get('guidance_interval') or 'all steps'}",
        "judge accuracy on rendered ground truth (%):",
    ]
    for kind, acc in report["judge"].items():
        lines.append(f"  {kind:<6}" + "".join(f"{a} {100 * acc[a]:5.1f}  " for a in S.ATTRIBUTES))
    lines.append(
        f"{'setting':<10}{'split':<10}" + "".join(f"{c:>11}" for c in cols) + f"{'clip':>8}{'s/image':>9}"
    )
    for name, block in report.items():
        if not isinstance(block, dict) or "accuracy" not in block:
            continue
        for split, acc in block["accuracy"].items():
            clip = block["clip_score"].get(split)
            row = "".join(f"{100 * acc[c]:11.1f}" for c in cols)
            per_image = f"{block['s_per_image']:9.3f}" if "s_per_image" in block else ""
            lines.append(f"{name:<10}{split:<10}{row}{'' if clip is None else f'{clip:8.1f}'}{per_image}")
    if "styles" in report:
        lines += _format_styles(report["styles"], report["probe"])
    if "grid" in report:
        lines.append(f"grid: {report['grid']}")
    return "\n".join(lines)


def _format_styles(styles: dict, probes: dict) -> list[str]:
    cols = ["background", "colour", "shape", "size", "position", "named", "clean", "all"]
    lines = [
        "prompt styles (% right of what each names; 'named': all of it, 'all': that and a clean shape):",
        f"{'style':<13}{'split':<10}" + "".join(f"{c:>11}" for c in cols),
    ]
    for style, splits in styles.items():
        for split, acc in splits.items():
            row = "".join(f"{100 * acc[c]:11.1f}" if c in acc else f"{'-':>11}" for c in cols)
            lines.append(f"{style:<13}{split:<10}{row}")
    for text, value in probes.items():
        lines.append(f"{text!r}: {value}")
    return lines

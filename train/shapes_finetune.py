"""Fine-tune the shapes DiT fast on a CPU, with learning curves: python -m gen.train.shapes_finetune --out DIR

The shapes recipe's DiT stage (gen.train.shapes_dit) renders, VAE-encodes and embeds captions as it trains, and
learns the caption words the tiny CLIP never saw, so every step also runs the text encoder forward and backward.
This path starts from a finished shapes model (default: the embedded one) and does the fixed work once:

- renders `--images` training scenes (gen.data.shapes, the same (seed, index) -> image as the recipe);
- encodes each image's VAE posterior once (the recipe's latent mode trains on the posterior mean);
- draws `--captions-per-image` captions per image (gen.data.captions, mixed as `--caption-mix` says) and embeds
  each distinct caption once;

then trains the DiT on gen.train.trainer's loop (min-SNR, EMA, caption dropout, warm-up, checkpoints, resume), so a
step is the DiT's forward and backward and nothing else. With `--text-encoder-lr` above 0 the text encoder trains
too, at that rate, and captions are encoded every step (the CLIP is tiny). `--eval-at` scores the model (EMA
weights) with `gen eval`'s prompt styles at chosen steps: a learning curve in OUT/curve.json.

Written: OUT/transformer (and OUT/text_encoder when it trained), OUT/model (a complete model folder: the starting
model's parts with the new weights, and training_report.json), OUT/report.json, OUT/curve.json, OUT/train.log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gen.data import captions as C
from gen.data import shapes as S
from gen.evaluation import evaluate_styles
from gen.files import atomic_folder, atomic_write, atomic_write_text
from gen.loading.assets import DEFAULT_MODEL
from gen.loading.pipeline import load_pipeline
from gen.models.judge import Judge
from gen.pixels import to_model_range
from gen.text.encode import embed
from gen.train.common import TrainError, exit_on_train_error, parse_options, save_options
from gen.train.trainer import Trainer, TrainOptions

logger = logging.getLogger("gen.train.shapes_finetune")

# Words that name a size or a position in gen.data.captions' grammar (no colour or shape word is among them).
SIZE_OR_PLACE = {w for pair in C.SIZE_WORDS.values() for w in pair} | {
    w for p in S.POSITIONS for phrase in C.where_phrases(p) for w in phrase.split()
} - {"in", "the", "at"}
MIX_KINDS = ("grammar", "short", "minimal", "template")


@dataclass
class FinetuneOptions:
    out: Path = field(default=Path("runs/shapes-finetune"), metadata={"help": "run folder"})
    init_from: Path = field(
        default=DEFAULT_MODEL,
        metadata={"help": "shapes model folder to start from (its DiT, CLIP, VAE, judge)"},
    )
    images: int = field(default=20_000, metadata={"help": "training scenes rendered (and encoded) once"})
    data_seed: int = field(default=0, metadata={"help": "seed of the rendered scenes (the recipe's is 0)"})
    captions_per_image: int = field(default=4, metadata={"help": "fixed caption variants per image"})
    caption_mix: str = field(
        default="grammar:1",
        metadata={
            "help": "kind:weight,... of grammar (gen.data.captions as drawn), short (a grammar caption naming "
            "neither size nor position), minimal (nor the background) and template (every attribute, the one "
            "fixed phrasing)"
        },
    )
    object_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "how much a latent position in the box around the object counts in the loss against one "
            "of the background (1: all alike)"
        },
    )
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 1e-4
    lr_scheduler: str = field(
        default="constant_with_warmup", metadata={"help": "diffusers.optimization name"}
    )
    warmup: int = 50
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    ema_decay: float = field(default=0.999, metadata={"help": "0 turns EMA off"})
    text_encoder_lr: float = field(
        default=0.0, metadata={"help": "train the text encoder at this rate; 0 keeps it frozen (cached)"}
    )
    precision: str = field(
        default="auto",
        metadata={"help": "no, bf16 (autocast) or auto: bf16 on a GPU or a CPU with native bf16"},
    )
    seed: int = 0
    eval_at: str = field(default="", metadata={"help": "steps to evaluate at, e.g. 0,100,200,300"})
    eval_images_per_prompt: int = 2
    eval_steps: int = field(default=20, metadata={"help": "sampling steps of the evaluation"})
    eval_live: bool = field(
        default=False,
        metadata={"help": "at the last --eval-at step, score the live weights too (EMA on vs off)"},
    )
    max_minutes: float = 0.0
    checkpointing_steps: int = 0
    resume: str = field(default="", metadata={"help": "'latest' or a checkpoint folder"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    cache_dir: str = field(
        default="",
        metadata={
            "help": "keep the encoded latents (keyed on the scenes and the VAE) and caption embeddings (keyed on "
            "CLIP) here, for later runs and rounds"
        },
    )


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition(":")
        kind = kind.strip()
        if kind not in MIX_KINDS:
            raise TrainError(f"--caption-mix: {kind!r} must be one of {list(MIX_KINDS)}")
        try:
            mix[kind] = float(weight or 1)
        except ValueError:
            raise TrainError(f"--caption-mix: weight {weight!r} of {kind} is not a number") from None
    if not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise TrainError(f"--caption-mix {text!r}: weights must be >= 0 and not all 0")
    return mix


def names_size_or_place(text: str) -> bool:
    return any(w.strip(",") in SIZE_OR_PLACE for w in text.split())


def names_background(text: str, scene: S.Scene) -> bool:
    # A scene's object is never the background's colour, so its background's colour word names the background.
    return any(w.strip(",") == scene.background for w in text.split())


def draw_caption(scene: S.Scene, rng: random.Random, mix: dict[str, float]) -> str:
    """One caption of the mix. Every kind says only what the training grammar can say (the evaluation's
    paraphrases stay held out): short and minimal are grammar captions drawn until they leave out what the kind
    leaves out (~40 % of grammar captions are short, ~8 % minimal, as "a red circle" or "a circle in red")."""
    kind = rng.choices(list(mix), list(mix.values()))[0]
    if kind == "template":
        return C.canonical(scene)
    text = C.caption(scene, rng)
    while (kind in ("short", "minimal") and names_size_or_place(text)) or (
        kind == "minimal" and names_background(text, scene)
    ):
        text = C.caption(scene, rng)
    return text


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_precision(name: str) -> str:
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "no"


class Scenes:
    """The rendered scenes, in the Trainer's dataset protocol (their latents are cached before training)."""

    def __init__(self, images: torch.Tensor, scenes: list[S.Scene], captions: list[list[str]]):
        self.images, self.scenes, self.captions = images, scenes, captions

    def __len__(self) -> int:
        return len(self.scenes)

    def load(self, index: int, flip: bool = False) -> dict:
        return {"pixel_values": to_model_range(self.images[index])}  # (3, H, W)


def object_weights(scenes: list[S.Scene], side: int, weight: float) -> torch.Tensor:
    """(B, 1, side, side) loss weights: `weight` inside the square any shape of each scene's size and position fits
    in (gen.data.scenes.object_box), 1 elsewhere. Why: the shape, the attribute short prompts get wrong most, is
    the few edge pixels of an object that covers 4-24 % of an image of plain background, so an unweighted loss
    barely asks for it."""
    out = torch.ones(len(scenes), 1, side, side)
    for row, scene in zip(out, scenes, strict=True):
        # pad 0.02 at a 16-position side: the box holds all of the object in 998-999 of 1,000 renders and at
        # least 97 % of it in every one (unpadded, rounding leaves up to 10 % outside); it covers 18 % (small) /
        # 45 % (large) of the image.
        x0, y0, x1, y1 = S.object_box(scene, resolution=side, pad=0.02)
        row[:, y0:y1, x0:x1] = weight
    return out


def render_scenes(count: int, seed: int, per_image: int, mix: dict[str, float], resolution: int) -> Scenes:
    images, _, scenes = S.render_many(count, seed, "train", resolution)
    rng = random.Random(f"captions/{seed}")
    captions = [[draw_caption(s, rng, mix) for _ in range(per_image)] for s in scenes]
    return Scenes(torch.from_numpy(images), scenes, captions)


class FinetuneTrainer(Trainer):
    """gen.train.trainer's loop on cached latents and (frozen text encoder) cached caption embeddings."""

    def __init__(
        self,
        o: TrainOptions,
        pipe,
        data: Scenes,
        text_encoder_lr: float = 0.0,
        cache: tuple[Path, Path] | None = None,
        object_loss_weight: float = 1.0,
    ):
        self._pipe, self.data, self.text_encoder_lr, self.losses = pipe, data, text_encoder_lr, []
        self.object_loss_weight, self.latent_side = object_loss_weight, 0
        self.timings: dict[str, float] = {}
        super().__init__(o)
        self.fill_caches(cache)

    def load(self):
        return self._pipe

    def param_groups(self) -> list[dict]:
        if not self.text_encoder_trains():
            return super().param_groups()
        text = {id(p) for p in self.pipe.text_encoder.parameters()}
        return [
            {"params": [p for p in self.params if id(p) not in text]},
            {"params": [p for p in self.params if id(p) in text], "lr": self.text_encoder_lr},
        ]

    @torch.no_grad()
    def fill_caches(self, cache: tuple[Path, Path] | None = None, batch: int = 256) -> None:
        """Every image's posterior into the Trainer's latent cache, and every distinct caption's embedding into its
        text cache (when the text encoder is frozen), in large batches, once; with `cache` (cache_files), what
        an earlier run on the same scenes and parts encoded is read back instead."""
        start = time.perf_counter()
        vae, dev = self.pipe.vae, self.acc.device
        saved = cache[0] if cache else None
        if saved and saved.exists():
            moments = torch.load(saved, map_location=dev)
        else:
            parts = []
            for at in range(0, len(self.data), batch):
                idx = range(at, min(at + batch, len(self.data)))
                x = torch.stack([self.data.load(i)["pixel_values"] for i in idx]).to(dev)
                parts.append(vae.encode(x).latent_dist.parameters)  # (b, 2C, h, w): mean and log-variance
            moments = torch.cat(parts)
            if saved:
                _save_cache(moments.cpu(), saved)
        for i, m in enumerate(moments):
            self.latent_cache[(id(self.data), i, False)] = m
        self.latent_side = moments.shape[-1]
        self.timings["encode_images_s"] = round(time.perf_counter() - start, 1)
        if self.text_cache is None:
            return
        start = time.perf_counter()
        saved = cache[1] if cache else None
        known = torch.load(saved, map_location=dev) if saved and saved.exists() else {}
        distinct = sorted({c for row in self.data.captions for c in row})
        self.text_cache.update({c: known[c] for c in distinct if c in known})
        if "" in known:
            self.text_cache[""] = known[""]
        todo = [c for c in distinct if c not in self.text_cache]
        for at in range(0, len(todo), batch):
            chunk = todo[at : at + batch]
            rows, self.text_cache[""] = embed(self.pipe.tokenizer, self.text_model, chunk, dev)
            self.text_cache.update(zip(chunk, rows, strict=True))
        if saved and todo:
            _save_cache({k: v.cpu() for k, v in {**known, **self.text_cache}.items()}, saved)
        self.timings["embed_captions_s"] = round(time.perf_counter() - start, 1)
        self.timings["distinct_captions"] = len(distinct)
        self.timings["captions_embedded"] = len(todo)

    def next_batch(self) -> dict:
        items = self.items(self.data, self.take("data", self.data, self.o.batch_size))
        captions = [self.rng.choice(self.data.captions[i]) for _, i, _ in items]
        batch = {"items": items, "captions": self.dropped(captions)}
        if self.object_loss_weight != 1:
            scenes = [self.data.scenes[i] for _, i, _ in items]
            batch["pixel_weights"] = object_weights(scenes, self.latent_side, self.object_loss_weight).to(
                self.acc.device
            )
        return batch

    def train_step(self) -> float:
        loss = super().train_step()
        self.losses.append(loss)
        return loss

    def save(self) -> Path:
        with self.ema_weights():
            self.pipe.transformer.save_pretrained(self.out / "transformer")
            if self.text_encoder_trains():
                self.pipe.text_encoder.save_pretrained(self.out / "text_encoder")
        return self.out


class Curve:
    """gen eval's prompt styles at chosen steps, on the trainer's EMA weights, appended to OUT/curve.json."""

    def __init__(
        self,
        trainer: FinetuneTrainer,
        judge: Judge,
        at: set[int],
        images_per_prompt: int,
        steps: int,
        live: bool = False,
    ):
        self.trainer, self.judge, self.at, self.live = trainer, judge, at, live
        self.images_per_prompt, self.steps = images_per_prompt, steps
        self.path = trainer.out / "curve.json"
        self.points: list[dict] = json.loads(self.path.read_text()) if self.path.exists() else []

    def maybe(self) -> None:
        t = self.trainer
        if t.step not in self.at or any(p["step"] == t.step for p in self.points):
            return
        start = time.perf_counter()
        with t.ema_weights():
            styles = self.styles()
        point = {"step": t.step, "images_seen": t.step * t.o.batch_size, "styles": styles}
        point["summary"] = summarise(styles)
        if self.live and t.ema and t.step == max(self.at):
            point["live_styles"] = self.styles()
            point["live_summary"] = summarise(point["live_styles"])
            logger.info("live weights at step %d: %s", t.step, format_summary(point["live_summary"]))
        point["eval_s"] = round(time.perf_counter() - start, 1)
        self.points.append(point)
        atomic_write_text(self.path, json.dumps(self.points, indent=1))
        logger.info("eval at step %d: %s", t.step, format_summary(point["summary"]))

    def styles(self) -> dict:
        t = self.trainer
        denoiser, text = t.pipe.denoiser, t.pipe.text_encoder
        was = denoiser.training, text.training
        denoiser.eval(), text.eval()
        with torch.no_grad():
            styles = evaluate_styles(
                t.pipe,
                self.judge,
                images_per_prompt=self.images_per_prompt,
                num_inference_steps=self.steps,
                batch_size=64,
            )
        denoiser.train(was[0]), text.train(was[1])
        return styles


def summarise(styles: dict) -> dict:
    """Named-attribute accuracy (%) per style and split, and the mean of the four styles per split."""
    out = {
        s: {split: round(100 * r["named"], 1) for split, r in splits.items()} for s, splits in styles.items()
    }
    for split in ("seen", "held-out"):
        out.setdefault("mean", {})[split] = round(sum(out[s][split] for s in C.STYLES) / len(C.STYLES), 1)
    return out


def format_summary(summary: dict) -> str:
    return "  ".join(f"{k} {v['seen']:.0f}/{v['held-out']:.0f}" for k, v in summary.items())


# What a resumed run may change: how long it runs, where it writes and caches, how it is evaluated, its threads
# and precision (another machine). Everything else defines the data, the objective or the optimizer, and a run
# that changed one of them half-way would be neither recipe, while its report named only the second.
RESUMABLE_CHANGES = frozenset(
    {"out", "steps", "max_minutes", "checkpointing_steps", "resume", "threads", "precision", "cache_dir"}
    | {"eval_at", "eval_images_per_prompt", "eval_steps", "eval_live"}
)


def check_resume(o: FinetuneOptions) -> None:
    """Refuse, in one line, a --resume whose flags differ from the run's own train_config.json in anything but
    RESUMABLE_CHANGES."""
    if not o.resume:
        return
    run = o.out if o.resume == "latest" else Path(o.resume).parent  # OUT/checkpoint-N's OUT
    path = run / "train_config.json"
    if not path.is_file():
        return  # the Trainer says what is missing
    saved = json.loads(path.read_text())
    for key, value in vars(o).items():
        old = saved.get(key, FinetuneOptions.__dataclass_fields__[key].default)
        if isinstance(value, Path):  # "./model" and "model" are one folder
            same = Path(old).resolve() == value.resolve()
        else:
            same = str(old) == str(value)  # JSON's numbers read back as the floats they were written from
        if key not in RESUMABLE_CHANGES and not same:
            flag = "--" + key.replace("_", "-")
            raise TrainError(
                f"--resume: {flag} {value!r} differs from the run's {old!r} (in {path}); give the same"
            )


def cache_files(o: FinetuneOptions, resolution: int) -> tuple[Path, Path] | None:
    """The latent and caption-embedding cache files under CACHE_DIR. Latents change only with the scenes and the
    VAE, embeddings only with the text encoder and tokenizer: keying each on its own parts' bytes lets the next
    round (a new DiT, the same VAE) read the latents back instead of spending minutes re-encoding them."""
    if not o.cache_dir:
        return None
    scenes = f"scenes-{o.data_seed}-{o.images}-{resolution}"
    folder = Path(o.cache_dir)
    latents = folder / f"{scenes}-vae-{_digest(Path(o.init_from), 'vae')}-latents.pt"
    return latents, folder / f"text-{_digest(Path(o.init_from), 'text_encoder', 'tokenizer')}.pt"


def _digest(model: Path, *parts: str) -> str:
    files = sorted(p for part in parts for p in (model / part).rglob("*") if p.is_file())
    if not files:  # an empty key would let every model lacking these parts share one cache file
        raise TrainError(f"--init-from {model}: no files in {' or '.join(parts)}/ to key the cache on")
    sha = hashlib.sha256()
    for f in files:
        sha.update(f"{f.relative_to(model)}\n".encode())
        sha.update(f.read_bytes())
    return sha.hexdigest()[:12]


def _save_cache(obj, path: Path) -> None:
    # Two arms started together fill the same cache: each writes whole files, never half of one. The caption file
    # is read, added to and rewritten, so two such runs may drop each other's additions (re-embedded next time).
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return (
        f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()})"
    )


def write_model(o: FinetuneOptions, report: dict) -> Path:
    """OUT/model: the starting model folder with this run's transformer (and text encoder)."""

    def write(tmp: Path) -> None:
        shutil.copytree(o.init_from, tmp, dirs_exist_ok=True)
        for name in ("transformer", "text_encoder"):
            if (o.out / name).is_dir():
                shutil.rmtree(tmp / name)
                shutil.copytree(o.out / name, tmp / name)
        base = Path(o.init_from) / "training_report.json"
        if base.exists():
            report["init_from_report"] = json.loads(base.read_text())
        atomic_write_text(tmp / "training_report.json", json.dumps(report, indent=2))

    return atomic_folder(o.out / "model", write, overwrite=True)


@exit_on_train_error
def main(argv: list[str] | None = None) -> None:
    o = parse_options(FinetuneOptions, argv, __doc__)
    if o.threads:
        torch.set_num_threads(o.threads)
    mix = parse_mix(o.caption_mix)
    if not (math.isfinite(o.object_loss_weight) and o.object_loss_weight > 0):
        raise TrainError(
            f"--object-loss-weight {o.object_loss_weight}: must be a number above 0 (1: no emphasis)"
        )
    check_resume(o)
    o.out.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(), logging.FileHandler(o.out / "train.log")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", handlers=handlers)
    save_options(o, o.out)
    t0 = time.perf_counter()
    pipe = load_pipeline(o.init_from)
    pipe.set_progress_bar_config(disable=True)
    resolution = pipe.vae.config.sample_size
    data = render_scenes(o.images, o.data_seed, o.captions_per_image, mix, resolution)
    render_s = time.perf_counter() - t0
    print(f"rendered {len(data)} scenes in {render_s:.1f}s")
    options = TrainOptions(
        output_dir=str(o.out),
        resolution=resolution,
        batch_size=o.batch_size,
        max_steps=o.steps,
        learning_rate=o.learning_rate,
        lr_scheduler=o.lr_scheduler,
        lr_warmup_steps=o.warmup,
        mixed_precision=pick_precision(o.precision),
        train_text_encoder=o.text_encoder_lr > 0,
        caption_dropout=o.caption_dropout,
        min_snr_gamma=o.min_snr_gamma,
        ema_decay=o.ema_decay,
        cache_latents=True,
        latent_mode=True,
        cache_text=o.text_encoder_lr <= 0,
        seed=o.seed,
        max_minutes=o.max_minutes,
        checkpointing_steps=o.checkpointing_steps,
        checkpoints_total_limit=1,
        resume=o.resume,
    )
    trainer = FinetuneTrainer(
        options, pipe, data, o.text_encoder_lr, cache_files(o, resolution), o.object_loss_weight
    )
    print(f"caches: {trainer.timings}")
    at = {int(s) for s in o.eval_at.split(",") if s.strip()}
    curve = None
    if at:
        judge = Judge.from_pretrained(Path(o.init_from) / "judge").float().eval()
        curve = Curve(trainer, judge, at, o.eval_images_per_prompt, o.eval_steps, o.eval_live)
        trainer.every_step = curve.maybe
        curve.maybe()  # step 0 (skipped when resuming past it)
    # Train time only: the curve's evaluations are taken out of the images/s figure.
    started = time.perf_counter()
    trainer.run()
    seconds = (
        time.perf_counter() - started - sum(p["eval_s"] for p in (curve.points if curve else []) if p["step"])
    )
    images = trainer.images_seen
    losses = trainer.losses[-50:]
    report = {
        "command": " ".join(["python -m gen.train.shapes_finetune", *sys.argv[1:]]),
        "device": _device_name(),
        "precision": options.mixed_precision,
        "options": {k: str(v) for k, v in vars(o).items()},
        "steps": trainer.step,
        "images_seen": trainer.step * o.batch_size,
        "train_images_per_second": round(images / max(seconds, 1e-9), 1),
        "render_s": round(render_s, 1),
        "caches": trainer.timings,
        "final_loss": sum(losses) / max(len(losses), 1),
        "curve": [
            {k: p[k] for k in ("step", "images_seen", "summary", "live_summary") if k in p}
            for p in (curve.points if curve else [])
        ],
    }
    atomic_write_text(o.out / "report.json", json.dumps(report, indent=2))
    model = write_model(o, report)
    print(f"{report['images_seen']} images at {report['train_images_per_second']} images/s; model: {model}")
    if curve:
        for p in curve.points:
            print(f"step {p['step']:>6}: {format_summary(p['summary'])}")


if __name__ == "__main__":
    main()

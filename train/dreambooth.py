"""DreamBooth: teach a pipeline a subject from a handful of pictures (Ruiz et al., "DreamBooth", CVPR 2023).
gen's models, SD 1.x/2.x/SDXL, and SD3 and Flux folders (flow matching: gen.train.flow).

    python -m gen.train.dreambooth --instance-dir my-dog/ --instance-prompt "a photo of sks dog" \\
        --class-prompt "a photo of a dog" --with-prior-preservation --lora --output-dir runs/dog
    accelerate launch -m gen.train.dreambooth ...   # the same, on every GPU accelerate is configured for

Every batch pairs instance images (captioned with the instance prompt) with as many class images (each captioned
with the prompt it was drawn with: its own .txt, or else the class prompt); the class loss, weighted by
--prior-loss-weight, keeps what the model drew for the class before. Class images the class folder lacks are
generated first with the base model. With --lora only peft adapters train (on the denoiser's --lora-targets, and
on the text encoder's attention with --train-text-encoder); the result is OUTPUT/pytorch_lora_weights.safetensors, read by
`pipe.load_lora_weights` here and in diffusers. Without --lora the whole denoiser (and text encoder) trains and
OUTPUT/model is a pipeline folder.

The tuning flags a run leaves out (--rank, --lora-targets, --learning-rate, --min-snr-gamma, --train-identifier,
--identifier-learning-rate) come from a recipe for the base model (RECIPES): LoRA on gen's own DiT gets the one
measured on the embedded model (round 3), everything else the generic one. The log says which values were filled in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from gen.data.folders import ImageCaptionFolder
from gen.files import atomic_write, atomic_write_text
from gen.loading.assets import DEFAULT_MODEL
from gen.train.common import TrainError, exit_on_train_error, parse_options, save_options
from gen.train.trainer import Trainer, TrainOptions

logger = logging.getLogger("gen.train.dreambooth")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, so `load_lora_weights(OUTPUT)` finds it
EMBEDDINGS_FILE = "pytorch_lora_weights_emb.safetensors"  # the identifier's embedding, next to the LoRA


@dataclass
class Options(TrainOptions):
    output_dir: str = "runs/dreambooth"
    max_steps: int = 400
    caption_dropout: float = field(default=0.0, metadata={"help": "share of captions replaced by ''"})
    instance_dir: str = field(default="", metadata={"help": "the subject's pictures (a few are enough)"})
    instance_prompt: str = field(default="", metadata={"help": "e.g. 'a photo of sks dog'"})
    class_prompt: str = field(default="", metadata={"help": "e.g. 'a photo of a dog'"})
    class_prompts: str = field(
        default="",
        metadata={
            "help": "a text file of class prompts, one a line: class images are drawn round-robin from them, each"
            " captioned by its own prompt (--class-prompt then captions only class images without a caption)"
        },
    )
    class_dir: str = field(default="", metadata={"help": "class images (default: OUTPUT/class_images)"})
    num_class_images: int = 100
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    sample_batch_size: int = field(default=16, metadata={"help": "batch for generating class images"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters instead of the whole model"})
    rank: int | None = field(
        default=None, metadata={"help": "LoRA rank (default: the model's recipe, below)"}
    )
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA scale numerator (default: the rank)"})
    lora_targets: str | None = field(
        default=None, metadata={"help": "denoiser modules to adapt (default: the model's recipe)"}
    )
    text_encoder_lora_targets: str = "q_proj,k_proj,v_proj,out_proj"
    train_identifier: str | None = field(
        default=None,
        metadata={
            "help": "a word of the instance prompt (e.g. sks) whose token embedding also learns (pivotal tuning);"
            " '' for none (default: the model's recipe)"
        },
    )
    identifier_learning_rate: float | None = field(
        default=None, metadata={"help": "its own rate (default: the model's recipe; 0: --learning-rate)"}
    )
    learning_rate: float | None = field(default=None, metadata={"help": "(default: the model's recipe)"})
    min_snr_gamma: float | None = field(
        default=None, metadata={"help": "min-SNR loss weighting, 0 for none (default: the model's recipe)"}
    )


@dataclass(frozen=True)
class Recipe:
    """What the tuning flags a run leaves out are, for one kind of base model."""

    rank: int
    lora_targets: str
    learning_rate: float
    min_snr_gamma: float
    identifier_learning_rate: float
    # Learn the instance prompt's one word that no class prompt has (DreamBooth's "sks").
    learns_identifier: bool = False


# The Options a recipe fills when a run leaves them out (None).
TUNING_FLAGS = (
    "rank",
    "lora_targets",
    "learning_rate",
    "min_snr_gamma",
    "identifier_learning_rate",
    "train_identifier",
)


RECIPES = {
    # LoRA on gen's own DiT, measured on the embedded 6.3 M-parameter model (README, "DreamBooth"): with the
    # generic recipe below it drew an unseen shape in 9 % of images; adapters at 1e-3 with the identifier's
    # embedding learned drew it in 39-61 %, and neither change alone did. With prior preservation, on the MLPs
    # alone they draw it as often as on self-attention and MLPs and cost the base model's adherence less (7.5
    # points against 10.6, round-3 model); without it less than half as often (16 % against 41 %).
    "gen-dit": Recipe(
        rank=4,
        lora_targets="mlp.0,mlp.2",
        learning_rate=1e-3,
        min_snr_gamma=5.0,
        identifier_learning_rate=1e-2,
        learns_identifier=True,
    ),
    # UNets, SD3/Flux and full fine-tunes: adapters on every attention at 1e-4. 1e-3 on every MLP of a model
    # 100x larger is not a safe default, and SD3/Flux read prompts through T5, so no CLIP identifier.
    "generic": Recipe(
        rank=8,
        lora_targets="to_q,to_k,to_v,to_out.0",
        learning_rate=1e-4,
        min_snr_gamma=0.0,
        identifier_learning_rate=0.0,
    ),
}


def recipe_name(o: Options) -> str:
    """ "gen-dit" for LoRA on a folder whose denoiser is gen's DiT (the embedded model's kind), else "generic"."""
    folder = Path(o.model) if o.model else DEFAULT_MODEL
    try:
        spec = json.loads((folder / "model_index.json").read_text()).get("transformer") or [None]
    except (OSError, ValueError, AttributeError):  # a single file, or no index: the loader says what is wrong
        return "generic"
    return "gen-dit" if o.lora and spec[0] == "gen.models.dit" else "generic"


def with_recipe(o: Options) -> Options:
    """`o` with every tuning flag it left out (None) filled in, the choice logged: from the run's own
    train_config.json when it resumes (the checkpoint was made with those), else from its model's recipe."""
    left_out = [k for k in TUNING_FLAGS if getattr(o, k) is None]
    if not left_out:
        return o
    saved = _saved_config(o)
    if saved:
        filled = {k: saved[k] for k in left_out}
        source = "the train_config.json of the run it resumes"
    else:
        name = recipe_name(o)
        recipe = RECIPES[name]
        filled = {k: getattr(recipe, k) for k in left_out if k != "train_identifier"}
        if "train_identifier" in left_out:
            filled["train_identifier"] = identifier(o) if recipe.learns_identifier else ""
        source = f"the {name} recipe"
    shown = " ".join(f"--{k.replace('_', '-')} {v!r}" for k, v in filled.items())
    logger.info("flags not given, from %s: %s", source, shown)
    return dataclasses.replace(o, **filled)


def _saved_config(o: Options) -> dict | None:
    """The tuning flags of the run --resume continues, if its train_config.json has them all."""
    if not o.resume:
        return None
    run = Path(o.output_dir) if o.resume == "latest" else Path(o.resume).parent  # OUT/checkpoint-N's OUT
    path = run / "train_config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        return None
    return saved if all(saved.get(k) is not None for k in TUNING_FLAGS) else None


def words(text: str) -> list[str]:
    """A prompt's words as CLIP's tokenizer splits them (its pre-tokenizer's pattern, casefolded), punctuation
    left out: "A photo of Sks, dog." -> a, photo, of, sks, dog; "sks_dog" and "sks2" are two words each."""
    return [w for w in re.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d", text.casefold()) if w.isalnum()]


def identifier(o: Options) -> str:
    """The one word of the instance prompt that no class prompt has ("sks" in "a photo of sks dog" against "a
    photo of a dog"), or "" (said in a warning) when there is no class prompt or not exactly one such word."""
    if o.cache_text:
        logger.warning(
            "no identifier learned: --cache-text keeps the text encoder, and its embeddings, frozen"
        )
        return ""
    known = set(words(o.class_prompt))
    if o.class_prompts:
        known |= {w for p in class_prompts(o) for w in words(p)}
    if not known:
        logger.warning("no class prompt to find the identifier by: pass --train-identifier WORD to learn one")
        return ""
    new = list(dict.fromkeys(w for w in words(o.instance_prompt) if w not in known))
    if len(new) != 1:
        logger.warning(
            "the instance prompt has %d words the class prompt lacks (%s): no identifier learned; pass"
            " --train-identifier WORD to choose one",
            len(new),
            ", ".join(new) or "none",
        )
        return ""
    if _known_word(o, new[0]):
        logger.warning(
            "%r, the instance prompt's word the class prompt lacks, is a word the tokenizer has, so its learned"
            " embedding would not load with the LoRA: no identifier learned; name a rare one (e.g. sks)",
            new[0],
        )
        return ""
    return new[0]


def _known_word(o: Options, word: str) -> bool:
    """Whether the model's tokenizer has `word` (then gen.pipelines' LoRA loader keeps the word's own embedding)."""
    from transformers import CLIPTokenizer

    try:
        vocab = CLIPTokenizer.from_pretrained(Path(o.model or DEFAULT_MODEL) / "tokenizer").get_vocab()
    except (OSError, ValueError):
        return False
    return word in vocab


class DreamBoothTrainer(Trainer):
    def __init__(self, o: Options):
        self.instances = ImageCaptionFolder(o.instance_dir, o.resolution, caption=o.instance_prompt)
        # main() has filled the recipe in (with_recipe returns such options as they are); code may not have
        super().__init__(with_recipe(o))

    def prepare_models(self) -> None:
        o = self.o
        if o.train_identifier and getattr(self.pipe, "is_flow", False):
            raise TrainError("--train-identifier learns a CLIP token; SD3/Flux read prompts through T5 too")
        if o.with_prior_preservation:
            self.classes = self._class_images()  # with the base model, before anything trains
        if not o.lora:
            super().prepare_models()
            if o.train_identifier:
                self._learn_identifier()
            return
        from peft import LoraConfig

        def config(targets: str) -> LoraConfig:
            return LoraConfig(
                r=o.rank,
                lora_alpha=o.lora_alpha or o.rank,
                init_lora_weights="gaussian",
                target_modules=[t.strip() for t in targets.split(",") if t.strip()],
            )

        self.pipe.denoiser.requires_grad_(False).add_adapter(config(o.lora_targets))
        self.pipe.denoiser.train()
        if o.train_text_encoder:
            self.pipe.text_encoder.add_adapter(config(o.text_encoder_lora_targets))
            self.pipe.text_encoder.train()
        if o.train_identifier:  # after the adapters: peft's add_adapter freezes every non-adapter parameter
            self._learn_identifier()
        if o.gradient_checkpointing:
            self.pipe.denoiser.enable_gradient_checkpointing()

    def text_encoder_trains(self) -> bool:
        return self.o.train_text_encoder or bool(self.o.train_identifier)

    def _learn_identifier(self) -> None:
        self.identifier_ids = self.pipe.tokenizer(self.o.train_identifier, add_special_tokens=False).input_ids
        self.learn_tokens(self.identifier_ids)

    def param_groups(self) -> list[dict]:
        if not (self.o.train_identifier and self.o.identifier_learning_rate):
            return super().param_groups()
        table = self.pipe.text_encoder.get_input_embeddings().weight
        rest = [p for p in self.params if p is not table]
        return [{"params": rest}, {"params": [table], "lr": self.o.identifier_learning_rate}]

    def _class_images(self) -> ImageCaptionFolder:
        o = self.o
        folder = Path(o.class_dir) if o.class_dir else self.out / "class_images"
        if self.acc.is_main_process:
            generate_class_images(
                self.pipe,
                class_prompts(o),
                folder=folder,
                count=o.num_class_images,
                batch_size=o.sample_batch_size,
                seed=o.seed,
                # SD3/Flux default to 1024 pixels: the class images at the training resolution instead
                size=o.resolution if getattr(self.pipe, "is_flow", False) else None,
            )
        self.acc.wait_for_everyone()
        # A class image keeps the caption it was drawn (or captioned) with -- a .txt beside it, as kohya's
        # regularisation folders have -- so prior preservation holds the base model to what each prompt gave;
        # --class-prompt captions the ones without.
        classes = ImageCaptionFolder(folder, o.resolution, fallback_caption=o.class_prompt)
        bare = sum(1 for _, text in classes.items if not text)
        if bare:  # an empty caption would train the unconditional branch on them, silently
            raise TrainError(
                f"{bare} class image(s) in {folder} have no caption (a .txt beside it or a metadata.jsonl line);"
                " pass --class-prompt to caption them"
            )
        logger.info("%d class images, %d distinct captions", len(classes), len({t for _, t in classes.items}))
        return classes

    def next_batch(self) -> dict:
        o, b = self.o, self.o.batch_size
        items = self.items(self.instances, self.take("instance", self.instances, b))
        captions = [o.instance_prompt] * b
        weights = None
        if o.with_prior_preservation:
            picks = self.take("class", self.classes, b)
            items += self.items(self.classes, picks)
            captions += [self.classes.items[i][1] for i in picks]
            # loss = mean over instance images + prior_loss_weight * mean over class images
            weights = torch.tensor([2.0] * b + [2.0 * o.prior_loss_weight] * b, device=self.acc.device)
        return {"items": items, "captions": self.dropped(captions), "weights": weights}

    def save(self) -> Path:
        if not self.o.lora:
            return super().save()
        with self.ema_weights():
            if self.o.train_identifier:  # a textual-inversion file: `pipe.load_textual_inversion` reads it
                rows = self.pipe.text_encoder.get_input_embeddings().weight[self.identifier_ids]  # (n, D)
                state = {self.o.train_identifier: rows.detach().contiguous()}
                with atomic_write(self.out / EMBEDDINGS_FILE) as tmp:
                    save_file(state, str(tmp))
            return self.pipe.save_lora_weights(self.out / LORA_FILE)


@torch.no_grad()
def generate_class_images(
    pipe,
    prompts: str | list[str],
    folder: Path,
    count: int,
    batch_size: int,
    seed: int,
    size: int | None = None,
) -> None:
    """Fill `folder` up to `count` images from the base model, image n of prompts[n % len(prompts)] with one seed
    per image and its prompt in a .txt beside it, each written atomically (an interrupted run keeps the finished
    ones and generates only the rest next time)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    from tqdm.auto import tqdm

    from gen.data.folders import IMAGE_SUFFIXES

    folder.mkdir(parents=True, exist_ok=True)
    have = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if have >= count:
        return
    # The first free numbers: an image already in the folder is never overwritten.
    missing, n = [], 0
    while len(missing) < count - have:
        if not (folder / f"class-{n:05d}.png").exists():
            missing.append(n)
        n += 1
    shown = repr(prompts[0]) if len(prompts) == 1 else f"{len(prompts)} prompts"
    logger.info("generating %d class images of %s into %s", len(missing), shown, folder)
    progress = tqdm(total=len(missing), desc="class images", unit="image")
    pipe.set_progress_bar_config(disable=True)  # one bar over all images, not one per batch
    for start in range(0, len(missing), batch_size):
        numbers = missing[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed * 100_003 + n) for n in numbers]
        sized = {} if size is None else {"height": size, "width": size}
        texts = [prompts[n % len(prompts)] for n in numbers]
        images = pipe(texts, generator=gens, **sized).images
        for n, image, text in zip(numbers, images, texts, strict=True):
            # The caption first: a crash between the two leaves no image without its caption.
            atomic_write_text(folder / f"class-{n:05d}.txt", text + "\n")
            with atomic_write(folder / f"class-{n:05d}.png") as tmp:
                image.save(tmp, format="PNG")
        progress.update(len(numbers))
    progress.close()
    pipe.set_progress_bar_config(disable=False)


def check(o: Options) -> Options:
    """One-line errors for options that cannot work, before anything loads; `o` with its recipe filled in."""
    _check_prompts(o)  # first: the recipe reads the class prompts to find the identifier
    filled = with_recipe(o)
    found = o.train_identifier is None and filled.train_identifier  # the class prompt named it
    if (o.class_prompt or o.class_prompts) and not (o.with_prior_preservation or found):
        logger.warning("--class-prompt(s) unused: they caption class images, with --with-prior-preservation")
    o = filled
    _check_identifier(o)
    if o.rank < 1:
        raise TrainError(f"--rank {o.rank}: must be at least 1")
    out = Path(o.output_dir)
    result = out / (LORA_FILE if o.lora else "model")
    if result.exists() and not (o.overwrite or o.resume):
        raise TrainError(f"{result} exists; pass --overwrite, or --resume latest to continue")
    return o


def _check_prompts(o: Options) -> None:
    """The subject's pictures and prompt, and the class prompt that prior preservation needs."""
    if not o.instance_dir or not o.instance_prompt:
        raise TrainError(
            "--instance-dir and --instance-prompt are required (the subject's pictures and their prompt)"
        )
    if o.with_prior_preservation and not (o.class_prompt or o.class_prompts):
        raise TrainError(
            "--with-prior-preservation needs --class-prompt (e.g. 'a photo of a dog') or --class-prompts FILE"
        )
    if o.class_prompts and o.with_prior_preservation:
        class_prompts(o)  # the file's errors now, not after the model loads


def class_prompts(o: Options) -> list[str]:
    """--class-prompts' lines (blank ones skipped), or [--class-prompt]."""
    if not o.class_prompts:
        return [o.class_prompt]
    path = Path(o.class_prompts)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(
            f"--class-prompts {o.class_prompts!r}: cannot read it as a UTF-8 text file of prompts, one a line ({e})"
        ) from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise TrainError(f"--class-prompts {o.class_prompts!r} has no prompts (one a line)")
    return prompts


def _check_identifier(o: Options) -> None:
    # Only the identifier's embedding row learns, so it must be a word of the prompt, and a text encoder that
    # trains whole (no LoRA) would learn it anyway.
    named = o.train_identifier in o.instance_prompt.split() or o.train_identifier.casefold() in words(
        o.instance_prompt
    )
    if o.train_identifier and not named:
        raise TrainError(
            f"--train-identifier {o.train_identifier!r} is not a word of --instance-prompt {o.instance_prompt!r}"
        )
    if o.train_identifier and o.train_text_encoder and not o.lora:
        raise TrainError(
            "--train-identifier is part of --train-text-encoder without --lora (the whole text encoder trains)"
        )


@exit_on_train_error
def main(argv: list[str] | None = None) -> Path:
    o = parse_options(Options, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    o = check(o)
    save_options(o, Path(o.output_dir))
    return DreamBoothTrainer(o).run()


if __name__ == "__main__":
    main()

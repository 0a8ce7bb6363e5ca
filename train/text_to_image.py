"""Train a text-to-image denoiser on an image-caption folder: fine-tune a pipeline folder (gen's or SD-layout), or
train a fresh DiT preset on its VAE and text encoder.

    accelerate launch -m gen.train.text_to_image --data-dir photos/ --output-dir runs/mine --max-steps 1000
    python -m gen.train.text_to_image --data-dir photos/ --from-scratch shapes --resume latest ...

The loop, checkpoints and options every script shares are gen.train.trainer's; this file adds the data folder,
training from scratch and --save-every.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from gen.data.folders import ImageCaptionFolder
from gen.models import dit_from_preset
from gen.train.common import exit_on_train_error, parse_options, save_options
from gen.train.trainer import Trainer, TrainOptions

logger = logging.getLogger("gen.train.text_to_image")


@dataclass
class Options(TrainOptions):
    output_dir: str = "runs/text_to_image"
    data_dir: str = field(
        default="", metadata={"help": "image-caption folder (images + .txt or metadata.jsonl)"}
    )
    from_scratch: str = field(default="", metadata={"help": "train a fresh DiT of this preset instead"})
    save_every: int = field(default=0, metadata={"help": "also write a pipeline folder every N steps"})


class TextToImageTrainer(Trainer):
    def __init__(self, o: Options):
        self.data = ImageCaptionFolder(o.data_dir, o.resolution)
        super().__init__(o)

    def prepare_models(self) -> None:
        if self.o.from_scratch:
            self.pipe.transformer, self.pipe.unet = self._fresh_dit(), None
        super().prepare_models()

    def _fresh_dit(self):
        latent = self.o.resolution // self.pipe.vae_scale_factor
        return dit_from_preset(
            self.o.from_scratch,
            sample_size=latent,
            in_channels=self.pipe.vae.config.latent_channels,
            cross_attention_dim=self.pipe.text_encoder.config.hidden_size,
        )

    def next_batch(self) -> dict:
        items = self.items(self.data, self.take("data", self.data, self.o.batch_size))
        captions = self.dropped([self.data.items[i][1] for _, i, _ in items])
        return {"items": items, "captions": captions}

    def every_step(self) -> None:
        if self.o.save_every and self.step % self.o.save_every == 0 and self.acc.is_main_process:
            self.save_pipeline(self.out / f"model-{self.step}")


@exit_on_train_error
def main(argv: list[str] | None = None) -> Path:
    o = parse_options(Options, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(o.output_dir)
    if not o.data_dir:
        raise SystemExit("--data-dir is required: a folder of images with .txt captions or metadata.jsonl")
    if (out / "model").exists() and not (o.overwrite or o.resume):
        raise SystemExit(f"{out / 'model'} exists; pass --overwrite, or --resume latest to continue")
    save_options(o, out)
    return TextToImageTrainer(o).run()


if __name__ == "__main__":
    main()

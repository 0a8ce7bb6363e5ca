"""The shapes recipe's DiT stage on gen.train.trainer.Trainer: the one training loop (EMA, warm-up, caption
dropout, min-SNR, latent caching, bf16, checkpoints and resume) that every gen training script shares.

What it adds: the rendered images held in memory, a fresh caption for every image every time it is drawn (the
caption grammar of gen.data.captions, so one picture is seen under many phrasings), and the token embeddings of
caption words the text encoder never saw (their rows were pruned to zero when the tiny CLIP was made) learning
with the DiT.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gen.data import captions as C
from gen.data import shapes as S
from gen.pixels import to_model_range
from gen.train.trainer import Trainer, TrainOptions

logger = logging.getLogger("gen.train.shapes")


class RenderedShapes:
    """Rendered training images (N, H, W, 3) uint8 and their scenes, in the Trainer's dataset protocol."""

    def __init__(self, images: torch.Tensor, scenes: list[S.Scene]):
        self.images, self.scenes = images, scenes

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int, flip: bool = False) -> dict:
        # No flips: left and right are part of the captions.
        return {"pixel_values": to_model_range(self.images[index])}  # (3, H, W)


class ShapesDiTTrainer(Trainer):
    def __init__(self, o: TrainOptions, pipe, data: RenderedShapes, token_lr: float = 0.0):
        self._pipe, self.data, self.losses, self.token_lr = pipe, data, [], token_lr
        super().__init__(o)

    def param_groups(self) -> list[dict]:
        """New words start from zero: their rows may learn faster than the DiT (`token_lr`)."""
        if not (self.token_lr and self.frozen_rows is not None):
            return super().param_groups()
        table = self.pipe.text_encoder.get_input_embeddings().weight
        return [
            {"params": [p for p in self.params if p is not table]},
            {"params": [table], "lr": self.token_lr},
        ]

    def train_step(self) -> float:
        loss = super().train_step()
        self.losses.append(loss)
        return loss

    def load(self):
        return self._pipe

    def prepare_models(self) -> None:
        super().prepare_models()
        unseen = unseen_word_ids(self.pipe.tokenizer, self.pipe.text_encoder)
        if unseen:
            logger.info(
                "learning the embeddings of %d caption tokens the text encoder never saw", len(unseen)
            )
            self.learn_tokens(unseen)

    def text_encoder_trains(self) -> bool:
        return self.frozen_rows is not None or super().text_encoder_trains()

    def next_batch(self) -> dict:
        items = self.items(self.data, self.take("data", self.data, self.o.batch_size))
        captions = [C.caption(self.data.scenes[i], self.rng) for _, i, _ in items]
        return {"items": items, "captions": self.dropped(captions)}

    def save(self) -> Path:
        with self.ema_weights():
            self.pipe.transformer.save_pretrained(self.out / "transformer")
            self.pipe.text_encoder.save_pretrained(self.out / "text_encoder")
        self.scheduler.save_pretrained(self.out / "scheduler")
        return self.out


def unseen_word_ids(tokenizer, text_encoder) -> list[int]:
    """Token ids of caption words whose embedding row is all zero (pruned: never in the CLIP's training)."""
    table = text_encoder.get_input_embeddings().weight
    ids = {i for w in C.vocabulary() for i in tokenizer(w, add_special_tokens=False).input_ids}
    return sorted(i for i in ids if not bool(table[i].any()))

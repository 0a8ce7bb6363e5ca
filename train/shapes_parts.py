"""The embedded model's components other than the denoiser: a tiny CLIP (text encoder + vision tower, trained
contrastively), the VAE, and the judge. Each trains for a time budget on rendered shapes held in memory."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionModelWithProjection

from gen.data import shapes as S
from gen.data.captions import vocabulary
from gen.models.judge import CLASSES, Judge, corrupt, judge_accuracy, to_tensor
from gen.pixels import to_model_range

logger = logging.getLogger(__name__)


@dataclass
class Data:
    """Rendered training images (N, H, W, 3) uint8, their captions tokenised (N, L), and scenes."""

    images: torch.Tensor
    ids: torch.Tensor
    scenes: list[S.Scene]

    def batch(
        self, size: int, device: torch.device, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.images), (size,), generator=g)
        x = to_model_range(self.images[idx].to(device, non_blocking=True))  # (B, 3, H, W)
        return x, self.ids[idx].to(device), idx


def render_data(
    count: int, seed: int, resolution: int, tokenizer, workers: int, split: str = "train"
) -> Data:
    images, captions, scenes = S.render_many(count, seed, split, resolution, workers=workers)
    tok = tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    )
    return Data(torch.from_numpy(images), tok.input_ids, scenes)


def timed_steps(minutes: float, max_steps: int, desc: str) -> Iterator[int]:
    """Yield step numbers until the time budget or the step cap runs out, with a progress bar."""
    end = time.monotonic() + minutes * 60
    with tqdm(total=max_steps, desc=desc, mininterval=5, disable=None) as bar:
        for step in range(max_steps):
            if time.monotonic() > end:
                logger.info("%s: time budget of %.1f min reached at step %d", desc, minutes, step)
                return
            yield step
            bar.update()


def clipped_step(opt: torch.optim.Optimizer, loss: torch.Tensor, model: nn.Module) -> None:
    """Backward, clip the gradient norm to 1, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' constant_with_warmup, started one step in (last_epoch=0, from each group's initial_lr): step k
    (from 0) runs at lr * min(1, (k + 1) / warmup), so the first step already learns. Step it after the optimizer."""
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup, last_epoch=0)


# -- CLIP --------------------------------------------------------------------------------------------------------
def make_clip(tokenizer, resolution: int, text_hidden: int = 64) -> CLIPModel:
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=4 * text_hidden,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=resolution,
        patch_size=8,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def train_clip(
    clip: CLIPModel, data: Data, device, minutes: float, max_steps: int, batch: int, lr: float, seed: int
) -> None:
    clip.to(device).train()
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.1)
    schedule = warmup_schedule(opt, 200)
    g = torch.Generator().manual_seed(seed)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for step in timed_steps(minutes, max_steps, "clip"):
        x, ids, _ = data.batch(batch, device, g)
        with amp:
            loss = clip(input_ids=ids, pixel_values=x, return_loss=True).loss
        clipped_step(opt, loss, clip)
        schedule.step()
        if step % 500 == 0:
            logger.info("clip step %d loss %.4f", step, loss.item())
    clip.eval()


@torch.no_grad()
def clip_zero_shot(clip: CLIPModel, tokenizer, device, count: int = 400, seed: int = 99) -> dict[str, float]:
    """Zero-shot accuracy on held-out renders: for each attribute, pick the caption that varies only it."""
    images, _, scenes = S.render_many(count, seed, "heldout", clip.config.vision_config.image_size)
    x = to_tensor(images).to(device)
    image_embeds = image_features(clip, x)  # (N, P)
    result = {}
    for attr in ("background", "colour", "shape", "size", "position"):
        options = list(S.SHAPES) if attr == "shape" else CLASSES[attr]
        captions, owners, picks = [], [], []
        for i, scene in enumerate(scenes):
            for o in options:
                if attr == "background" and o == scene.colour:
                    continue  # never a valid scene
                captions.append(S.caption(S.Scene(**{**scene.__dict__, attr: o})))
                owners.append(i)
                picks.append(o)
        ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids.to(
            device
        )
        text = torch.cat([text_features(clip, c) for c in ids.split(512)])  # (K, P)
        sims = (text * image_embeds[torch.tensor(owners, device=device)]).sum(-1).cpu()  # (K,)
        best: dict[int, tuple[float, str]] = {}
        for owner, sim, pick in zip(owners, sims.tolist(), picks, strict=True):
            if owner not in best or sim > best[owner][0]:
                best[owner] = (sim, pick)
        result[attr] = sum(best[i][1] == getattr(sc, attr) for i, sc in enumerate(scenes)) / len(scenes)
    return result


def image_features(clip: CLIPModel, x: torch.Tensor) -> torch.Tensor:
    # Spelled out: get_image_features returns a tensor in transformers 4 and an output object in 5.
    pooled = clip.vision_model(pixel_values=x).pooler_output  # (B, D_vision)
    return nn.functional.normalize(clip.visual_projection(pooled), dim=-1)  # (B, P)


def text_features(clip: CLIPModel, ids: torch.Tensor) -> torch.Tensor:
    pooled = clip.text_model(input_ids=ids).pooler_output  # (B, D_text)
    return nn.functional.normalize(clip.text_projection(pooled), dim=-1)  # (B, P)


def split_clip(clip: CLIPModel) -> tuple[CLIPTextModel, CLIPVisionModelWithProjection, torch.Tensor]:
    """The pipeline's text encoder, the evaluator's vision tower, and the text projection, as standalone models."""
    text = CLIPTextModel(clip.config.text_config)
    getattr(text, "text_model", text).load_state_dict(
        clip.text_model.state_dict()
    )  # nested in 4.x, flat in 5
    vision_config = clip.config.vision_config
    vision_config.projection_dim = clip.config.projection_dim
    vision = CLIPVisionModelWithProjection(vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return text.eval(), vision.eval(), clip.text_projection.weight.detach().clone()


def used_token_ids(tokenizer) -> torch.Tensor:
    """Every token id the caption grammar can produce (plus specials), to keep when pruning the embedding."""
    words = vocabulary()
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for w in words:
        ids.update(tokenizer(w, add_special_tokens=False).input_ids)
    return torch.tensor(sorted(ids))


def prune_embeddings(text_encoder: CLIPTextModel, keep: torch.Tensor) -> None:
    """Zero embedding rows of tokens the model never saw: they carry only random init, and zeros compress."""
    table = text_encoder.get_input_embeddings().weight
    mask = torch.ones(table.shape[0], dtype=torch.bool)
    mask[keep] = False
    with torch.no_grad():
        table[mask.to(table.device)] = 0


# -- VAE ---------------------------------------------------------------------------------------------------------
def make_vae(resolution: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16,
        sample_size=resolution,
    )


def train_vae(
    vae: AutoencoderKL, data: Data, device, minutes: float, max_steps: int, batch: int, lr: float, seed: int
) -> None:
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = warmup_schedule(opt, 100)
    g = torch.Generator().manual_seed(seed)
    for step in timed_steps(minutes, max_steps, "vae"):
        x, _, _ = data.batch(batch, device, g)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # L1 keeps edges sharper than L2 alone; a tiny KL keeps the latent space smooth and bounded.
        loss = (recon - x).abs().mean() + (recon - x).square().mean() + 1e-6 * posterior.kl().mean()
        clipped_step(opt, loss, vae)
        schedule.step()
        if step % 500 == 0:
            logger.info("vae step %d loss %.4f", step, loss.item())
    vae.eval()


@torch.no_grad()
def vae_report(vae: AutoencoderKL, device, count: int = 512, seed: int = 98) -> dict[str, float]:
    """PSNR on held-out renders, and the latent std that sets scaling_factor."""
    images, _, _ = S.render_many(count, seed, "heldout", vae.config.sample_size)
    x = to_tensor(images).to(device)
    latents = torch.cat([vae.encode(c).latent_dist.mode() for c in x.split(128)])
    recon = torch.cat([vae.decode(c).sample for c in latents.split(128)]).clamp(-1, 1)
    mse = ((recon - x) / 2).square().mean(dim=(1, 2, 3))  # on [0, 1]
    return {"psnr": (-10 * torch.log10(mse)).mean().item(), "latent_std": latents.std().item()}


# -- judge -------------------------------------------------------------------------------------------------------
def train_judge(
    judge: Judge,
    resolution: int,
    device,
    minutes: float,
    max_steps: int,
    batch: int,
    seed: int,
    count: int,
    workers: int,
) -> None:
    """Train on every shape (base and extra) with blur/noise augmentation, so generated images are judged fairly."""
    images, _, scenes = S.render_many(
        count, seed, "all", resolution, shapes=S.SHAPES + S.EXTRA_SHAPES, workers=workers
    )
    x_all = torch.from_numpy(images)
    labels = {a: torch.tensor([s.labels()[a] for s in scenes]) for a in S.ATTRIBUTES}
    judge.to(device).train()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=max_steps)
    g = torch.Generator().manual_seed(seed)
    kinds = ("clean", "blur", "noise")
    for step in timed_steps(minutes, max_steps, "judge"):
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        x = to_model_range(x_all[idx].to(device))  # (B, 3, H, W)
        x = corrupt(x, kinds[step % 3], None)
        logits = judge(x)
        loss = sum(nn.functional.cross_entropy(logits[a], labels[a][idx].to(device)) for a in S.ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:  # cosine decay over the step cap, from the third step (the first two run at the full rate)
            schedule.step()
    judge.eval()


def judge_report(judge: Judge) -> dict[str, dict[str, float]]:
    return judge_accuracy(judge.cpu().float(), count=1000)

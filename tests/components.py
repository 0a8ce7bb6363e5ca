"""Tiny real components built in code (no hub): a CLIP tokenizer with a small BPE vocab, CLIP text encoder,
AutoencoderKL, UNet2DConditionModel and our DiT. Shared by the tests and the examples' smoke test."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gen.models import DiT
from gen.pipelines import TextToImagePipeline
from gen.train.clip_tokenizer import bytes_to_unicode

WORDS = (
    "a an the of on in with and photo painting red green blue white black yellow orange purple circle square "
    "triangle star cross cat dog background large small top left right bottom centre sks shape"
).split()


def write_tokenizer(folder: Path, length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer whose BPE knows WORDS as single tokens; everything else falls back to characters."""
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=length)


def text_encoder(tokenizer: CLIPTokenizer, hidden: int = 32, positions: int = 77) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()


def unet(cross_dim: int = 32, in_channels: int = 4) -> UNet2DConditionModel:
    """A tiny UNet; in_channels=9 is the SD-inpainting layout (latents, mask, masked-image latents)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim,
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()


def dit(cross_dim: int = 32, randomize: bool = True) -> DiT:
    """A tiny DiT. randomize=True perturbs the zero-initialised layers so outputs are not trivially zero."""
    torch.manual_seed(0)
    model = DiT(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=cross_dim,
    )
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def pipeline(tokenizer: CLIPTokenizer, denoiser: str = "transformer", scheduler=None) -> TextToImagePipeline:
    """A tiny pipeline; the text encoder's context is the tokenizer's model_max_length."""
    scheduler = scheduler or DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    net = dit() if denoiser == "transformer" else unet()
    pipe = TextToImagePipeline(
        vae=vae(),
        text_encoder=text_encoder(tokenizer, positions=tokenizer.model_max_length),
        tokenizer=tokenizer,
        scheduler=scheduler,
        **{denoiser: net},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def accelerate_launch(module: str, processes: int = 2) -> list[str]:
    """The command line that runs `python -m module` in `processes` CPU processes (torchrun, gloo)."""
    import sys

    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        module,
    ]


# The tiny SDXL UNet's text_time settings (a ControlNet for it copies them)
XL_UNET = {
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "cross_attention_dim": 32 + 48,
}


def sdxl_pipeline(folder: Path, scheduler=None, denoiser_kwargs: dict | None = None):
    """Tiny SDXL parts as diffusers' fast SDXL tests build them: two CLIP encoders (the second with a projection,
    its tokenizer padding with "!" as SDXL's does), a "text_time" UNet taking both encoders' hidden states."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    from gen.pipelines import TextToImagePipeline

    tokenizer = write_tokenizer(folder / "tokenizer")
    tokenizer_2 = CLIPTokenizer(
        str(folder / "tokenizer" / "vocab.json"),
        str(folder / "tokenizer" / "merges.txt"),
        pad_token="!",
        model_max_length=77,
    )
    encoder = text_encoder(tokenizer)
    torch.manual_seed(1)
    # A width of its own, as SDXL's (1280 vs 768): diffusers' single-file loader tells the encoders apart by it.
    config = encoder.config.to_dict() | {"projection_dim": 32, "hidden_size": 48}
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **XL_UNET,
        norm_num_groups=4,
        **(denoiser_kwargs or {}),
    ).eval()
    scheduler = scheduler or EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    pipe = TextToImagePipeline(
        vae=vae(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        text_encoder_2=encoder_2,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stable_diffusion_xl(pipe):
    """diffusers' StableDiffusionXLPipeline on the same components (no watermark)."""
    from diffusers import StableDiffusionXLPipeline

    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    sd = StableDiffusionXLPipeline(**{k: getattr(pipe, k) for k in names}, add_watermarker=False)
    sd.set_progress_bar_config(disable=True)
    return sd

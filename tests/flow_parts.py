"""Tiny SD3 and Flux components built in code, shaped as diffusers' own fast tests build them, with tokenizers
made offline (diffusers' tests fetch hf-internal-testing/tiny-random-t5, not available here): a CLIP BPE vocab
(tests.components.write_tokenizer) and a T5 unigram vocab of whole words."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from tests.components import WORDS, write_tokenizer

T5_WIDTH = 48  # d_model: wider than the two CLIPs side by side (2 x 16), as SD3's T5 is (4096 > 768 + 1280)


def t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer whose unigram vocab knows WORDS whole; other text falls back to letters."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    letters = [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789()[]:.,"]
    return T5Tokenizer(vocab=specials + [("▁" + w, -1.0) for w in WORDS] + letters, extra_ids=0)


def t5_encoder(tokenizer: T5Tokenizer, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def clip_encoder(tokenizer, projection: bool, seed: int, hidden: int = 16):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def flow_vae(latent_channels: int) -> AutoencoderKL:
    """diffusers' fast tests' VAE: one block (factor 1), SD3's scaling and shift."""
    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()


def sd3_parts(
    folder: Path, scheduler=None, t5: bool = True, channels: int = 4, clip_g_width: int = 16
) -> dict:
    """The components of a tiny SD3: two CLIPs with projections, T5 (or None), a 2-layer SD3 transformer on
    `channels` latent channels (SD3's own: 16). `clip_g_width` other than CLIP-L's 16 tells the two apart by
    their shapes, as SD3's real 768 and 1280 do."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=16 + clip_g_width,
        out_channels=channels,
    ).eval()
    tokenizer = write_tokenizer(folder / "clip")
    tokenizer_3 = t5_tokenizer()
    return {
        "transformer": transformer,
        "scheduler": scheduler or FlowMatchEulerDiscreteScheduler(),
        "vae": flow_vae(channels),
        "text_encoder": clip_encoder(tokenizer, True, seed=1),
        "tokenizer": tokenizer,
        "text_encoder_2": clip_encoder(tokenizer, True, seed=2, hidden=clip_g_width),
        "tokenizer_2": tokenizer,
        "text_encoder_3": t5_encoder(tokenizer_3) if t5 else None,
        "tokenizer_3": tokenizer_3 if t5 else None,
    }


def flux_parts(folder: Path, scheduler=None, guidance_embeds: bool = True) -> dict:
    """The components of a tiny Flux: CLIP (pooled), T5, a 1+1-layer Flux transformer; guidance_embeds=False is
    schnell's layout."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=16,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    ).eval()
    tokenizer = write_tokenizer(folder / "clip")
    tokenizer_2 = t5_tokenizer()
    return {
        "scheduler": scheduler or FlowMatchEulerDiscreteScheduler(),
        "vae": flow_vae(1),
        "text_encoder": clip_encoder(tokenizer, False, seed=1),
        "tokenizer": tokenizer,
        "text_encoder_2": t5_encoder(tokenizer_2),
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
    }

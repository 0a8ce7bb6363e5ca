"""SDXL in gen's pipelines: two CLIP encoders whose penultimate hidden states are concatenated, the second one's
pooled embedding, and size/crop micro-conditioning (`add_time_ids`), passed to a UNet whose
`addition_embed_type` is "text_time". The same task pipelines take SD 1.x/2.x and SDXL components: a pipeline
is SDXL when it has `text_encoder_2`.

Prompts keep A1111's semantics on both encoders (weights, BREAK, chunks of any length; see gen.text.encode.
embed_sdxl). Where gen differs from diffusers' StableDiffusionXLPipeline: `clip_skip` applies to the negative
prompt too (diffusers reads the negative's penultimate layer whatever clip_skip says), and prompts longer than
one window are chunked rather than truncated; for prompts of one window the images are diffusers'.
`clip_skip` may also be a pair, one value (or None) per encoder; -1 reads the last layer. A1111 ignores Clip skip on
SDXL unless its sdxl_clip_l_skip setting is on, and then reads the first encoder's layer alone; the CLI and the
server turn A1111's number into that pair (gen.generation.clip_skip).
"""

from __future__ import annotations

import torch

from gen.pipelines.prompting import TextContext
from gen.text.encode import embed_sdxl, pad_chunks


def _listed(value, batch: int) -> list:
    return list(value) if isinstance(value, list) else [value] * batch


class SDXLMixin:
    @property
    def is_sdxl(self) -> bool:
        return (
            getattr(self, "text_encoder_2", None) is not None
            or getattr(self, "tokenizer_2", None) is not None
        )

    def _encode_text_xl(
        self,
        prompt,
        device,
        cfg: bool,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        xl: dict,
        **opts,
    ) -> TextContext:
        """Prompts and negatives through both encoders in one call each; each prompt and its negative padded to
        their own chunk count, then all to the batch's longest (as for one encoder). An absent negative prompt
        is zeros when the model's config says force_zeros_for_empty_prompt, as SDXL was trained."""
        pooled, negative_pooled = xl.get("pooled_prompt_embeds"), xl.get("negative_pooled_prompt_embeds")
        if prompt_embeds is not None and pooled is None:
            raise ValueError("SDXL needs pooled_prompt_embeds with prompt_embeds (from encode_prompt)")
        if cfg and negative_prompt_embeds is not None and negative_pooled is None:
            raise ValueError("SDXL needs negative_pooled_prompt_embeds with negative_prompt_embeds")
        prompts = (
            None if prompt_embeds is not None else _listed(prompt, 1) if isinstance(prompt, str) else prompt
        )
        batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        zero = cfg and negative_prompt_embeds is None and negative_prompt is None
        zero = zero and bool(self.config.get("force_zeros_for_empty_prompt", True))
        texts: tuple[list, list] = ([], [])
        if prompts is not None:
            second = xl.get("prompt_2") or prompt
            texts = (list(prompts), _listed(second, batch) if isinstance(second, str) else list(second))
        if cfg and negative_prompt_embeds is None and not zero:
            negatives = _listed(negative_prompt or "", batch)
            negatives_2 = _listed(xl.get("negative_prompt_2") or negative_prompt or "", batch)
            texts = (texts[0] + negatives, texts[1] + negatives_2)
        rows, empty, pooled_rows, _ = embed_sdxl(
            (self.tokenizer, self.tokenizer_2),
            (self.text_encoder, self.text_encoder_2),
            [self.maybe_convert_prompt(p, self.tokenizer) for p in texts[0]],
            [self.maybe_convert_prompt(p, self.tokenizer_2) for p in texts[1]],
            device,
            **opts,
        )
        pos = rows[:batch] if prompts is not None else list(prompt_embeds)
        pooled = pooled_rows[:batch] if prompts is not None else pooled
        neg, neg_pooled = [], None
        if cfg and not zero:
            given = negative_prompt_embeds is not None
            neg = list(negative_prompt_embeds) if given else rows[-batch:]
            neg_pooled = negative_pooled if given else pooled_rows[-batch:]
        return self._xl_context(pos, neg, pooled, neg_pooled, empty, cfg, zero, device)

    def _xl_context(self, pos, neg, pooled, neg_pooled, empty, cfg: bool, zero: bool, device) -> TextContext:
        length = empty.shape[0]
        own = [max(r.shape[0] for r in pair) // length for pair in zip(pos, neg or pos, strict=True)]
        k = max(own)
        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.denoiser.dtype
        prompt_embeds = pad_chunks(pos, k, empty).to(device=device, dtype=dtype)
        pooled = pooled.to(device=device, dtype=dtype)
        negative = negative_pooled = None
        if cfg:
            negative = (
                torch.zeros_like(prompt_embeds) if zero else pad_chunks(neg, k, empty).to(device, dtype)
            )
            negative_pooled = torch.zeros_like(pooled) if zero else neg_pooled.to(device=device, dtype=dtype)
        chunks = own if min(own) < k else None
        return TextContext(prompt_embeds, negative, chunks, pooled, negative_pooled)

    def _add_time_ids(
        self,
        text: TextContext,
        height: int,
        width: int,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
    ) -> None:
        """SDXL's micro-conditioning, (original size, crop top-left, target size) per row, as
        StableDiffusionXLPipeline builds it; the negatives' own only when both their sizes are given."""
        if not self.is_sdxl:
            return
        original, target = original_size or (height, width), target_size or (height, width)
        ids = self._time_ids(original, crops_coords_top_left, target, text)
        negative = ids
        if negative_original_size is not None and negative_target_size is not None:
            negative = self._time_ids(
                negative_original_size, negative_crops_coords_top_left, negative_target_size, text
            )
        rows = text.prompt_embeds.shape[0]
        text.time_ids = ids.repeat(rows, 1)
        text.negative_time_ids = negative.repeat(rows, 1) if text.negative_prompt_embeds is not None else None

    def _time_ids(self, original, crops, target, text: TextContext) -> torch.Tensor:
        values = [*original, *crops, *target]
        projection = (
            self.text_encoder_2.config.projection_dim
            if self.text_encoder_2 is not None
            else int(text.pooled.shape[-1])
        )
        unet = self.denoiser.config
        expected = getattr(self.denoiser, "add_embedding", None)
        passed = unet.addition_time_embed_dim * len(values) + projection
        if expected is not None and expected.linear_1.in_features != passed:
            raise ValueError(
                f"the UNet's added embedding takes {expected.linear_1.in_features} features but the size"
                f" conditioning and pooled text give {passed}: is addition_time_embed_dim"
                f" ({unet.addition_time_embed_dim}) right for text_encoder_2's projection_dim ({projection})?"
            )
        return torch.tensor([values], dtype=text.prompt_embeds.dtype, device=text.prompt_embeds.device)

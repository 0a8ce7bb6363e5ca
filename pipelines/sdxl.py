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

from gen.pipelines.prompting import TextContext, pad_pairs
from gen.text.encode import embed_sdxl


def _listed(value, batch: int) -> list:
    return list(value) if isinstance(value, list) else [value] * batch


def _check_pooled(cfg: bool, prompt_embeds, negative_prompt_embeds, xl: dict) -> None:
    # SDXL's UNet also takes the second encoder's pooled embedding, which a sequence embedding does not hold.
    if prompt_embeds is not None and xl.get("pooled_prompt_embeds") is None:
        raise ValueError("SDXL needs pooled_prompt_embeds with prompt_embeds (from encode_prompt)")
    if cfg and negative_prompt_embeds is not None and xl.get("negative_pooled_prompt_embeds") is None:
        raise ValueError("SDXL needs negative_pooled_prompt_embeds with negative_prompt_embeds")


def _prompt_texts(prompts: list[str] | None, prompt, xl: dict, batch: int) -> tuple[list, list]:
    """The prompts each encoder reads: the second reads prompt_2 where given, else the same prompts."""
    if prompts is None:
        return [], []
    second = xl.get("prompt_2") or prompt
    return list(prompts), _listed(second, batch) if isinstance(second, str) else list(second)


def _negative_texts(negative_prompt, xl: dict, batch: int) -> tuple[list, list]:
    """The negatives each encoder reads ("" where none is given): negative_prompt_2 for the second, if given."""
    negatives = _listed(negative_prompt or "", batch)
    negatives_2 = _listed(xl.get("negative_prompt_2") or negative_prompt or "", batch)
    return negatives, negatives_2


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
        _check_pooled(cfg, prompt_embeds, negative_prompt_embeds, xl)
        prompts = (
            None if prompt_embeds is not None else _listed(prompt, 1) if isinstance(prompt, str) else prompt
        )
        batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        zero = self._zero_negative(cfg, negative_prompt, negative_prompt_embeds)
        texts = _prompt_texts(prompts, prompt, xl, batch)
        if cfg and negative_prompt_embeds is None and not zero:
            negatives = _negative_texts(negative_prompt, xl, batch)
            texts = (texts[0] + negatives[0], texts[1] + negatives[1])
        rows, empty, pooled_rows, _ = embed_sdxl(
            (self.tokenizer, self.tokenizer_2),
            (self.text_encoder, self.text_encoder_2),
            [self.maybe_convert_prompt(p, self.tokenizer) for p in texts[0]],
            [self.maybe_convert_prompt(p, self.tokenizer_2) for p in texts[1]],
            device,
            **opts,
        )
        # The prompts' rows come first and the negatives' last; given embeddings stand in for either.
        pos, pooled = (
            (rows[:batch], pooled_rows[:batch])
            if prompts is not None
            else (list(prompt_embeds), xl.get("pooled_prompt_embeds"))
        )
        neg = neg_pooled = None
        if cfg and not zero:
            neg, neg_pooled = (
                (rows[-batch:], pooled_rows[-batch:])
                if negative_prompt_embeds is None
                else (list(negative_prompt_embeds), xl.get("negative_pooled_prompt_embeds"))
            )
        return self._xl_context(pos, neg, pooled, neg_pooled, empty, cfg, device)

    def _zero_negative(self, cfg: bool, negative_prompt, negative_prompt_embeds) -> bool:
        """Whether the negative is zeros rather than the empty prompt's embedding: SDXL's config says so for an
        absent negative prompt (force_zeros_for_empty_prompt, True unless set)."""
        zero = cfg and negative_prompt_embeds is None and negative_prompt is None
        return zero and bool(self.config.get("force_zeros_for_empty_prompt", True))

    def _xl_context(self, pos, neg, pooled, neg_pooled, empty, cfg: bool, device) -> TextContext:
        """The padded batches (see pad_pairs); with CFG and no negative to pad (`neg` None), zeros."""
        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.denoiser.dtype
        prompt_embeds, negative, chunks = pad_pairs(pos, neg, empty, device, dtype)
        pooled = pooled.to(device=device, dtype=dtype)
        negative_pooled = None
        if cfg:
            zero = neg is None
            negative = torch.zeros_like(prompt_embeds) if zero else negative
            negative_pooled = torch.zeros_like(pooled) if zero else neg_pooled.to(device=device, dtype=dtype)
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

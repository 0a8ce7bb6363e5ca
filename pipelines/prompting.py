"""Prompt encoding for gen's pipelines: prompts and negatives through the text encoder in one call, each pair
padded to its own chunk count, and the record of each prompt's own count that keeps its image independent of
longer batch-mates (see LatentDiffusionPipeline._denoise)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gen.pipelines.checks import check_clip_skip
from gen.text.encode import ClipSkip, embed, pad_chunks


@dataclass
class TextContext:
    """The text side of one call: (B, L*K, D) embeddings, and each prompt's own chunk count where some prompt
    needs fewer than K (None when every prompt uses all K)."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    chunks: list[int] | None = None
    # SDXL: the second encoder's pooled embedding (B, P) and the size conditioning (B, 6) of each row
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    negative_time_ids: torch.Tensor | None = None

    def both(self) -> torch.Tensor:
        """The CFG batch's context: negatives first, (2B, L*K, D)."""
        return torch.cat([self.negative_prompt_embeds, self.prompt_embeds])

    def added(self, guided: bool) -> dict[str, torch.Tensor] | None:
        """SDXL's added conditioning for the UNet (`added_cond_kwargs`), rows as in both() or prompt_embeds."""
        if self.pooled is None:
            return None
        if not guided:
            return {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return {
            "text_embeds": torch.cat([self.negative_pooled, self.pooled]),
            "time_ids": torch.cat([self.negative_time_ids, self.time_ids]),
        }

    def rows(self, copies: int) -> list[int] | None:
        """Each row's own chunk count for a batch of `copies` x B rows (None: every row uses all K)."""
        return None if self.chunks is None else self.chunks * copies

    def repeat(self, n: int) -> TextContext:
        """Each prompt's entries n times in a row (num_images_per_prompt)."""

        def rep(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.repeat_interleave(n, 0)

        return TextContext(
            rep(self.prompt_embeds),
            rep(self.negative_prompt_embeds),
            None if self.chunks is None else [c for c in self.chunks for _ in range(n)],
            rep(self.pooled),
            rep(self.negative_pooled),
            rep(self.time_ids),
            rep(self.negative_time_ids),
        )


def pad_pairs(
    pos: list[torch.Tensor], neg: list[torch.Tensor] | None, empty: torch.Tensor, device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, list[int] | None]:
    """Prompts (K_i*L, D) each, and their negatives (None: no negatives to pad), as (B, K*L, D) batches: each
    prompt and its negative padded with the empty chunk to the longer one's count (as A1111 pads the negative),
    then all to the batch's longest K. Also each pair's own count where some pair needs fewer than K (None when
    every pair uses all K): the denoiser then sees each prompt at its own length (see _denoise)."""
    length = empty.shape[0]
    own = [max(r.shape[0] for r in pair) // length for pair in zip(pos, neg or pos, strict=True)]
    k = max(own)
    padded = pad_chunks(pos, k, empty).to(device=device, dtype=dtype)
    negative = None if neg is None else pad_chunks(neg, k, empty).to(device=device, dtype=dtype)
    return padded, negative, own if min(own) < k else None


def _prompt_list(prompt, prompt_embeds) -> list[str] | None:
    """The prompts as a list; None when embeddings are given in their place."""
    if prompt_embeds is not None:
        return None
    return [prompt] if isinstance(prompt, str) else list(prompt)


def _negative_list(cfg: bool, negative_prompt, negative_prompt_embeds, batch: int) -> list[str] | None:
    """The negative prompts to encode, "" where none is given; None without CFG or with their embeddings."""
    if not cfg or negative_prompt_embeds is not None:
        return None
    return negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * batch


def _check_whole_chunks(length: int, prompt_embeds, negative_prompt_embeds) -> None:
    # Given embeddings are padded with the empty chunk too, so they must be whole chunks of the encoder's length.
    given = [e for e in (prompt_embeds, negative_prompt_embeds) if e is not None]
    if any(e.shape[1] % length for e in given):
        raise ValueError(
            f"prompt_embeds of {given[0].shape[1]} tokens cannot be padded to whole {length}-token chunks;"
            " give negative_prompt_embeds too, of the same shape"
        )


class PromptEncodingMixin:
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: ClipSkip = None,
        truncate_long_prompts: bool = False,
        prompt_weighting: bool = True,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple:
        """Embeddings for the prompt and (with CFG) the negative prompt, repeated per image: (B*n, L*K, D).

        Prompts use A1111's syntax (weights, BREAK) and may be longer than the encoder's window of L tokens
        (77 for SD): every prompt is chunked, and all are padded to the same number of chunks K (see gen.text.encode).
        An SDXL pipeline also takes prompt_2, negative_prompt_2 and pooled embeddings and returns four
        tensors, as StableDiffusionXLPipeline.encode_prompt: the two above and the pooled ones (B*n, P).
        """
        check_clip_skip(self, clip_skip)  # __call__ checks it with its other inputs
        text = self._encode_text(
            prompt,
            device,
            cfg=do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip,
            truncate=truncate_long_prompts,
            weighting=prompt_weighting,
            xl={
                "prompt_2": prompt_2,
                "negative_prompt_2": negative_prompt_2,
                "pooled_prompt_embeds": pooled_prompt_embeds,
                "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
            },
        )
        text = text.repeat(num_images_per_prompt)
        # Named returns: diffusers' test mixins read these names to pass the results back into __call__.
        prompt_embeds, negative_prompt_embeds = text.prompt_embeds, text.negative_prompt_embeds
        if self.is_sdxl:
            pooled_prompt_embeds, negative_pooled_prompt_embeds = text.pooled, text.negative_pooled
            return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds
        return prompt_embeds, negative_prompt_embeds

    def _encode_text(
        self, prompt, device, cfg: bool, negative_prompt, prompt_embeds, negative_prompt_embeds, **opts
    ) -> TextContext:
        """Prompts and negatives in one text-encoder call, each pair padded to its own chunk count (as A1111 pads
        the negative), then all to the batch's longest; records each prompt's own count (see _denoise).
        SDXL pipelines (two encoders) take the `xl` arguments (prompt_2, pooled embeddings; see sdxl.py)."""
        xl = {k: v for k, v in (opts.pop("xl", None) or {}).items() if v is not None}
        if self.is_sdxl:
            return self._encode_text_xl(
                prompt, device, cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, xl, **opts
            )
        if xl:
            raise ValueError(
                f"{', '.join(sorted(xl))}: SDXL arguments, and this pipeline has no text_encoder_2"
            )
        return self._encode_text_sd(
            prompt, device, cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, **opts
        )

    def _encode_text_sd(
        self, prompt, device, cfg: bool, negative_prompt, prompt_embeds, negative_prompt_embeds, **opts
    ) -> TextContext:
        """_encode_text with one text encoder (SD 1.x/2.x, the DiT)."""
        prompts = _prompt_list(prompt, prompt_embeds)
        batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        negatives = _negative_list(cfg, negative_prompt, negative_prompt_embeds, batch)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.denoiser.dtype
        if prompts is None and negatives is None:  # embeddings given for everything
            negative = negative_prompt_embeds.to(device=device, dtype=dtype) if cfg else None
            return TextContext(prompt_embeds.to(device=device, dtype=dtype), negative)
        rows, empty = self._embed_unique([*(prompts or []), *(negatives or [])], device, **opts)
        _check_whole_chunks(empty.shape[0], prompt_embeds, negative_prompt_embeds if cfg else None)
        pos = list(prompt_embeds) if prompts is None else rows[:batch]  # (K_i*L, D) each
        neg = None
        if cfg:
            neg = list(negative_prompt_embeds) if negatives is None else rows[-batch:]
        return TextContext(*pad_pairs(pos, neg, empty, device, dtype))

    def _embed_unique(self, prompts: list[str], device: torch.device, **opts) -> tuple[list, torch.Tensor]:
        # Repeated prompts (the empty negative above all) are encoded once per call.
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "this pipeline has no text_encoder/tokenizer: give prompt_embeds (and negatives)"
            )
        converted = [
            self.maybe_convert_prompt(p, self.tokenizer) for p in prompts
        ]  # textual-inversion tokens
        unique = list(dict.fromkeys(converted))
        rows, empty = embed(self.tokenizer, self.text_encoder, unique, device, **opts)  # (K_u*L, D) each
        return [rows[unique.index(p)] for p in converted], empty

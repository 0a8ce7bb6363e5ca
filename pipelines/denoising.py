"""The guided denoising loop every task's pipeline shares: the denoiser on the step's batch (rows grouped by their
prompts' chunk counts), classifier-free guidance by the one formula (gen.diffusion.guidance), the scheduler's
step and diffusers' step-end callback."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from gen.diffusion.guidance import guidance
from gen.pipelines.prompting import TextContext


def _inside(step: int, total: int, interval: tuple[float, float] | None) -> bool:
    """Is this step inside the guidance interval (fractions of the schedule, start inclusive)?"""
    if interval is None:
        return True
    return interval[0] <= step / total < interval[1]


class DenoisingMixin:
    """The loop's steps, on a pipeline with a `denoiser`, a `scheduler` and the call's state (guidance_scale,
    interrupt, cross_attention_kwargs: see LatentDiffusionPipeline)."""

    def _step_kwargs(self, generator, eta: float) -> dict[str, Any]:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def _denoise(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        chunks: list[int] | None = None,
        added: dict[str, torch.Tensor] | None = None,
        rows: list[int] | None = None,
    ) -> torch.Tensor:
        """The denoiser on the step's batch (both denoisers share UNet2DConditionModel's calling convention);
        `rows`: which rows of the step's batch `x` holds (None: all of them, in order).

        With `chunks` (each row's own number of text chunks), rows of equal count run together with the
        batch's padding chunks cut off: attention would otherwise attend to them, and a prompt's image would
        depend on a longer prompt in its batch. Grouping rather than an attention mask keeps each row's
        computation the same as in a run of its own (a mask changes the attention kernel), for any denoiser."""
        if chunks is None:
            return self._denoiser_call(x, t, context, added, rows)
        length = context.shape[1] // max(chunks)
        out: list[torch.Tensor | None] = [None] * len(chunks)
        for k in sorted(set(chunks)):
            group = [i for i, c in enumerate(chunks) if c == k]
            part = None if added is None else {name: v[group] for name, v in added.items()}
            within = group if rows is None else [rows[i] for i in group]
            preds = self._denoise(x[group], t, context[group, : k * length], added=part, rows=within)
            for i, pred in zip(group, preds, strict=True):
                out[i] = pred
        return torch.stack(out)  # (rows, C, h, w)

    def _denoiser_call(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, added=None, rows=None, **extra
    ) -> torch.Tensor:
        """One call of the denoiser on `rows` of the step's batch; a task adds inputs through `extra` (ControlNet's
        residuals, gen.pipelines.controlnet)."""
        kw = {
            "cross_attention_kwargs": self.cross_attention_kwargs,
            **extra,
        }  # {"scale": s}: the LoRA's weight
        if added is not None:  # SDXL's pooled text and size conditioning
            kw["added_cond_kwargs"] = added
        return self.denoiser(x, t, encoder_hidden_states=context, return_dict=False, **kw)[0]

    def _denoising_loop(
        self,
        latents: torch.Tensor,  # (B, C, h, w)
        steps: torch.Tensor,
        text: TextContext,
        step_kwargs: dict,
        guidance_rescale: float,
        guidance_interval: tuple[float, float] | None,
        callback: Callable | None,
        tensor_inputs: list[str],
        condition: torch.Tensor | None = None,
        after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The guided loop. `condition` (B, c, h, w) is concatenated to the scaled latents as extra input
        channels (an inpainting denoiser's mask and masked image); `after_step(i, latents)` runs after each
        scheduler step, before the callback (inpainting's blend of the known region)."""
        cfg = self.do_classifier_free_guidance
        both = text.both() if cfg else None  # (2B, L*K, D), negatives first
        with self.progress_bar(total=len(steps)) as progress:
            for i, t in enumerate(steps):
                if self.interrupt:
                    break
                # Outside the guidance interval only the text branch runs: half the denoiser work.
                guided = cfg and _inside(i, len(steps), guidance_interval)
                self._step = (i, guided)  # where the loop is, for what a task adds to each denoiser call
                x_in = torch.cat([latents, latents]) if guided else latents  # (2B|B, C, h, w)
                x_in = self.scheduler.scale_model_input(x_in, t)
                if condition is not None:
                    x_in = torch.cat([x_in, torch.cat([condition] * (2 if guided else 1))], dim=1)
                if guided:
                    pred_uncond, pred_text = self._denoise(
                        x_in, t, both, text.rows(2), text.added(True)
                    ).chunk(2)
                    pred = guidance(pred_uncond, pred_text, self.guidance_scale, guidance_rescale)
                else:
                    pred = self._denoise(x_in, t, text.prompt_embeds, text.rows(1), text.added(False))
                latents = self.scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
                if after_step is not None:
                    latents = after_step(i, latents)
                if callback is not None:
                    latents = self._callback(
                        callback, i, t=t, latents=latents, text=text, tensor_inputs=tensor_inputs
                    )
                    both = text.both() if cfg else None  # the callback may have replaced the embeddings
                progress.update()
        return latents

    def _callback(self, callback: Callable, i: int, t, latents, text: TextContext, tensor_inputs: list[str]):
        """diffusers' callback_on_step_end: it may replace the latents and the embeddings."""
        local = {
            "latents": latents,
            "prompt_embeds": text.prompt_embeds,
            "negative_prompt_embeds": text.negative_prompt_embeds,
        }
        out = callback(self, i, t, {k: local[k] for k in tensor_inputs})
        if out is None:
            out = {}
        elif not isinstance(out, dict):  # diffusers would fail later with "argument of type ... not iterable"
            raise TypeError(
                f"callback_on_step_end must return a dict of tensors (or None), got {type(out).__name__}"
            )
        if "prompt_embeds" in out or "negative_prompt_embeds" in out:
            text.prompt_embeds = out.pop("prompt_embeds", text.prompt_embeds)
            text.negative_prompt_embeds = out.pop("negative_prompt_embeds", text.negative_prompt_embeds)
            text.chunks = None  # the callback's embeddings: every token is attended to
        return out.pop("latents", latents)

"""Text-to-image steered by ControlNets (an edge, pose or depth map), called as diffusers'
StableDiffusionControlNetPipeline (SD 1.x/2.x UNets) and StableDiffusionXLControlNetPipeline (SDXL UNets).

One ControlNetModel, a list or tuple of them, or diffusers' MultiControlNetModel; each net reads its control
image and adds residuals to the UNet's down and middle blocks, scaled by `controlnet_conditioning_scale` within
[control_guidance_start, control_guidance_end) of the schedule. Everything else -- prompts (A1111 weights,
chunks), CFG, schedulers, LoRA, callbacks, decoding -- is TextToImagePipeline's, through the shared loop: the
nets run where the denoiser does (LatentDiffusionPipeline._denoiser_call), on the same rows.

The module path gen.pipelines.controlnet.ControlNetPipeline is written into saved pipelines' model_index.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.controlnets import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from gen.models.dit import DiT
from gen.pipelines.checks import check_control
from gen.pipelines.text_to_image import TextToImagePipeline


@dataclass
class Control:
    """One call's control inputs: images (B, 3, H, W) per net, one per prompt row; each net's scale; each step's
    keep factor per net (0 outside its [start, end)); guess mode (the nets see the text branch only)."""

    images: list[torch.Tensor]
    scales: list[float]
    keep: list[list[float]]
    guess: bool


class ControlNetPipeline(TextToImagePipeline):
    """TextToImagePipeline's components plus `controlnet`; StableDiffusionControlNetPipeline's call arguments
    (`image`, `controlnet_conditioning_scale`, `guess_mode`, `control_guidance_start`/`_end`) plus everything
    TextToImagePipeline takes. With the same components, scheduler and generator it gives diffusers' images.
    `ControlNetPipeline.from_pipe(t2i, controlnet=net)` shares t2i's loaded weights."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _exclude_from_cpu_offload = ["controlnet"]  # it runs beside the UNet every step: moving it would thrash

    def __init__(  # annotated as the base's: diffusers' from_pipe matches components by these types
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: KarrasDiffusionSchedulers,
        controlnet: ControlNetModel | list | tuple | MultiControlNetModel,
        transformer: DiT | None = None,
        unet: UNet2DConditionModel | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__(
            vae,
            text_encoder,
            tokenizer,
            scheduler,
            transformer=transformer,
            unet=unet,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        )
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(list(controlnet))
        self.register_modules(controlnet=controlnet)
        # As diffusers': control images are RGB in [0, 1], not the VAE's [-1, 1]
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )

    @property
    def nets(self) -> list[ControlNetModel]:
        net = self.controlnet
        return list(net.nets) if isinstance(net, MultiControlNetModel) else [net]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        *,  # the rest by name: diffusers' positional order past `image` is not this signature's
        height: int | None = None,
        width: int | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        **kwargs: Any,
    ):
        """Generate images steered by the control image(s), as StableDiffusionControlNetPipeline.__call__ does:
        `image` is one control image per net (PIL, numpy, tensor, or a list: one per prompt), the size defaults
        to the control image's (rounded down to the VAE's factor). Every other argument is
        TextToImagePipeline's (prompt, negative_prompt, num_inference_steps, guidance_scale, generator, ...)."""
        nets = self.nets
        starts, ends = _per_net(control_guidance_start, control_guidance_end, len(nets))
        scales = _scales(controlnet_conditioning_scale, len(nets))
        images = _images_per_net(image, len(nets))
        check_control(self.unet_for_control(), nets, images, scales, starts, ends)
        guess = guess_mode or bool(nets[0].config.global_pool_conditions)
        # The first control image decides the size (unless given); the others are resized to it, as A1111 does
        first = self.control_image_processor.preprocess(images[0], height=height, width=width)
        height, width = first.shape[-2:]
        prepared = [first] + [
            self.control_image_processor.preprocess(im, height=height, width=width) for im in images[1:]
        ]
        per_prompt = kwargs.get("num_images_per_prompt", 1)
        self._pending_control = (prepared, scales, starts, ends, guess, per_prompt)
        try:
            return super().__call__(prompt, height=height, width=width, **kwargs)
        finally:
            self._pending_control, self._control = None, None

    def unet_for_control(self):
        if self.denoiser_name != "unet":
            raise ValueError(
                "ControlNetPipeline needs a UNet (unet=): ControlNets steer UNets, not gen's DiT"
            )
        return self.unet

    def _denoising_loop(self, latents, steps, text, **kwargs):
        """The control state for this call (the images repeated to the prompt rows, the keep factors per step),
        then the shared loop."""
        prepared, scales, starts, ends, guess, per_prompt = self._pending_control
        rows, dtype = text.prompt_embeds.shape[0], self.controlnet.dtype
        prompts = rows // per_prompt
        for k, im in enumerate(prepared):
            if im.shape[0] not in (1, prompts):
                raise ValueError(
                    f"ControlNet {k} got {im.shape[0]} control images for {prompts} prompt(s); give one image for"
                    " all prompts or one per prompt"
                )
        images = [_repeat(im, rows, per_prompt).to(latents.device, dtype) for im in prepared]
        # Over the whole schedule, as diffusers: SDXL's denoising_end cuts steps off its end, not the fractions
        total = getattr(self, "_scheduled_steps", len(steps))
        keep = [
            [1.0 - float(i / total < s or (i + 1) / total > e) for s, e in zip(starts, ends, strict=True)]
            for i in range(len(steps))
        ]
        self._control = Control(images, scales, keep, guess)
        return super()._denoising_loop(latents, steps, text, **kwargs)

    def _denoiser_call(self, x, t, context, added=None, rows=None, **extra):
        down, mid = self._residuals(x, t, context, added, rows)
        return super()._denoiser_call(
            x,
            t,
            context,
            added,
            rows,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            **extra,
        )

    def _residuals(self, x, t, context, added, rows):
        """The nets' residuals for these rows of the step's batch (negatives first when guided): in guess mode
        only the text rows get them (zeros elsewhere), as diffusers' pipeline does."""
        c = self._control
        i, guided = self._step
        count = c.images[0].shape[0]  # prompt rows B; the step's batch is 2B when guided
        rows = list(range(x.shape[0])) if rows is None else rows
        use = [k for k, r in enumerate(rows) if not (c.guess and guided and r < count)]
        kw = {"added_cond_kwargs": {n: v[use] for n, v in added.items()}} if added is not None else {}
        scale = [s * k for s, k in zip(c.scales, c.keep[i], strict=True)]
        cond = [im[[rows[k] % count for k in use]] for im in c.images]
        multi = isinstance(self.controlnet, MultiControlNetModel)
        down, mid = self.controlnet(
            x[use],
            t,
            encoder_hidden_states=context[use],
            controlnet_cond=cond if multi else cond[0],
            conditioning_scale=scale if multi else scale[0],
            guess_mode=c.guess,
            return_dict=False,
            **kw,
        )
        if len(use) == len(rows):
            return down, mid
        return [_place(d, use, len(rows)) for d in down], _place(mid, use, len(rows))


def _per_net(start, end, n: int) -> tuple[list[float], list[float]]:
    """control_guidance_start/end as one value per net (a single value applies to every net), as diffusers'."""
    starts = list(start) if isinstance(start, (list, tuple)) else None
    ends = list(end) if isinstance(end, (list, tuple)) else None
    starts = starts if starts is not None else [start] * (len(ends) if ends is not None else n)
    ends = ends if ends is not None else [end] * len(starts)
    return starts, ends


def _scales(scale, n: int) -> list[float]:
    return list(scale) if isinstance(scale, (list, tuple)) else [scale] * n


def _images_per_net(image, n: int) -> list:
    """One control image (or one list of them, a picture per prompt) per net."""
    if image is None:
        raise ValueError("image (the control image) is required: one per ControlNet")
    if n == 1:
        return [image]
    if not isinstance(image, (list, tuple)):
        raise ValueError(f"image must be a list with one control image per ControlNet ({n}), got one image")
    return list(image)


def _repeat(image: torch.Tensor, rows: int, per_prompt: int) -> torch.Tensor:
    """A control image for each prompt row: one image for all rows, else one per prompt, repeated for each of
    its images (as diffusers' prepare_image)."""
    return image.repeat_interleave(rows if image.shape[0] == 1 else per_prompt, dim=0)


def _place(values: torch.Tensor, use: list[int], total: int) -> torch.Tensor:
    """Residuals for `use` rows spread into a batch of `total`, zeros elsewhere."""
    out = torch.zeros((total, *values.shape[1:]), dtype=values.dtype, device=values.device)
    out[use] = values
    return out

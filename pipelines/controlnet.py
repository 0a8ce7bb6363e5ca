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

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.controlnets import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from gen.models.dit import DiT
from gen.pipelines import images as I
from gen.pipelines.checks import check_control
from gen.pipelines.image_to_image import ImageToImagePipeline
from gen.pipelines.text_to_image import TextToImagePipeline

CONTROL_MODES = (
    "balanced",
    "prompt",
    "control",
)  # A1111's Balanced, My prompt / ControlNet is more important


@dataclass
class Control:
    """One call's control inputs: images (B, 3, H, W) per net, one per prompt row; each net's scale; each step's
    keep factor per net (0 outside its [start, end)); each net's mode (CONTROL_MODES: "prompt" and "control"
    weaken the shallow blocks' residuals, diffusers' guess-mode scales; "control" also feeds the nets the text
    rows only)."""

    images: list[torch.Tensor]
    scales: list[float]
    keep: list[list[float]]
    modes: list[str]


class ControlSteps:
    """What ControlNet adds to a task's pipeline (text-to-image, image-to-image): the `controlnet` component, the
    control images prepared per call, and the nets' residuals added to every denoiser call of the shared loop."""

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

    @contextmanager
    def _steering(self, image, height, width, scale, guess_mode, start, end, mode, kwargs: dict):
        """This call's control inputs set (yielding its height and width) while the task's call runs, cleared after."""
        try:
            yield self._set_control(
                image,
                height,
                width,
                scale,
                guess_mode,
                start,
                end,
                mode,
                kwargs.get("num_images_per_prompt", 1),
            )
        finally:
            self._pending_control, self._control = None, None

    def _set_control(
        self, image, height, width, scale, guess_mode, start, end, mode, per_prompt: int
    ) -> tuple[int, int]:
        """Check and prepare this call's control inputs; the size: as given, else the first control image's
        (rounded down to the VAE's factor)."""
        nets = self.nets
        starts, ends = _per_net(start, end, len(nets))
        scales = _scales(scale, len(nets))
        images = _images_per_net(image, len(nets))
        check_control(self.unet_for_control(), nets, images, scales, starts, ends)
        modes = _modes(mode, guess_mode or bool(nets[0].config.global_pool_conditions), len(nets))
        # The first control image decides the size (unless given); the others are resized to it, as A1111 does
        first = self.control_image_processor.preprocess(images[0], height=height, width=width)
        height, width = first.shape[-2:]
        prepared = [first] + [
            self.control_image_processor.preprocess(im, height=height, width=width) for im in images[1:]
        ]
        self._pending_control = (prepared, scales, starts, ends, modes, per_prompt)
        return height, width

    def unet_for_control(self):
        if self.denoiser_name != "unet":
            raise ValueError(
                "ControlNet pipelines need a UNet (unet=): ControlNets steer UNets, not gen's DiT"
            )
        return self.unet

    def _denoising_loop(self, latents, steps, text, **kwargs):
        """The control state for this call (the images repeated to the prompt rows, the keep factors per step),
        then the shared loop."""
        prepared, scales, starts, ends, modes, per_prompt = self._pending_control
        rows, dtype = text.prompt_embeds.shape[0], self.controlnet.dtype
        prompts = rows // per_prompt
        for k, im in enumerate(prepared):
            if im.shape[0] not in (1, prompts):
                raise ValueError(
                    f"ControlNet {k} got {im.shape[0]} control images for {prompts} prompt(s); give one image for"
                    " all prompts or one per prompt"
                )
        images = [_repeat(im, rows, per_prompt).to(latents.device, dtype) for im in prepared]
        # Over the schedule the task runs (image-to-image: its last `strength`), as diffusers; SDXL's
        # denoising_end cuts steps off its end, not the fractions
        total = getattr(self, "_scheduled_steps", len(steps))
        keep = [
            [1.0 - float(i / total < s or (i + 1) / total > e) for s, e in zip(starts, ends, strict=True)]
            for i in range(len(steps))
        ]
        self._control = Control(images, scales, keep, modes)
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
        """The nets' residuals for these rows of the step's batch (negatives first when guided), summed over the
        nets in order as MultiControlNetModel does; a net in "control" mode gives the text rows only (zeros
        elsewhere), as diffusers' guess mode does."""
        c = self._control
        i, guided = self._step
        count = c.images[0].shape[0]  # prompt rows B; the step's batch is 2B when guided
        rows = list(range(x.shape[0])) if rows is None else rows
        down, mid = None, None
        for k, net in enumerate(self.nets):
            use = [j for j, r in enumerate(rows) if not (c.modes[k] == "control" and guided and r < count)]
            kw = {"added_cond_kwargs": {n: v[use] for n, v in added.items()}} if added is not None else {}
            d, m = net(
                x[use],
                t,
                encoder_hidden_states=context[use],
                controlnet_cond=c.images[k][[rows[j] % count for j in use]],
                conditioning_scale=c.scales[k] * c.keep[i][k],
                guess_mode=c.modes[k] != "balanced",
                return_dict=False,
                **kw,
            )
            if len(use) < len(rows):
                d, m = [_place(r, use, len(rows)) for r in d], _place(m, use, len(rows))
            down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        return down, mid


class ControlNetPipeline(ControlSteps, TextToImagePipeline):
    """TextToImagePipeline's components plus `controlnet`; StableDiffusionControlNetPipeline's call arguments
    (`image`, `controlnet_conditioning_scale`, `guess_mode`, `control_guidance_start`/`_end`) plus everything
    TextToImagePipeline takes, and `control_mode` (A1111's per-unit Control Mode). With the same components,
    scheduler and generator it gives diffusers' images. `ControlNetPipeline.from_pipe(t2i, controlnet=net)`
    shares t2i's loaded weights."""

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
        control_mode: str | list[str] = "balanced",
        **kwargs: Any,
    ):
        """Generate images steered by the control image(s), as StableDiffusionControlNetPipeline.__call__ does:
        `image` is one control image per net (PIL, numpy, tensor, or a list: one per prompt), the size defaults
        to the control image's (rounded down to the VAE's factor). `control_mode` per net (CONTROL_MODES;
        guess_mode=True is "control" for every net). Every other argument is TextToImagePipeline's (prompt,
        negative_prompt, num_inference_steps, guidance_scale, generator, ...)."""
        steer = (controlnet_conditioning_scale, guess_mode, control_guidance_start, control_guidance_end)
        with self._steering(image, height, width, *steer, control_mode, kwargs) as (height, width):
            return super().__call__(prompt, height=height, width=width, **kwargs)


class ControlNetImageToImagePipeline(ControlSteps, ImageToImagePipeline):
    """ImageToImagePipeline steered by ControlNets, called as diffusers' StableDiffusionControlNetImg2ImgPipeline:
    `image` the picture to change, `control_image` one per net; hires fix's second pass uses it. The control
    images are resized to the picture's size (as given or its own), the guidance fractions count the steps that
    run (the last `strength` of the schedule), as diffusers'."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        control_image: Any = None,
        *,
        height: int | None = None,
        width: int | None = None,
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        control_mode: str | list[str] = "balanced",
        **kwargs: Any,
    ):
        """diffusers' default scale here is 0.8, as in its img2img ControlNet pipeline; the size defaults to the
        control image's, as there (give the picture and the control image the same size, or height/width)."""
        I.check_image(image)
        steer = (controlnet_conditioning_scale, guess_mode, control_guidance_start, control_guidance_end)
        with self._steering(control_image, height, width, *steer, control_mode, kwargs) as (height, width):
            return super().__call__(prompt, image, height=height, width=width, **kwargs)


def _per_net(start, end, n: int) -> tuple[list[float], list[float]]:
    """control_guidance_start/end as one value per net (a single value applies to every net), as diffusers'."""
    starts = list(start) if isinstance(start, (list, tuple)) else None
    ends = list(end) if isinstance(end, (list, tuple)) else None
    starts = starts if starts is not None else [start] * (len(ends) if ends is not None else n)
    ends = ends if ends is not None else [end] * len(starts)
    return starts, ends


def _modes(mode, guess: bool, n: int) -> list[str]:
    """control_mode as one of CONTROL_MODES per net; guess mode (or a pooled-condition net such as shuffle) is
    "control" for every net, as diffusers' guess_mode."""
    if guess:
        return ["control"] * n
    modes = list(mode) if isinstance(mode, (list, tuple)) else [mode] * n
    if len(modes) != n:
        raise ValueError(f"control_mode: {len(modes)} values for {n} ControlNet(s); give one per net")
    for m in modes:
        if m not in CONTROL_MODES:
            raise ValueError(f"control_mode {m!r} must be one of {list(CONTROL_MODES)}")
    return modes


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

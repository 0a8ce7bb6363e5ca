"""What gen's flow-matching transformer pipelines (SD3 in sd3.py, Flux in flux.py) share: the call's state, the
input checks, the sigma schedule with its resolution-dependent shift, the noise, the sampling loop with the
step-end callback, and decoding (DecodingMixin: the VAE's shift_factor through the one latent-scaling formula).

These models predict a velocity and are sampled by diffusers' FlowMatch schedulers (Euler, Heun, and any
scheduler that takes their sigmas); the classifier-free guidance combine is gen.diffusion.guidance's, the one
formula. Each model's pipeline adds its prompt encoding, its latent layout and its transformer call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from gen.pipelines.checks import check_counts, check_guidance, check_outputs, check_prompts, check_size
from gen.pipelines.decoding import DecodingMixin
from gen.pipelines.images import fit_size
from gen.pipelines.loaders import SafeLoadersMixin

MAX_SEQUENCE_LENGTH = 512  # T5's longest input in these pipelines, as diffusers checks it


class FlowMatchingPipeline(SafeLoadersMixin, DiffusionPipeline, DecodingMixin):
    """The steps SD3's and Flux's pipelines share. A subclass registers its components (a `transformer`, a `vae`,
    a FlowMatch `scheduler`, its text encoders) and writes `__call__` from these steps."""

    _callback_tensor_inputs = ["latents", "prompt_embeds"]
    is_flow = True  # read by the generation core and the samplers' front-end checks (gen's others: False)
    is_sdxl = False

    @property
    def denoiser(self) -> torch.nn.Module:
        """The transformer, under the name the generation core uses for every family's denoiser."""
        return self.transformer

    def _setup_processor(self, pack: int = 1) -> None:
        """vae_scale_factor and the image processor; `pack`: latent pixels per token side beyond the VAE's
        (Flux packs 2x2 latents into one token, so its images are multiples of 16)."""
        vae = getattr(self, "vae", None)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * pack)

    @property
    def latent_stride(self) -> int:
        """Pixels per transformer token: the VAE's factor times the transformer's patch size."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    @property
    def default_size(self) -> int:
        """Pixels per side when height/width are not given, as diffusers' pipelines default them."""
        return self.transformer.config.sample_size * self.vae_scale_factor

    def _size_of(self, image, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) for an init image: as given, else its own, rounded down to the stride."""
        return fit_size(self, image, height, width)

    # -- memory: the VAE's slicing and tiling, as StableDiffusion3Pipeline users call them ----------------------
    def enable_vae_slicing(self) -> None:
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    # -- the call's state, read by diffusers-style properties (and by callbacks) --------------------------------
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def joint_attention_kwargs(self) -> dict[str, Any] | None:
        return self._joint_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def _begin(self, guidance_scale: float, joint_attention_kwargs: dict[str, Any] | None) -> torch.device:
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        return self._execution_device

    def _check_flow(
        self,
        *,
        prompt,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        pooled_prompt_embeds,
        negative_pooled_prompt_embeds,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        num_images_per_prompt: int,
        output_type: str,
        tensor_inputs: list[str],
        max_sequence_length: int,
    ) -> None:
        """Refuse bad input before any work, naming the value and the rule (gen.pipelines.checks)."""
        check_size(self, height, width)
        check_counts(num_inference_steps, num_images_per_prompt)
        check_guidance(guidance_scale, 0.0, None)
        check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        check_outputs(self, output_type, tensor_inputs)
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("give pooled_prompt_embeds with prompt_embeds (both from encode_prompt)")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("give negative_pooled_prompt_embeds with negative_prompt_embeds")
        ok = isinstance(max_sequence_length, int) and 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH
        if not ok:
            raise ValueError(
                f"max_sequence_length={max_sequence_length!r} must be an integer from 1 to {MAX_SEQUENCE_LENGTH}"
            )

    # -- schedule and noise -------------------------------------------------------------------------------------
    def _mu(self, image_seq_len: int, max_shift: float) -> float:
        """The resolution-dependent shift of the sigmas (SD3.5's and Flux's dynamic shifting): linear in the
        number of image tokens, between the scheduler config's base and max shift. `max_shift`: the default
        where the config has none (SD3 and Flux differ: 1.16 and 1.15)."""
        config = self.scheduler.config
        return calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", max_shift),
        )

    # entries in ComfyUI's model-sampling table for this family (its simple/beta schedules pick from it)
    comfy_timesteps = 1000

    def accepts(self, name: str) -> bool:
        """Does the scheduler's set_timesteps take `name` ("sigmas", "mu")? FlowMatchHeun takes neither."""
        return name in inspect.signature(self.scheduler.set_timesteps).parameters

    def _flow_timesteps(
        self, num_inference_steps: int, device: torch.device, sigmas, mu: float | None
    ) -> torch.Tensor:
        """The scheduler's timesteps for the call (custom sigmas and the shift `mu` where given; a scheduler
        that takes no shift spaces its steps itself)."""
        if sigmas is None and hasattr(self.scheduler, "schedule_sigmas"):
            # ComfyUI's simple/beta (gen.diffusion.flow_schedules) on the table ComfyUI keeps for this family,
            # passed as sigmas so that `count` below is the schedule's length (beta can drop repeats)
            sigmas = self.scheduler.schedule_sigmas(num_inference_steps, self.comfy_timesteps)
        # mu only to a scheduler that shifts dynamically: FlowMatchEuler ignores it otherwise, the multistep
        # solvers on flow sigmas refuse it.
        dynamic = self.scheduler.config.get("use_dynamic_shifting", False)
        kwargs = {"mu": mu} if mu is not None and dynamic and self.accepts("mu") else {}
        steps, count = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, **kwargs
        )
        self._num_timesteps = len(steps)
        self._inference_steps = count  # a second-order scheduler's steps are fewer than its timesteps
        return steps

    def _noise(self, shape: tuple, dtype: torch.dtype, device: torch.device, generator, latents=None):
        """Gaussian noise of `shape` (one generator per image where a list is given), or the caller's latents."""
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(
                f"got {len(generator)} generators for {shape[0]} images (prompts x num_images_per_prompt);"
                " give one generator or one per image"
            )
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _overlay(self):
        """What runs on the post-processed images (inpainting's crop pasted back); None: nothing."""
        return None

    # -- where the latents start: noise (text-to-image); image-to-image overrides these two ----------------------
    def _initial_latents(self, shape: tuple, dtype, device, generator, latents=None) -> torch.Tensor:
        """The starting latents (B, C, h, w) before the schedule is known: Gaussian noise, or the caller's."""
        return self._noise(shape, dtype, device, generator, latents)

    def _tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) as the transformer reads them (Flux packs them)."""
        return latents

    def _start(self, latents: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, timesteps) once the schedule is known (`latents` as the transformer reads them)."""
        return latents, steps

    def _after_step(self, latents: torch.Tensor, i: int, steps: torch.Tensor) -> torch.Tensor:
        """The latents after step i (inpainting puts the image back outside its mask here)."""
        return latents

    # -- the loop -----------------------------------------------------------------------------------------------
    def _flow_loop(
        self,
        latents: torch.Tensor,
        steps: torch.Tensor,
        predict: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor],
        state: dict[str, torch.Tensor],
        callback: Callable | None,
        tensor_inputs: list[str],
        generator=None,
    ) -> torch.Tensor:
        """predict(latents, t, state) -> the guided velocity; the scheduler steps; diffusers' callback_on_step_end
        sees `latents` and the tensors in `state` and may replace them. A scheduler whose step draws noise (Euler
        a, FlowMatchEuler's stochastic_sampling) draws it from `generator`, so the seed decides it; the
        deterministic ones draw nothing, so images stay diffusers' (whose flow pipelines pass no generator)."""
        takes = "generator" in inspect.signature(self.scheduler.step).parameters
        noise = {"generator": generator} if takes and generator is not None else {}
        with self.progress_bar(total=len(steps)) as progress:
            for i, t in enumerate(steps):
                if self.interrupt:
                    continue  # as diffusers' flow pipelines: the remaining steps are skipped
                pred = predict(latents, t, state)
                latents = self.scheduler.step(pred, t, latents, return_dict=False, **noise)[0]
                latents = self._after_step(latents, i, steps)
                if callback is not None:
                    latents = self._flow_callback(callback, i, t, latents, state, tensor_inputs)
                progress.update()
        return latents

    def _flow_callback(self, callback, i: int, t, latents, state: dict, tensor_inputs: list[str]):
        local = {"latents": latents, **state}
        out = callback(self, i, t, {k: local[k] for k in tensor_inputs})
        if out is None:
            out = {}
        elif not isinstance(out, dict):
            raise TypeError(
                f"callback_on_step_end must return a dict of tensors (or None), got {type(out).__name__}"
            )
        for name in state:
            state[name] = out.pop(name, state[name])
        return out.pop("latents", latents)

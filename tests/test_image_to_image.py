"""Image-to-image and inpainting: diffusers' SD img2img/inpaint pipelines' images from the same components, for
five samplers at three strengths; both denoisers; weights shared by from_pipe; every image input kind; bad input."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    UniPCMultistepScheduler,
)

from gen.pipelines import ImageToImagePipeline, InpaintPipeline, TextToImagePipeline
from tests import components

SAMPLERS = [
    DDIMScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
]
PROMPT = "a red circle on a green background"


def picture(size: int = 32) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def square_mask(size: int = 32) -> PIL.Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[8:24, 10:26] = 255  # white = repaint
    return PIL.Image.fromarray(m)


def gen_pipe(cls, tokenizer, denoiser: str = "unet", in_channels: int = 4):
    t2i = components.pipeline(tokenizer, denoiser)
    if in_channels != 4:
        t2i = components.pipeline(tokenizer, denoiser)
        t2i.unet = components.unet(in_channels=in_channels)
        t2i.register_modules(unet=t2i.unet)
    pipe = cls.from_pipe(t2i)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_twin(pipe):
    cls = (
        StableDiffusionImg2ImgPipeline
        if isinstance(pipe, ImageToImagePipeline)
        else StableDiffusionInpaintPipeline
    )
    sd = cls(
        **{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd


def call(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 10, "guidance_scale": 6.0, "output_type": "np", **kwargs}
    if isinstance(pipe, (InpaintPipeline, StableDiffusionInpaintPipeline)):
        kwargs = {"mask_image": square_mask(), "height": 32, "width": 32, **kwargs}
    prompt, image = kwargs.pop("prompt", PROMPT), kwargs.pop("image", picture())
    return pipe(prompt, image=image, generator=torch.Generator().manual_seed(seed), **kwargs).images


CASES = [(ImageToImagePipeline, 4), (InpaintPipeline, 4), (InpaintPipeline, 9)]


@pytest.mark.parametrize("cls,channels", CASES, ids=["img2img", "inpaint", "inpaint-9ch"])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.__name__.replace("Scheduler", ""))
def test_same_images_as_diffusers(tokenizer, cls, channels, sampler):
    pipe = gen_pipe(cls, tokenizer, in_channels=channels)
    sd = diffusers_twin(pipe)
    outputs = {}
    for strength in (0.3, 0.75, 1.0):
        pipe.scheduler = sampler.from_config(pipe.scheduler.config)
        ours = call(pipe, strength=strength)
        sd.scheduler = sampler.from_config(pipe.scheduler.config)
        theirs = call(sd, strength=strength)
        assert ours.shape == (1, 32, 32, 3)
        assert np.abs(ours - theirs).max() < 1e-4, (strength, np.abs(ours - theirs).max())
        outputs[strength] = ours
    assert np.abs(outputs[0.3] - outputs[1.0]).max() > 1e-3  # strength matters


@pytest.mark.parametrize("denoiser", ["transformer", "unet"])
def test_both_denoisers_run_both_pipelines(tokenizer, denoiser):
    img2img = gen_pipe(ImageToImagePipeline, tokenizer, denoiser)
    inpaint = InpaintPipeline.from_pipe(img2img)
    near, low, high = (call(img2img, strength=s) for s in (0.1, 0.3, 1.0))  # 1, 3 and 10 of 10 steps
    assert low.shape == high.shape == (1, 32, 32, 3)
    assert np.abs(low - near).mean() < np.abs(high - near).mean()  # low strength stays closer to the image
    kept = call(inpaint, mask_image=PIL.Image.new("L", (32, 32), 0), strength=0.8)
    other = call(inpaint, mask_image=PIL.Image.new("L", (32, 32), 0), strength=0.8, prompt="a blue star")
    assert (
        np.abs(kept - other).max() < 1e-6
    )  # an all-black mask repaints nothing: the prompt doesn't matter...
    repainted = call(inpaint, mask_image=PIL.Image.new("L", (32, 32), 255), strength=1.0)
    assert np.abs(repainted - kept).max() > 1e-2  # ...and an all-white one repaints


def test_from_pipe_shares_the_loaded_weights(tokenizer):
    t2i = components.pipeline(tokenizer, "transformer")
    for cls in (ImageToImagePipeline, InpaintPipeline):
        pipe = cls.from_pipe(t2i)
        assert type(pipe) is cls and pipe.denoiser_name == "transformer"
        for name in ("transformer", "vae", "text_encoder"):
            assert getattr(pipe, name) is getattr(t2i, name)
        pairs = zip(pipe.transformer.parameters(), t2i.transformer.parameters(), strict=True)
        assert all(a.data_ptr() == b.data_ptr() for a, b in pairs)  # no copy: the same tensors
    assert type(TextToImagePipeline.from_pipe(ImageToImagePipeline.from_pipe(t2i))) is TextToImagePipeline


def test_saved_task_pipelines_load_back(tokenizer, tmp_path):
    pipe = gen_pipe(InpaintPipeline, tokenizer, "transformer")
    pipe.save_pretrained(tmp_path)
    loaded = InpaintPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is InpaintPipeline and loaded.denoiser_name == "transformer"
    assert np.abs(call(loaded, strength=0.5) - call(pipe, strength=0.5)).max() < 1e-5


@pytest.mark.parametrize("cls", [ImageToImagePipeline, InpaintPipeline])
def test_an_image_does_not_depend_on_its_batch(tokenizer, cls):
    pipe = gen_pipe(cls, tokenizer, "transformer")
    extra = {"mask_image": square_mask()} if cls is InpaintPipeline else {}
    kw = {"image": picture(), "strength": 0.7, "num_inference_steps": 5, "output_type": "np", **extra}
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    batch = pipe([PROMPT] * 3, generator=gens, **kw).images
    alone = pipe([PROMPT], generator=[torch.Generator().manual_seed(6)], **kw).images
    assert np.abs(batch[1] - alone[0]).max() < 1e-5


def test_image_kinds_give_the_same_image(tokenizer):
    pipe = gen_pipe(ImageToImagePipeline, tokenizer)
    array = np.array(picture())
    kinds = [
        picture(),
        array,  # uint8, as PIL gives it
        array.astype(np.float32) / 255,
        torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255,
    ]
    outs = [call(pipe, image=k, strength=0.6) for k in kinds]
    for out in outs[1:]:
        assert np.abs(out - outs[0]).max() < 1e-5


def test_mask_kinds_give_the_same_image(tokenizer):
    pipe = gen_pipe(InpaintPipeline, tokenizer)
    m = np.asarray(square_mask())
    kinds = [square_mask(), m.astype(np.float32) / 255, m[..., None], torch.from_numpy(m).float() / 255]
    outs = [call(pipe, mask_image=k, strength=0.6) for k in kinds]
    for out in outs[1:]:
        assert np.abs(out - outs[0]).max() < 1e-5


def test_size_comes_from_the_image_and_a_crop_is_pasted_back(tokenizer):
    pipe = gen_pipe(InpaintPipeline, tokenizer)
    image = picture(48)
    out = pipe(
        PROMPT, image=image, mask_image=square_mask(48), num_inference_steps=3, output_type="np"
    ).images
    assert out.shape == (1, 48, 48, 3)
    cropped = pipe(
        PROMPT, image=image, mask_image=square_mask(48), num_inference_steps=3, padding_mask_crop=2
    )
    result = np.asarray(cropped.images[0])
    assert result.shape == (48, 48, 3)
    assert (result[:4] == np.asarray(image)[:4]).all()  # outside the crop: the original pixels


BAD = [
    ({"strength": 1.5}, r"strength=1.5 must be between 0 and 1"),
    ({"strength": -0.1}, r"strength=-0.1 must be between 0 and 1"),
    ({"strength": 0.04}, r"strength=0.04 of 10 steps runs no denoising step .*use strength >= 0.1"),
    ({"image": "in.png"}, r"image must be a PIL image, a numpy array or a torch tensor .*got str"),
    ({"mask_image": square_mask(16)}, r"mask_image is 16x16 but image is 32x32"),
    (
        {"mask_image": np.zeros((32, 32, 3), np.float32)},
        r"mask_image has shape \(32, 32, 3\): a mask has one channel",
    ),
    ({"mask_image": None}, r"mask_image must be a PIL image"),
    ({"padding_mask_crop": 4, "output_type": "np"}, r"padding_mask_crop needs output_type='pil'"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m.split()[0] for _, m in BAD])
def test_bad_input_is_one_clear_line(tokenizer, kwargs, message):
    pipe = gen_pipe(InpaintPipeline, tokenizer)
    with pytest.raises(ValueError, match=message) as e:
        call(pipe, **kwargs)
    assert "\n" not in str(e.value)


def test_an_inpainting_checkpoint_is_recognised(tokenizer, tmp_path):
    """A 9-channel UNet is refused by text-to-image and img2img with a pointer to inpainting; an SD-inpainting
    single file gets the shipped configs with in_channels 9."""
    import json

    from safetensors.torch import save_file

    from gen.pipelines.single_file import config_folder, unet_in_channels

    pipe = gen_pipe(InpaintPipeline, tokenizer, in_channels=9)
    with pytest.raises(ValueError, match="is an inpainting model .*use InpaintPipeline"):
        TextToImagePipeline.from_pipe(pipe)(PROMPT, num_inference_steps=2)
    with pytest.raises(ValueError, match="is an inpainting model .*use InpaintPipeline"):
        call(ImageToImagePipeline.from_pipe(pipe))
    checkpoint = tmp_path / "inpainting.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}, str(checkpoint))
    assert unet_in_channels(checkpoint) == 9
    folder = config_folder("v1", tmp_path / "config", unet_in_channels(checkpoint))
    assert json.loads((folder / "unet" / "config.json").read_text())["in_channels"] == 9

"""ControlNetPipeline against diffusers' StableDiffusionControlNetPipeline / StableDiffusionXLControlNetPipeline on
the same tiny parts, built as diffusers' fast tests build them -- with the zero convolutions given weights, so a
net whose residuals were dropped or misplaced would change the image and fail the comparison."""

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    UniPCMultistepScheduler,
)
from diffusers.models.controlnets import MultiControlNetModel

from gen.pipelines import ControlNetImageToImagePipeline, ControlNetPipeline, TextToImagePipeline
from tests import components

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++_2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}
VARIANTS = {
    "plain": {},
    "scale 0.5": {"controlnet_conditioning_scale": 0.5},
    "guess mode": {"guess_mode": True},
    "guidance 0.2-0.7": {"control_guidance_start": 0.2, "control_guidance_end": 0.7},
    "negative, 2 images": {"negative_prompt": "a blue square", "num_images_per_prompt": 2},
}


def controlnet(seed: int = 0, cross_dim: int = 32, **config) -> ControlNetModel:
    torch.manual_seed(seed)
    net = ControlNetModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=cross_dim,
        conditioning_embedding_out_channels=(8, 16),
        norm_num_groups=4,
        **{"attention_head_dim": 4, **config},
    )
    with torch.no_grad():  # the zero convolutions, made to matter
        for conv in [
            *net.controlnet_down_blocks,
            net.controlnet_mid_block,
            net.controlnet_cond_embedding.conv_out,
        ]:
            torch.nn.init.normal_(conv.weight, std=0.2)
            torch.nn.init.normal_(conv.bias, std=0.2)
    return net.eval()


def generators(n: int, first: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(first + k) for k in range(n)]


def red_disc(path=None):
    """The control tests' picture: a red disc on navy, 48x40 (saved to `path` if given)."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (48, 40), "navy")
    ImageDraw.Draw(picture).ellipse((8, 6, 36, 34), fill="red")
    if path is not None:
        picture.save(path)
    return picture


def control_image(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    return components.pipeline(components.write_tokenizer(tmp_path_factory.mktemp("tok")), "unet")


def pipelines(
    t2i, net, scheduler_cls=DDIMScheduler, ours=ControlNetPipeline, theirs=StableDiffusionControlNetPipeline
):
    """gen's ControlNet pipeline and diffusers' on t2i's parts, one scheduler config (text-to-image by default;
    the image-to-image pair with ControlNetImageToImagePipeline and StableDiffusionControlNetImg2ImgPipeline)."""
    scheduler = scheduler_cls.from_config(t2i.scheduler.config)
    gen_pipe = ours.from_pipe(t2i, controlnet=net, scheduler=scheduler)
    sd_pipe = theirs(
        **{k: getattr(t2i, k) for k in ("vae", "text_encoder", "tokenizer", "unet")},
        scheduler=scheduler,
        controlnet=net,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for pipe in (gen_pipe, sd_pipe):
        pipe.set_progress_bar_config(disable=True)
    return gen_pipe, sd_pipe


def run(pipe, image, seed: int = 0, **kwargs) -> np.ndarray:
    n = kwargs.get("num_images_per_prompt", 1)
    generator = [torch.Generator().manual_seed(seed + k) for k in range(n)]
    kwargs = {"num_inference_steps": 4, "guidance_scale": 6.0, "output_type": "np", **kwargs}
    return pipe("a red circle", image=image, generator=generator, **kwargs).images


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_same_images_as_stable_diffusion_controlnet(t2i, scheduler, variant):
    ours, theirs = pipelines(t2i, controlnet(), SCHEDULERS[scheduler])
    image = control_image()
    a, b = run(ours, image, **VARIANTS[variant]), run(theirs, image, **VARIANTS[variant])
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-4, np.abs(a - b).max()


def test_the_net_matters_and_scale_zero_is_the_plain_image(t2i):
    ours, _ = pipelines(t2i, controlnet())
    image = control_image()
    generator = [torch.Generator().manual_seed(0)]
    plain = t2i(
        "a red circle", num_inference_steps=4, guidance_scale=6.0, generator=generator, output_type="np"
    )
    plain = plain.images
    steered = run(ours, image)
    assert np.abs(steered - plain).max() > 0.05  # the residuals reach the UNet
    np.testing.assert_allclose(run(ours, image, controlnet_conditioning_scale=0.0), plain, atol=1e-5)
    early = run(ours, image, control_guidance_start=0.0, control_guidance_end=0.01)  # on no step
    np.testing.assert_allclose(early, plain, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_several_nets_as_a_list_or_multicontrolnetmodel(t2i, scheduler):
    nets = [controlnet(0), controlnet(1)]
    images = [control_image(0), control_image(1)]
    args = {"controlnet_conditioning_scale": [0.8, 0.4], "control_guidance_end": [1.0, 0.5]}
    ours, theirs = pipelines(t2i, MultiControlNetModel(nets), SCHEDULERS[scheduler])
    listed = ControlNetPipeline.from_pipe(t2i, controlnet=nets, scheduler=ours.scheduler)
    listed.set_progress_bar_config(disable=True)
    a, b, c = run(ours, images, **args), run(theirs, images, **args), run(listed, images, **args)
    assert np.abs(a - b).max() < 1e-4 and np.abs(c - b).max() < 1e-4


def test_from_pipe_shares_weights_and_the_size_is_the_control_images(t2i):
    ours, _ = pipelines(t2i, controlnet())
    assert ours.unet is t2i.unet and ours.vae is t2i.vae and ours.text_encoder is t2i.text_encoder
    out = run(ours, control_image(size=48))
    assert out.shape == (1, 48, 48, 3)
    back = TextToImagePipeline.from_pipe(ours)
    assert back.unet is t2i.unet and "controlnet" not in back.components


def test_long_weighted_prompts_keep_working(t2i):
    """A1111's syntax and prompts of several chunks go through the same rows the nets see."""
    ours, _ = pipelines(t2i, controlnet())
    long = " ".join(["a red circle on a blue background"] * 12)  # two chunks beside a one-chunk prompt
    prompts, image = [long, "a (star:1.2)"], control_image()
    both = ours(prompts, image=image, generator=generators(2), num_inference_steps=3, output_type="np").images
    for k, prompt in enumerate(prompts):  # each row steered as in a call of its own
        alone = ours(prompt, image=image, generator=generators(1, k), num_inference_steps=3, output_type="np")
        np.testing.assert_allclose(both[k], alone.images[0], atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"controlnet_conditioning_scale": [1.0, 2.0]}, "controlnet_conditioning_scale: 2 given for 1"),
        ({"control_guidance_start": 0.8, "control_guidance_end": 0.2}, "must satisfy 0 <= start < end <= 1"),
        ({"controlnet_conditioning_scale": float("nan")}, "must be a finite number"),
        ({"image": None}, "image (the control image) is required"),
    ],
)
def test_bad_control_inputs_are_one_line_errors(t2i, kwargs, message):
    ours, _ = pipelines(t2i, controlnet())
    call = {"image": control_image(), **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ours("a red circle", num_inference_steps=2, **call)


def test_a_controlnet_of_another_base_is_named(t2i):
    ours, _ = pipelines(t2i, controlnet(cross_dim=48))
    with pytest.raises(
        ValueError, match=r"ControlNet 0 was made for SD \(text width 48\), but this pipeline's UNet"
    ):
        ours("a red circle", image=control_image(), num_inference_steps=2)


def xl_controlnet() -> ControlNetModel:
    settings = dict(components.XL_UNET)
    return controlnet(cross_dim=settings.pop("cross_attention_dim"), **settings)


def xl_pipelines(folder):
    """Tiny SDXL parts; gen's ControlNetPipeline and diffusers' StableDiffusionXLControlNetPipeline on them."""
    xl = components.sdxl_pipeline(folder)
    net = xl_controlnet()
    ours = ControlNetPipeline.from_pipe(xl, controlnet=net)
    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    theirs = StableDiffusionXLControlNetPipeline(
        **{k: getattr(xl, k) for k in names}, controlnet=net, add_watermarker=False
    )
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return xl, ours, theirs


@pytest.mark.parametrize("variant", ["plain", "guess mode", "guidance 0.2-0.7"])
def test_same_images_as_stable_diffusion_xl_controlnet(tmp_path, variant):
    xl, ours, theirs = xl_pipelines(tmp_path)
    image = control_image()
    a, b = run(ours, image, **VARIANTS[variant]), run(theirs, image, **VARIANTS[variant])
    assert np.abs(a - b).max() < 1e-4, np.abs(a - b).max()
    with pytest.raises(ValueError, match=r"made for SD \(text width 32\), but this pipeline's UNet is SDXL"):
        ControlNetPipeline.from_pipe(xl, controlnet=controlnet())("x", image=image, num_inference_steps=2)


def test_saved_and_loaded_again(t2i, tmp_path):
    ours, _ = pipelines(t2i, controlnet())
    ours.save_pretrained(tmp_path / "saved")
    index = (tmp_path / "saved" / "model_index.json").read_text()
    assert '"ControlNetPipeline"' in index and '"controlnet": [' in index
    again = ControlNetPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(again, control_image()), run(ours, control_image()))


def test_a_diffusers_controlnet_pipeline_folder_loads(t2i, tmp_path):
    ours, theirs = pipelines(t2i, controlnet())
    theirs.save_pretrained(tmp_path / "sd-controlnet")
    loaded = ControlNetPipeline.from_pretrained(tmp_path / "sd-controlnet")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(loaded, control_image()), run(theirs, control_image()), atol=1e-4)


def test_control_images_must_be_one_or_one_per_prompt(t2i):
    ours, _ = pipelines(t2i, controlnet())
    two = torch.cat([control_image(0), control_image(1)])
    with pytest.raises(ValueError, match=r"ControlNet 0 got 2 control images for 1 prompt\(s\)"):
        ours("a red circle", image=two, num_inference_steps=2)
    out = ours(["a red circle", "a star"], image=two, num_inference_steps=2, output_type="np").images
    assert out.shape == (2, 32, 32, 3)


def test_several_nets_take_control_images_of_other_sizes(t2i):
    ours = ControlNetPipeline.from_pipe(t2i, controlnet=[controlnet(0), controlnet(1)])
    ours.set_progress_bar_config(disable=True)
    out = run(ours, [control_image(0), control_image(1, size=48)])  # the second resized to the first's size
    assert out.shape == (1, 32, 32, 3)


def test_a_net_in_another_precision_is_named(t2i):
    ours, _ = pipelines(t2i, controlnet())
    ours.controlnet.to(torch.float64)  # after from_pipe, which casts its components to the pipeline's dtype
    with pytest.raises(
        ValueError, match=r"ControlNet 0 is torch.float64 on cpu but the UNet is torch.float32"
    ):
        ours("a red circle", image=control_image(), num_inference_steps=2)


def test_sdxl_guidance_fractions_count_the_whole_schedule_with_denoising_end(tmp_path):
    """As diffusers' SDXL ControlNet pipeline: control_guidance_end is a fraction of all the steps, of which
    denoising_end runs only the first part."""
    xl, ours, theirs = xl_pipelines(tmp_path)
    args = {
        "num_inference_steps": 8,
        "denoising_end": 0.5,
        "control_guidance_end": 0.5,
        "output_type": "latent",
    }
    a, b = (run(pipe, control_image(), **args) for pipe in (ours, theirs))
    assert (a - b).abs().max() < 1e-4


def img2img_pipelines(t2i, net, scheduler_cls=DDIMScheduler):
    return pipelines(
        t2i, net, scheduler_cls, ControlNetImageToImagePipeline, StableDiffusionControlNetImg2ImgPipeline
    )


IMG2IMG_VARIANTS = {
    "plain": {},
    "scale 0.5, strength 0.6": {"controlnet_conditioning_scale": 0.5, "strength": 0.6},
    "guess mode": {"guess_mode": True},
    "guidance 0.2-0.7": {"control_guidance_start": 0.2, "control_guidance_end": 0.7},
}


@pytest.mark.parametrize("variant", IMG2IMG_VARIANTS)
@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpm++_2m"])
def test_same_images_as_stable_diffusion_controlnet_img2img(t2i, scheduler, variant):
    ours, theirs = img2img_pipelines(t2i, controlnet(), SCHEDULERS[scheduler])
    picture, control = control_image(5), control_image(6)
    kwargs = {
        "num_inference_steps": 5,
        "guidance_scale": 6.0,
        "output_type": "np",
        **IMG2IMG_VARIANTS[variant],
    }
    a, b = (
        pipe("a red circle", image=picture, control_image=control, generator=generators(1), **kwargs).images
        for pipe in (ours, theirs)
    )
    assert a.shape == b.shape == (1, 32, 32, 3) and np.abs(a - b).max() < 1e-4, np.abs(a - b).max()


def test_control_modes_per_net(t2i):
    """ "control" is diffusers' guess mode; without CFG "prompt" is too (its rows are all text rows); one net's
    mode changes only that net's part."""
    ours, theirs = pipelines(t2i, controlnet())
    image = control_image()
    guess = run(theirs, image, guess_mode=True)
    assert np.abs(run(ours, image, control_mode="control") - guess).max() < 1e-4
    plain_guess = run(theirs, image, guess_mode=True, guidance_scale=1.0)
    assert np.abs(run(ours, image, control_mode="prompt", guidance_scale=1.0) - plain_guess).max() < 1e-4
    prompt, balanced = run(ours, image, control_mode="prompt"), run(ours, image)
    assert np.abs(prompt - balanced).max() > 1e-3 and np.abs(prompt - guess).max() > 1e-3
    nets, images = [controlnet(0), controlnet(1)], [control_image(0), control_image(1)]
    multi, _ = pipelines(t2i, nets)
    mixed = run(multi, images, control_mode=["balanced", "control"])
    assert np.abs(mixed - run(multi, images)).max() > 1e-3
    assert np.abs(mixed - run(multi, images, guess_mode=True)).max() > 1e-3
    with pytest.raises(
        ValueError, match=r"control_mode 'loud' must be one of \['balanced', 'prompt', 'control'\]"
    ):
        run(ours, image, control_mode="loud")
    with pytest.raises(ValueError, match=r"control_mode: 1 values for 2 ControlNet\(s\)"):
        run(multi, images, control_mode=["balanced"])

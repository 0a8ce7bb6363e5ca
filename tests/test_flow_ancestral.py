"""Euler a on flow-matching models: gen's FlowMatchEulerAncestralScheduler is ComfyUI's
sample_euler_ancestral_RF (written out below as ComfyUI writes it) on diffusers' FlowMatchEuler schedule, seeded by
the call's generator, and the front-ends offer it under A1111's name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from gen.cli import main
from gen.diffusion.flow_ancestral import FlowMatchEulerAncestralScheduler
from gen.diffusion.samplers import make_scheduler, sampler_name
from gen.generation import generate
from tests.flow_parts import sd3_parts


def comfy_euler_ancestral_rf(model, x, sigmas, generator, eta=1.0):
    """ComfyUI's k-diffusion loop for CONST (rectified-flow) models; `model` returns the denoised latents."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
        sigma_down = sigmas[i + 1] * downstep_ratio
        alpha_ip1, alpha_down = 1 - sigmas[i + 1], 1 - sigma_down
        renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
        ratio = sigma_down / sigmas[i]
        x = ratio * x + (1 - ratio) * denoised
        x = (alpha_ip1 / alpha_down) * x + torch.randn(x.shape, generator=generator) * renoise_coeff
    return x


def toy_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A velocity that depends on the sample nonlinearly, so every step's arithmetic shows."""
    return torch.tanh(x) * (1 + sigma)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_step_is_comfyuis_rf_ancestral_step(shift):
    scheduler = FlowMatchEulerAncestralScheduler(shift=shift)
    scheduler.set_timesteps(6)
    sigmas = [float(s) for s in scheduler.sigmas]
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    x, generator = start.clone(), torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        sigma = float(scheduler.sigmas[scheduler.step_index or 0])
        x = scheduler.step(toy_velocity(x, sigma), t, x, generator=generator, return_dict=False)[0]

    def denoise(x, sigma):
        return x - sigma * toy_velocity(x, sigma)

    theirs = comfy_euler_ancestral_rf(denoise, start.clone(), sigmas, torch.Generator().manual_seed(1))
    assert torch.allclose(x, theirs, atol=1e-5), float((x - theirs).abs().max())
    plain = FlowMatchEulerDiscreteScheduler(shift=shift)
    plain.set_timesteps(6)
    assert torch.equal(plain.timesteps, scheduler.timesteps)  # the schedule is FlowMatchEuler's


def test_each_step_lands_on_the_next_noise_level():
    """With the exact velocity of a known x0, after a step the latents are (1 - s') x0 + s' * unit noise."""
    scheduler = FlowMatchEulerAncestralScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((1, 1, 256, 256), 0.5)
    sigma, sigma_next = float(scheduler.sigmas[1]), float(scheduler.sigmas[2])
    scheduler._step_index = 1
    sample = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g)
    velocity = (sample - x0) / sigma
    out = scheduler.step(velocity, scheduler.timesteps[1], sample, generator=g, return_dict=False)[0]
    noise = (out - (1 - sigma_next) * x0) / sigma_next
    assert abs(float(noise.mean())) < 0.01 and abs(float(noise.std()) - 1) < 0.01


def test_the_sampler_table_makes_it_for_flow_models_and_names_it_back():
    scheduler = make_scheduler("euler_a", FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert type(scheduler) is FlowMatchEulerAncestralScheduler and scheduler.config.shift == 3.0
    assert sampler_name(scheduler) == "euler_a"
    assert type(make_scheduler("euler", scheduler.config)) is FlowMatchEulerDiscreteScheduler


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    root = tmp_path_factory.mktemp("sd3-ancestral")
    StableDiffusion3Pipeline(**sd3_parts(root / "parts")).save_pretrained(root / "sd3")
    return root / "sd3"


def picture(folder, **options) -> np.ndarray:
    options = {"dtype": "fp32", "width": 32, "height": 32, "steps": 4, "sampler": "euler_a", **options}
    return np.asarray(generate("a red circle", model=str(folder), **options)[0])


def test_the_seed_decides_the_noise_it_adds(sd3):
    first, again = picture(sd3, seed=5), picture(sd3, seed=5)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, picture(sd3, seed=6))
    assert not np.array_equal(first, picture(sd3, seed=5, sampler="euler"))  # it is not Euler


def test_the_gen_command_writes_euler_a_and_reproduces_it(sd3, tmp_path, capsys):
    out = tmp_path / "a.png"
    args = ["a red circle", "--model", str(sd3), "-o", str(out), "--seed", "5", "--sampler", "euler_a"]
    assert main([*args, "--dtype", "fp32", "--width", "32", "--height", "32", "--steps", "4"]) == 0
    assert "Sampler: Euler a" in Image.open(out).text["parameters"]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), picture(sd3, seed=5))
    capsys.readouterr()
    assert main(["reproduce", str(out), "--verify"]) == 0
    assert "max pixel difference: 0" in capsys.readouterr().out


def test_an_image_keeps_its_noise_beside_batch_mates(sd3):
    """Image k draws its step noise from its own generator (seed + k), so a batch of two gives the two images
    made alone, within gen's PIXEL_TOLERANCE for batch-mates."""
    from gen.generation.metadata import PIXEL_TOLERANCE

    both = generate(
        "a red circle",
        model=str(sd3),
        dtype="fp32",
        width=32,
        height=32,
        steps=4,
        sampler="euler_a",
        seed=5,
        num_images=2,
        batch_size=2,
    )
    for k, image in enumerate(both):
        alone = picture(sd3, seed=5 + k).astype(int)
        assert np.abs(np.asarray(image).astype(int) - alone).max() <= PIXEL_TOLERANCE

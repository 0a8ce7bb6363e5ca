"""ComfyUI's simple and beta schedules on flow models: the sigmas gen's schedulers set are ComfyUI's (its model
sampling table and schedule functions written out below as ComfyUI writes them), the pipelines use them, and the
front-ends offer them by gen's names and A1111's (sampler, schedule type) pair."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from gen.cli import main
from gen.diffusion.flow_schedules import FlowMatchEulerBetaScheduler, schedule_positions
from gen.diffusion.samplers import make_scheduler, sampler_name
from gen.pipelines import FluxTextToImagePipeline, SD3TextToImagePipeline
from gen.serve.sampler_names import resolve
from tests.flow_parts import flux_parts, sd3_parts


class ComfyFlowSampling:
    """ComfyUI's ModelSamplingDiscreteFlow: sigma(t) = shift * t / (1 + (shift - 1) * t) on t = 1/N ... N/N, or
    ModelSamplingFlux's exp(mu) / (exp(mu) + 1/t - 1) where a resolution's mu is given."""

    def __init__(self, shift: float = 1.0, mu: float | None = None, timesteps: int = 1000):
        t = torch.arange(1, timesteps + 1) / timesteps
        if mu is None:
            self.sigmas = shift * t / (1 + (shift - 1) * t)
        else:
            self.sigmas = math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def comfy_simple(model_sampling, steps):
    s = model_sampling
    sigs = []
    ss = len(s.sigmas) / steps
    for x in range(steps):
        sigs += [float(s.sigmas[-(1 + int(x * ss))])]
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def comfy_beta(model_sampling, steps, alpha=0.6, beta=0.6):
    total_timesteps = len(model_sampling.sigmas) - 1
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy.stats.beta.ppf(ts, alpha, beta) * total_timesteps)
    sigs = []
    last_t = -1
    for t in ts:
        if t != last_t:
            sigs += [float(model_sampling.sigmas[int(t)])]
        last_t = t
    sigs += [0.0]
    return torch.FloatTensor(sigs)


COMFY = {"simple": comfy_simple, "beta": comfy_beta}


@pytest.mark.parametrize("schedule", ["simple", "beta"])
@pytest.mark.parametrize("steps", [1, 4, 7, 20, 30, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_sigmas_are_comfyuis(schedule, steps, shift):
    """SD3: the static shift, as ComfyUI's SD3 model sampling (shift 3)."""
    config = FlowMatchEulerDiscreteScheduler(shift=shift).config
    scheduler = make_scheduler(f"euler_{schedule}", config)
    scheduler.set_timesteps(steps)
    theirs = COMFY[schedule](ComfyFlowSampling(shift), steps)
    assert scheduler.sigmas.shape == theirs.shape
    assert torch.allclose(scheduler.sigmas, theirs, atol=1e-6), (scheduler.sigmas, theirs)
    assert sampler_name(scheduler) == f"euler_{schedule}"


@pytest.mark.parametrize("schedule", ["simple", "beta"])
def test_dynamic_shift_sigmas_are_comfyuis_flux_sampling_at_that_mu(schedule):
    """Flux / SD3.5: the resolution's mu, as ComfyUI's ModelSamplingFlux node computes it for that size."""
    config = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config
    scheduler = make_scheduler(f"euler_a_{schedule}", config)
    scheduler.set_timesteps(20, mu=0.93)
    theirs = COMFY[schedule](ComfyFlowSampling(mu=0.93), 20)
    assert torch.allclose(scheduler.sigmas, theirs, atol=1e-6)


def test_beta_puts_more_steps_at_both_ends_and_drops_repeats():
    t = schedule_positions("beta", 20)
    gaps = np.diff(t)
    assert gaps[0] > gaps[10] < gaps[-1]  # the steps bunch at the start and the end (gaps are negative)
    assert (
        len(schedule_positions("beta", 900)) < 900
    )  # the table's rounding repeats some: dropped, as ComfyUI
    assert schedule_positions("simple", 4) == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_pipelines_run_comfyuis_schedule(tmp_path, family):
    """SD3 (static shift 3, ComfyUI's 1000-entry table) and Flux (dynamic shift: the size's mu on ComfyUI's
    10,000-entry ModelSamplingFlux table; FluxPipeline's default linear sigmas give way): the sigmas a call steps
    through are ComfyUI's beta schedule's; sigmas given by the caller still win."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cls, build = {"sd3": (SD3TextToImagePipeline, sd3_parts), "flux": (FluxTextToImagePipeline, flux_parts)}[
        family
    ]
    dynamic = family == "flux"
    config = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic).config
    parts = build(tmp_path)
    parts["scheduler"] = FlowMatchEulerBetaScheduler.from_config(config)
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    call = {"prompt": "a red circle", "height": 32, "width": 32, "output_type": "np"}

    def count(p, i, t, kwargs):
        calls.append(float(t))
        return kwargs

    pipe(**call, num_inference_steps=8, callback_on_step_end=count)
    if dynamic:  # 32x32 pixels, VAE factor 1, 2x2 packing: 256 image tokens
        c = pipe.scheduler.config
        mu = calculate_shift(256, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        theirs = comfy_beta(ComfyFlowSampling(mu=mu, timesteps=10_000), 8)
    else:
        theirs = comfy_beta(ComfyFlowSampling(3.0), 8)
    assert torch.allclose(pipe.scheduler.sigmas, theirs, atol=1e-6), (pipe.scheduler.sigmas, theirs)
    assert len(calls) == len(theirs) - 1
    pipe(**call, num_inference_steps=3, sigmas=[1.0, 0.6, 0.3])
    assert len(pipe.scheduler.sigmas) == 4 and float(pipe.scheduler.sigmas[-1]) == 0


def test_a1111_schedule_types_resolve_to_gens_names():
    assert resolve("Euler", "Beta") == "euler_beta"
    assert resolve("Euler a", "simple") == "euler_a_simple"
    assert resolve("Euler Beta") == "euler_beta"
    with pytest.raises(ValueError, match="sampler 'Heun' has no Beta variant; those with one: Euler Beta"):
        resolve("Heun", "Beta")


def test_sd_models_refuse_the_flow_schedules_in_one_line():
    from diffusers import EulerDiscreteScheduler

    with pytest.raises(ValueError, match="'euler_beta' is defined here for flow-matching models") as e:
        make_scheduler("euler_beta", EulerDiscreteScheduler().config)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("sampler", ["euler_beta", "euler_a_simple"])
def test_cli_writes_and_reproduces_a_schedule(tmp_path, capsys, sampler):
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image

    StableDiffusion3Pipeline(**sd3_parts(tmp_path / "parts")).save_pretrained(tmp_path / "sd3")
    out = tmp_path / "x.png"
    args = ["a red circle", "--model", str(tmp_path / "sd3"), "-o", str(out), "--sampler", sampler]
    assert (
        main([*args, "--steps", "6", "--width", "32", "--height", "32", "--dtype", "fp32", "--seed", "3"])
        == 0
    )
    text = Image.open(out).text["parameters"]
    label = {"euler_beta": "Euler Beta", "euler_a_simple": "Euler a Simple"}[sampler]
    assert f"Sampler: {label}," in text
    capsys.readouterr()
    assert main(["reproduce", str(out), "--verify"]) == 0

import json
import random

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

import gen
from gen.data import captions as C
from gen.data import shapes as S
from gen.loading.assets import DEFAULT_MODEL
from gen.train.clip_tokenizer import build


def test_dataset_is_deterministic_and_respects_held_out():
    a_images, a_caps, a_scenes = S.render_many(64, seed=3)
    b_images, b_caps, b_scenes = S.render_many(64, seed=3)
    assert np.array_equal(a_images, b_images) and a_caps == b_caps and a_scenes == b_scenes
    assert not np.array_equal(a_images, S.render_many(64, seed=4)[0])
    assert a_images.shape == (64, 64, 64, 3) and a_images.dtype == np.uint8
    _, _, train = S.render_many(500, seed=0, split="train")
    assert not any(S.is_held_out(s) for s in train)
    _, _, held = S.render_many(50, seed=0, split="heldout")
    assert all(S.is_held_out(s) for s in held)
    assert all(s.colour != s.background for s in train)


def test_held_out_keeps_every_colour_and_shape_in_training():
    assert len(S.HELD_OUT) == 20
    seen = {(s.colour, s.shape) for s in S.render_many(3000, seed=1, split="train")[2]}
    assert {c for c, _ in seen} == set(S.COLOURS) and {s for _, s in seen} == set(S.SHAPES)


def test_captions_name_the_scene():
    scene = S.Scene("red", "star", "blue", "small", "top left")
    assert S.caption(scene) == "a small red star in the top left on a blue background"
    drawn = [S.caption(scene, random.Random(k)) for k in range(600)]
    wrong = {w for c in drawn for w in c.replace(",", "").split()} - C.vocabulary()
    assert not wrong
    false = ({*S.COLOURS, *S.SHAPES} - {"red", "star", "blue"}) | {
        "large",
        "big",
        "right",
        "bottom",
        "centre",
        "center",
        "middle",
    }
    assert not [c for c in drawn if set(c.replace(",", "").split()) & false]  # nothing untrue is named
    assert {"a red star on a blue background", "a red star", "red star, blue background"} <= set(drawn)
    assert sum("blue" not in c for c in drawn) > 60 and sum("star" not in c for c in drawn) > 10
    for word in ("little", "upper", "corner", "at the top left", "in red"):
        assert any(word in c for c in drawn), word


def test_paraphrase_prompts_are_held_out_of_training_captions():
    scene = S.Scene("green", "cross", "white", "large", "centre")
    trained = C.training_captions(scene)
    assert len(trained) > 300 and "a green cross on a white background" in trained
    for template in C.PARAPHRASES:
        text = template.format(colour="green", shape="cross", background="white")
        assert text not in trained, text
    assert C.prompt(scene, "minimal", random.Random(0)) in trained  # the plain styles are trained phrasings
    with pytest.raises(ValueError, match="prompt style 'poem' must be one of"):
        C.prompt(scene, "poem", random.Random(0))

    item = S.ShapesDataset(4, seed=0)[2]
    assert (
        item["pixel_values"].shape == (3, 64, 64)
        and -1 <= item["pixel_values"].min() <= item["pixel_values"].max() <= 1
    )


def test_render_draws_the_colours_asked_for():
    image = np.asarray(S.render(S.Scene("red", "square", "blue", "large", "centre")))
    assert tuple(image[2, 2]) == S.COLOURS["blue"] and tuple(image[32, 32]) == S.COLOURS["red"]


def test_shipped_tokenizer_tokenizes_like_clip():
    tok = CLIPTokenizer.from_pretrained(DEFAULT_MODEL / "tokenizer")
    assert len(tok) == 49408
    # Ids of OpenAI's CLIP tokenizer for this sentence.
    assert tok("a red circle on a blue background").input_ids == [
        49406,
        320,
        736,
        7117,
        525,
        320,
        1746,
        5994,
        49407,
    ]
    assert tok.model_max_length == 77


def test_tokenizer_derivation_layout():
    vocab, merges = build(["a b", "ab c", "h i"])
    assert len(vocab) == 256 * 2 + 3 + 2
    assert vocab["ab"] == 512 and vocab["abc"] == 513 and vocab["<|endoftext|>"] == len(vocab) - 1


@pytest.fixture(scope="module")
def packaged():
    import gen

    return gen.load_pipeline()


def test_packaged_model_loads_offline_and_generates(packaged):
    image = packaged(
        "a red circle on a blue background", num_inference_steps=8, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
    assert packaged.transformer is not None and packaged.vae.config.scaling_factor != 0.18215
    report = json.loads((DEFAULT_MODEL / "training_report.json").read_text())
    assert report["judge"]["clean"]["shape"] >= 0.98


def test_judge_scores_rendered_ground_truth():
    from gen.models.judge import Judge, judge_accuracy

    judge = Judge.from_pretrained(DEFAULT_MODEL / "judge").float()
    acc = judge_accuracy(judge, count=300, seed=5)
    for kind in ("clean", "blur", "noise"):
        assert min(acc[kind].values()) >= 0.98, (kind, acc[kind])


def test_generated_batch_obeys_prompts(packaged):
    from gen.evaluation import eval_scenes, generate_for, score
    from gen.models.judge import Judge

    judge = Judge.from_pretrained(DEFAULT_MODEL / "judge").float()
    scenes = eval_scenes(6)
    images, judged = generate_for(packaged, scenes["seen"] + scenes["held-out"], 1, 5.0, seed=0)
    acc = score(judge, images, judged)
    # Chance for "all five attributes right" is below 0.1 %; the model scores ~97 % on the full set.
    assert acc["all"] >= 0.75 and acc["colour"] >= 0.9, acc


def test_under_specified_prompts_are_probed_for_validity_cleanliness_and_variety(packaged):
    """`gen eval`'s probe of prompts that leave attributes open (issue 25, item 6): valid and clean counts out of
    the seeds, and how many distinct values the unnamed attributes take (at least two over 8 seeds: never one
    fixed background for "a circle")."""
    from gen.evaluation import probe
    from gen.models.judge import Judge

    judge = Judge.from_pretrained(DEFAULT_MODEL / "judge").float()
    out = probe(packaged, judge, seeds=8, num_inference_steps=12)
    assert set(out) == {
        "a red circle on a blue background",
        "a circle",
        "a shape on a white background",
        "a red circle",
    }
    circle = out["a circle"]
    assert set(circle["distinct"]) == {"background", "colour"} and min(circle["distinct"].values()) >= 2
    assert set(out["a red circle"]["distinct"]) == {"background"}
    valid, of = map(int, circle["valid"].split("/"))
    assert of == 8 and valid >= 6  # the shape a prompt names is the attribute the model gets right most


@pytest.mark.slow
def test_recipe_builds_a_loadable_model_from_nothing(tmp_path, monkeypatch, caplog):
    import functools

    import gen.evaluation as ev
    from gen.train import shapes, shapes_parts

    # Tiny budgets and a small exam: the plumbing of every stage is under test, not the model's quality.
    monkeypatch.setattr(
        shapes_parts, "clip_zero_shot", functools.partial(shapes_parts.clip_zero_shot, count=20)
    )
    small = ev.eval_scenes(2)
    monkeypatch.setattr(ev, "eval_scenes", lambda per_split=20, seed=4242: small)
    argv = [
        "--out",
        str(tmp_path / "run"),
        "--dataset-size",
        "200",
        "--clip-steps",
        "2",
        "--clip-batch",
        "16",
        "--vae-steps",
        "2",
        "--vae-batch",
        "4",
        "--dit-steps",
        "3",
        "--dit-batch",
        "4",
        "--dit-preset",
        "tiny",
        "--judge-steps",
        "2",
        "--eval-images-per-prompt",
        "1",
        "--dit-checkpoint-steps",
        "1",
        "--dit-precision",
        "no",
    ]
    shapes.main(argv)
    model = tmp_path / "run" / "model"
    report = json.loads((model / "training_report.json").read_text())
    assert report["dit"]["steps"] == 3 and set(report["clip"]["zero_shot_heldout"]) >= {"shape", "colour"}
    pipe = gen.load_pipeline(model)
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)
    assert len(pipe.tokenizer) == 49408 and pipe.vae.config.scaling_factor > 0
    assert (tmp_path / "run" / "eval.json").exists() and (tmp_path / "run" / "grid.png").exists()
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        shapes.main(argv)
    # The DiT stage checkpointed every step; drop its result and it resumes.
    import shutil

    shutil.rmtree(tmp_path / "run" / "stages" / "dit")
    import logging

    with caplog.at_level(logging.INFO, logger="gen.train"):
        shapes.main([*argv, "--overwrite", "--dit-steps", "4"])
    assert "checkpoint-3 at step 3" in caplog.text
    assert json.loads((model / "training_report.json").read_text())["dit"]["steps"] == 4


def test_parts_learning_rates_are_diffusers_schedules_with_the_old_numbers():
    """train_clip / train_vae warm up with lr * min(1, (k + 1) / warmup) at step k, the judge decays on a cosine
    from its third step: diffusers' get_scheduler schedules, the numbers the hand-written rules gave."""
    import math
    import warnings

    from diffusers.optimization import get_scheduler

    from gen.train.shapes_parts import warmup_schedule

    def rates(opt, schedule, steps, skip_first=False):
        seen = []
        for k in range(steps):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            if k or not skip_first:
                schedule.step()
        return seen

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "lr_scheduler.step() before optimizer.step()"
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        want = [3e-4 * min(1.0, (k + 1) / 200) for k in range(400)]
        assert rates(opt, warmup_schedule(opt, 200), 400) == want
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        cosine = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=300)
        old = [2e-3, *(2e-3 * 0.5 * (1 + math.cos(math.pi * min(k / 300, 1.0))) for k in range(299))]
        assert rates(opt, cosine, 300, skip_first=True) == old

"""gen.train.shapes_finetune: its caption mix stays inside the training grammar, and a tiny run trains the DiT from
cached latents and caption embeddings."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest
import torch
from safetensors.torch import load_file

from gen.data import captions as C
from gen.data import scenes as S
from gen.loading.assets import DEFAULT_MODEL
from gen.train import shapes_finetune as F
from gen.train.common import TrainError


def test_caption_mix_kinds_stay_in_the_grammar():
    rng = random.Random(0)
    for _ in range(30):
        scene = S.sample_scene(rng)
        grammar = C.training_captions(scene)
        short = F.draw_caption(scene, rng, {"short": 1})
        assert short in grammar and not F.names_size_or_place(short)
        minimal = F.draw_caption(scene, rng, {"minimal": 1})
        assert minimal in grammar
        assert set(minimal.replace(",", " ").split()) <= {"a", "in", "shape", scene.colour, scene.shape}
        assert F.draw_caption(scene, rng, {"template": 1}) == C.canonical(scene)
    assert F.names_size_or_place("a big red circle, blue background")
    assert F.names_size_or_place("a red circle on blue in the upper left")
    assert not F.names_size_or_place("a red circle on a blue background")
    scene = S.Scene("red", "circle", "blue", "small", "centre")
    assert F.names_background("red circle, blue background", scene)
    assert F.names_background("a circle in red on blue", scene)
    assert not F.names_background("a circle in red", scene)


def test_parse_mix_rejects_unknown_kinds_and_bad_weights():
    assert F.parse_mix("grammar:0.5,short:0.5") == {"grammar": 0.5, "short": 0.5}
    for bad in ("grammar:x", "paraphrased:1", "short:0", "grammar:-1"):
        with pytest.raises(TrainError):
            F.parse_mix(bad)


def test_cache_files_follow_only_the_parts_they_depend_on(tmp_path):
    model = tmp_path / "model"
    for part in ("vae", "text_encoder", "tokenizer", "transformer"):
        (model / part).mkdir(parents=True)
        (model / part / "weights").write_bytes(b"0")
    o = F.FinetuneOptions(init_from=model, cache_dir=str(tmp_path / "cache"))
    latents, text = F.cache_files(o, 64)
    (model / "transformer" / "weights").write_bytes(b"1")  # the next round: a new DiT, the same VAE and CLIP
    assert F.cache_files(o, 64) == (latents, text)
    (model / "text_encoder" / "weights").write_bytes(b"1")
    assert F.cache_files(o, 64)[0] == latents and F.cache_files(o, 64)[1] != text
    text = F.cache_files(o, 64)[1]
    (model / "tokenizer" / "weights").write_bytes(b"1")
    assert F.cache_files(o, 64)[1] != text
    text = F.cache_files(o, 64)[1]
    (model / "vae" / "weights").write_bytes(b"1")
    assert F.cache_files(o, 64)[0] != latents and F.cache_files(o, 64)[1] == text
    latents = F.cache_files(o, 64)[0]
    other_scenes = [
        F.cache_files(F.FinetuneOptions(init_from=model, cache_dir=o.cache_dir, **change), 64)[0]
        for change in ({"data_seed": 1}, {"images": 10})
    ]
    assert len({latents, *other_scenes, F.cache_files(o, 32)[0]}) == 4
    assert F.cache_files(F.FinetuneOptions(init_from=model), 64) is None
    (model / "vae" / "weights").unlink()
    with pytest.raises(TrainError, match="no files in vae/"):
        F.cache_files(o, 64)


def test_tiny_run_trains_the_dit_from_caches(tmp_path):
    out = tmp_path / "run"
    args = [
        "--images",
        "12",
        "--captions-per-image",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--warmup",
        "0",
        "--learning-rate",
        "1e-3",
        "--ema-decay",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
        # fp32 on every CPU: "auto" picks bf16 where the CPU has it natively, and accelerate's process-wide
        # state, set to fp32 by the tests before this one, cannot change precision within one process
        "--precision",
        "no",
    ]
    F.main(["--out", str(out), *args])
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["images_seen"] == 8
    assert 1 <= report["caches"]["distinct_captions"] <= 24
    assert report["caches"]["captions_embedded"] == report["caches"]["distinct_captions"]
    F.main(["--out", str(tmp_path / "again"), *args])  # the same scenes: everything read back from the cache
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["caches"]["captions_embedded"] == 0
    assert again["final_loss"] == pytest.approx(report["final_loss"], rel=1e-5)
    F.main(["--out", str(tmp_path / "object"), *args, "--object-loss-weight", "4"])
    weighted = json.loads((tmp_path / "object" / "report.json").read_text())
    assert weighted["options"]["object_loss_weight"] == "4.0"
    assert weighted["final_loss"] != pytest.approx(
        report["final_loss"], rel=1e-3
    )  # the weights reach the loss
    new = load_file(str(out / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
    old = load_file(str(DEFAULT_MODEL / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert new.keys() == old.keys()
    assert any(not torch.allclose(new[k].float(), old[k].float()) for k in new)
    assert (out / "model" / "text_encoder" / "model.safetensors").read_bytes() == (
        DEFAULT_MODEL / "text_encoder" / "model.safetensors"
    ).read_bytes()  # frozen: the starting model's, byte for byte


def test_object_weights_cover_the_object_and_little_else():
    from gen.data.shapes import render_many

    images, _, scenes = render_many(300, 3, "train", 64)
    w = F.object_weights(scenes, 16, 4.0)
    assert w.shape == (300, 1, 16, 16) and set(w.unique().tolist()) == {1.0, 4.0}
    inside = []
    for image, scene, row in zip(images, scenes, w, strict=True):
        background = torch.tensor(S.COLOURS[scene.background])
        drawn = (torch.from_numpy(image).int() - background).abs().sum(
            -1
        ) > 30  # (64, 64): the object's pixels
        boxed = (row[0] == 4.0).repeat_interleave(4, 0).repeat_interleave(4, 1)
        inside.append((drawn & boxed).sum().item() / drawn.sum().item())
        assert boxed.float().mean() < {"small": 0.25, "large": 0.55}[scene.size], scene
    # an anti-aliased edge pixel may round one position outside the box
    assert min(inside) >= 0.97 and sum(f == 1 for f in inside) >= 297


def test_pixel_weights_move_the_emphasis_not_the_scale():
    from gen.diffusion.training import diffusion_loss

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    plain = diffusion_loss(pred, target)
    assert diffusion_loss(pred, target, pixel_weights=torch.full((3, 1, 8, 8), 7.0)) == pytest.approx(
        plain.item()
    )
    w = torch.ones(3, 1, 8, 8)
    w[:, :, :4] = 3.0  # the top half counts three times as much
    error = (pred - target).square().mean(1)  # (3, 8, 8)
    top, bottom = error[:, :4].mean((1, 2)), error[:, 4:].mean((1, 2))
    # normalised to mean 1: 1.5 on the top half, 0.5 on the bottom, each half being half of the positions
    expected = ((1.5 * top + 0.5 * bottom) / 2).mean()
    assert diffusion_loss(pred, target, pixel_weights=w) == pytest.approx(expected.item(), rel=1e-6)
    sample = torch.tensor([1.0, 0.0, 2.0])
    assert diffusion_loss(pred, target, sample, w) == pytest.approx(
        ((1.5 * top + 0.5 * bottom) / 2 * sample).mean().item(), rel=1e-6
    )


def test_object_loss_weight_must_be_positive(tmp_path):
    with pytest.raises(
        SystemExit, match=r"--object-loss-weight -1.0: must be a number above 0 \(1: no emphasis\)"
    ):
        F.main(["--out", str(tmp_path / "run"), "--object-loss-weight", "-1"])


def test_pixel_weights_of_the_wrong_shape_are_refused():
    from gen.diffusion.training import diffusion_loss

    pred = torch.zeros(4, 4, 8, 8)
    with pytest.raises(ValueError, match=r"pixel_weights of shape \(4, 8, 8\): must be \(4, 1, 8, 8\)"):
        diffusion_loss(pred, pred, pixel_weights=torch.ones(4, 8, 8))  # would broadcast over channels


def test_resume_refuses_a_changed_recipe_but_not_a_longer_run(tmp_path):
    from gen.train.common import save_options

    first = F.FinetuneOptions(out=tmp_path, caption_mix="grammar:2,template:1", object_loss_weight=4.0)
    save_options(first, tmp_path)
    longer = F.FinetuneOptions(
        out=tmp_path,
        caption_mix="grammar:2,template:1",
        object_loss_weight=4.0,
        resume="latest",
        max_minutes=30,
        steps=900,
        eval_at="300",
        threads=2,
    )
    F.check_resume(longer)  # passes
    F.check_resume(
        dataclasses.replace(longer, init_from=F.DEFAULT_MODEL / ".." / F.DEFAULT_MODEL.name)
    )  # one folder
    F.check_resume(
        F.FinetuneOptions(out=tmp_path / "elsewhere", resume="latest")
    )  # no saved config: the Trainer says
    for change, message in (
        ({"object_loss_weight": 1.0}, "--object-loss-weight 1.0 differs from the run's 4.0"),
        (
            {"caption_mix": "grammar:1"},
            "--caption-mix 'grammar:1' differs from the run's 'grammar:2,template:1'",
        ),
        ({"learning_rate": 2e-4}, "--learning-rate 0.0002 differs from the run's 0.0001"),
    ):
        options = {"caption_mix": "grammar:2,template:1", "object_loss_weight": 4.0, **change}
        with pytest.raises(TrainError, match=re.escape(f"--resume: {message}")):
            F.check_resume(F.FinetuneOptions(out=tmp_path, resume="latest", **options))
    checkpoint = tmp_path / "checkpoint-200"  # a checkpoint folder: its run's config is the parent's
    with pytest.raises(TrainError, match="--object-loss-weight 2.0 differs"):
        F.check_resume(
            F.FinetuneOptions(
                out=tmp_path / "new",
                resume=str(checkpoint),
                caption_mix="grammar:2,template:1",
                object_loss_weight=2.0,
            )
        )

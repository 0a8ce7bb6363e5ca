"""gen.train.dreambooth on tiny components, in-process: LoRA (denoiser and text encoder) with prior preservation,
full fine-tuning of a UNet, resume, and the one-line errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import gen
from gen.train import checkpoint
from gen.train.dreambooth import EMBEDDINGS_FILE, LORA_FILE, RECIPES, DreamBoothTrainer, Options, check, main
from tests import components


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("dreambooth")
    for kind in ("transformer", "unet"):
        components.pipeline(tokenizer, kind).save_pretrained(d / kind)
    data = d / "instances"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
    return d


def args(models, out, *extra, model="transformer"):
    return [
        "--model",
        str(models / model),
        "--instance-dir",
        str(models / "instances"),
        "--output-dir",
        str(out),
        "--instance-prompt",
        "a sks shape",
        "--resolution",
        "32",
        "--batch-size",
        "2",
        "--seed",
        "1",
        "--max-steps",
        "2",
        *extra,
    ]


def images(pipe):
    return pipe(
        "a sks shape", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images


def test_lora_with_prior_preservation_text_encoder_ema_min_snr(models, tmp_path):
    out = tmp_path / "run"
    lora = main(
        args(
            models,
            out,
            "--with-prior-preservation",
            "--class-prompt",
            "a shape",
            "--num-class-images",
            "3",
            "--sample-batch-size",
            "2",
            "--lora",
            "--rank",
            "2",
            "--train-text-encoder",
            "--train-identifier",
            "",  # adapters only (the recipe would learn "sks", which "a shape" lacks)
            "--ema-decay",
            "0.9",
            "--min-snr-gamma",
            "5",
            "--caption-dropout",
            "0.3",
            "--checkpointing-steps",
            "2",
        )
    )
    assert lora == out / LORA_FILE
    assert sorted(p.name for p in (out / "class_images").iterdir()) == [
        f"class-{n:05d}.{ext}" for n in range(3) for ext in ("png", "txt")
    ]
    keys = load_file(str(lora))
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder"}
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert keys["transformer.blocks.0.mlp.0.lora_A.weight"].shape[0] == 2  # the rank
    state = checkpoint.load(out / "checkpoint-2")  # only the adapters train, so only they are checkpointed
    assert state["trainable"] and all("lora_" in k for k in state["trainable"])
    pipe = gen.load_pipeline(models / "transformer")
    pipe.set_progress_bar_config(disable=True)
    base = images(pipe)
    pipe.load_lora_weights(lora, adapter_name="sks")
    assert "sks" in pipe.text_encoder.peft_config
    assert np.abs(images(pipe) - base).max() > 1e-4
    # The base model's own weights are untouched: turning the adapter off gives the base images back.
    pipe.set_adapters(["sks"], [0.0])
    assert np.abs(images(pipe) - base).max() < 1e-5


def test_identifier_embedding_learns_alone_and_loads_with_the_lora(models, tmp_path):
    out = tmp_path / "run"
    lora = main(
        args(
            models,
            out,
            "--lora",
            "--rank",
            "2",
            "--train-identifier",
            "sks",
            "--identifier-learning-rate",
            "1e-2",
            "--ema-decay",
            "0.5",
            "--checkpointing-steps",
            "2",
        )
    )
    pipe = gen.load_pipeline(models / "transformer")
    pipe.set_progress_bar_config(disable=True)
    (row,) = pipe.tokenizer("sks", add_special_tokens=False).input_ids
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    learned = load_file(str(out / EMBEDDINGS_FILE))["sks"]  # (1, D)
    assert learned.shape == (1, table.shape[1]) and not torch.allclose(learned[0], table[row])
    # Every other row of the table stayed put, AdamW's weight decay notwithstanding.
    state = checkpoint.load(out / "checkpoint-2")["trainable"]
    (trained,) = [v for k, v in state.items() if k.endswith("token_embedding.weight")]
    others = torch.ones(len(table), dtype=torch.bool)
    others[row] = False
    assert torch.equal(trained[others], table[others]) and not torch.equal(trained[row], table[row])
    base = images(pipe)
    pipe.load_lora_weights(lora)
    assert pipe.tokenizer.tokenize("a sks shape") == ["a</w>", "sks", "shape</w>"]  # the learned token
    assert np.abs(images(pipe) - base).max() > 1e-4
    pipe.unload_lora_weights()
    assert np.abs(images(pipe) - base).max() < 1e-5
    with pytest.raises(
        SystemExit, match="--train-identifier 'zwx' is not a word of --instance-prompt 'a sks shape'"
    ):
        main(args(models, tmp_path / "bad", "--lora", "--train-identifier", "zwx"))


def test_class_images_are_only_topped_up(models, tmp_path):
    out, classes = tmp_path / "run", tmp_path / "classes"
    classes.mkdir()
    Image.new("RGB", (32, 32), "red").save(classes / "mine.png")
    Image.new("RGB", (32, 32), "blue").save(classes / "class-00000.png")  # a user's file with our name
    main(
        args(
            models,
            out,
            "--with-prior-preservation",
            "--class-prompt",
            "a shape",
            "--class-dir",
            str(classes),
            "--num-class-images",
            "3",
            "--lora",
            "--max-steps",
            "1",
        )
    )
    names = ["class-00000.png", "class-00001.png", "class-00001.txt", "mine.png"]
    assert sorted(p.name for p in classes.iterdir()) == names
    assert Image.open(classes / "class-00000.png").getpixel((0, 0)) == (0, 0, 255)  # left alone
    assert (classes / "class-00001.txt").read_text() == "a shape\n"  # what it was drawn for


def test_class_prompts_file_cycles_and_captions_each_class_image(models, tmp_path, monkeypatch):
    prompts, classes = tmp_path / "prompts.txt", tmp_path / "classes"
    # A byte-order mark (as Notepad writes), a blank line and spaces: none of them part of a prompt.
    prompts.write_text("\ufeffa red shape\n\n  a blue shape  \n", encoding="utf-8")
    pipeline = type(gen.load_pipeline(models / "transformer"))
    drawn, original = [], pipeline.__call__

    def spy(self, prompt=None, *a, **kw):
        drawn.extend([prompt] if isinstance(prompt, str) else prompt)
        return original(self, prompt, *a, **kw)

    monkeypatch.setattr(pipeline, "__call__", spy)
    extra = ["--with-prior-preservation", "--class-prompts", str(prompts), "--class-dir", str(classes)]
    main(args(models, tmp_path / "run", *extra, "--num-class-images", "3", "--lora", "--max-steps", "1"))
    assert drawn == ["a red shape", "a blue shape", "a red shape"]
    texts = [(classes / f"class-{n:05d}.txt").read_text() for n in range(3)]
    assert texts == ["a red shape\n", "a blue shape\n", "a red shape\n"]
    prompts.write_text("\n \n")
    with pytest.raises(SystemExit, match="--class-prompts '.*prompts.txt' has no prompts"):
        main(args(models, tmp_path / "again", *extra))


def test_class_images_train_with_their_own_captions(models, tmp_path, monkeypatch):
    classes = tmp_path / "classes"
    classes.mkdir()
    Image.new("RGB", (32, 32), "green").save(classes / "a.png")
    (classes / "a.txt").write_text("a green shape\n")
    Image.new("RGB", (32, 32), "blue").save(classes / "b.png")  # no caption: --class-prompt's
    seen = []
    original = DreamBoothTrainer.next_batch

    def spy(self):
        batch = original(self)
        seen.append(batch)
        return batch

    monkeypatch.setattr(DreamBoothTrainer, "next_batch", spy)
    extra = ["--with-prior-preservation", "--class-dir", str(classes), "--num-class-images", "2", "--lora"]
    main(args(models, tmp_path / "run", *extra, "--class-prompt", "a shape", "--max-steps", "3"))
    expected = {"a.png": "a green shape", "b.png": "a shape"}
    for batch in seen:
        assert batch["captions"][:2] == ["a sks shape"] * 2
        for (dataset, index, _), caption in zip(batch["items"][2:], batch["captions"][2:], strict=True):
            assert caption == expected[dataset.items[index][0].name]  # each image with its own caption
    # Without --class-prompt the uncaptioned one would train as the empty (unconditional) prompt: refused.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red shape\n")
    with pytest.raises(
        SystemExit, match=r"1 class image\(s\) in .*classes have no caption.*pass --class-prompt"
    ):
        main(args(models, tmp_path / "again", *extra, "--class-prompts", str(prompts)))


def test_full_fine_tune_of_a_unet(models, tmp_path):
    folder = main(args(models, tmp_path / "run", model="unet"))
    before = gen.load_pipeline(models / "unet").unet.state_dict()
    after = gen.load_pipeline(folder).unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_equals_an_uninterrupted_lora_run(models, tmp_path):
    extra = [
        "--lora",
        "--rank",
        "2",
        "--with-prior-preservation",
        "--class-prompt",
        "a shape",
        "--class-dir",
        str(tmp_path / "classes"),
        "--num-class-images",
        "2",
        "--checkpointing-steps",
        "2",
    ]
    straight = load_file(str(main(args(models, tmp_path / "a", *extra, "--max-steps", "4"))))
    main(args(models, tmp_path / "b", *extra, "--max-steps", "2"))
    resumed = load_file(
        str(main(args(models, tmp_path / "b", *extra, "--max-steps", "4", "--resume", "latest")))
    )
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_lora_on_gen_dit_trains_the_measured_recipe(models, tmp_path):
    """No tuning flags: adapters on the MLPs only, and the identifier's embedding beside them."""
    out = tmp_path / "run"
    extra = ["--lora", "--with-prior-preservation", "--class-prompt", "a shape", "--num-class-images", "2"]
    main(args(models, out, *extra, "--max-steps", "1"))
    keys = load_file(out / LORA_FILE).keys()
    assert any(".mlp.0." in k for k in keys) and any(".mlp.2." in k for k in keys)
    assert not any(".attn" in k for k in keys)  # attention keeps the base model's layout and prompt reading
    assert set(load_file(out / EMBEDDINGS_FILE)) == {"sks"}  # the word "a shape" lacks
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["rank"], saved["learning_rate"], saved["min_snr_gamma"]) == (4, 1e-3, 5.0)


def checked(models, model="transformer", output_dir="unused", **given) -> Options:
    """check()'s Options (the recipe filled in) for a LoRA run on a tiny model, `given` set as flags would be."""
    flags = {"instance_dir": "x", "instance_prompt": "a sks shape", "class_prompt": "a shape", "lora": True}
    return check(Options(model=str(models / model), output_dir=output_dir, **(flags | given)))


@pytest.mark.parametrize(
    ("model", "lora", "prompt", "class_prompt", "recipe", "identifier"),
    [
        ("transformer", True, "a sks shape", "a shape", "gen-dit", "sks"),
        ("transformer", True, "a sks shape", "", "gen-dit", ""),  # nothing to compare the prompt with
        ("transformer", True, "a sks zwx shape", "a shape", "gen-dit", ""),  # two new words: which one?
        ("transformer", False, "a sks shape", "a shape", "generic", ""),  # a full fine-tune
        ("unet", True, "a sks shape", "a shape", "generic", ""),
    ],
)
def test_the_recipe_follows_the_model_and_the_prompts(
    models, model, lora, prompt, class_prompt, recipe, identifier
):
    o = checked(models, model, lora=lora, instance_prompt=prompt, class_prompt=class_prompt)
    want = RECIPES[recipe]
    assert (o.rank, o.lora_targets, o.learning_rate, o.min_snr_gamma) == (
        want.rank,
        want.lora_targets,
        want.learning_rate,
        want.min_snr_gamma,
    )
    assert o.train_identifier == identifier


@pytest.mark.parametrize(
    ("prompt", "class_prompt", "found"),
    [
        (
            "A photo of Sks, dog.",
            "a photo of a dog",
            "sks",
        ),  # case and punctuation as the tokenizer sees them
        ("a photo of sks dog", "a photo of a dog", "sks"),
        ("a photo of sks dog", "a dog", ""),  # photo, of, sks: which one?
        ("a photo of a dog", "a photo of a dog", ""),
        ("a photo of sks_dog", "a photo of a dog", "sks"),  # CLIP splits at "_"; punctuation is no word
        ("a photo of sks2 dog", "a photo of a dog", ""),  # sks and 2
        # the tokenizer has "x" whole: the LoRA loader would keep its own embedding
        ("a x shape", "a shape", ""),
    ],
)
def test_identifier_is_the_one_new_word(models, prompt, class_prompt, found):
    assert checked(models, instance_prompt=prompt, class_prompt=class_prompt).train_identifier == found


def test_resume_fills_left_out_flags_from_the_run_it_continues(models, tmp_path):
    out = tmp_path / "run"
    main(args(models, out, "--lora", "--rank", "2", "--train-identifier", "", "--checkpointing-steps", "1"))
    o = checked(models, output_dir=str(out), resume="latest")
    assert (o.rank, o.train_identifier) == (2, "")  # not the recipe's 4 and "sks"
    again = ["--lora", "--rank", "3", "--train-identifier", "", "--resume", "latest", "--max-steps", "3"]
    with pytest.raises(SystemExit, match="was written by a run that trained other parameters"):
        main(args(models, out, *again))


def test_cache_text_keeps_the_recipe_from_learning_an_identifier(models):
    # rather than the trainer's refusal of a learning text encoder
    assert checked(models, cache_text=True).train_identifier == ""


def test_flags_given_win_over_the_recipe(models):
    o = checked(models, rank=2, learning_rate=3e-4, min_snr_gamma=0.0, train_identifier="")
    assert (o.rank, o.learning_rate, o.min_snr_gamma, o.train_identifier) == (2, 3e-4, 0.0, "")
    assert o.lora_targets == RECIPES["gen-dit"].lora_targets  # the one flag not given


def test_identifier_found_by_the_recipe_learns_beside_text_encoder_adapters(models, tmp_path):
    out = tmp_path / "run"
    extra = ["--lora", "--train-text-encoder", "--class-prompt", "a shape", "--max-steps", "2"]
    main(args(models, out, *extra))
    pipe = gen.load_pipeline(models / "transformer")
    sks = pipe.tokenizer("sks", add_special_tokens=False).input_ids
    base = pipe.text_encoder.get_input_embeddings().weight[sks]
    learned = load_file(out / EMBEDDINGS_FILE)["sks"]
    assert (learned - base).abs().max() > 1e-4  # peft's add_adapter had frozen the table before it


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--instance-prompt", ""], "--instance-dir and --instance-prompt are required"),
        (["--with-prior-preservation"], "--with-prior-preservation needs --class-prompt"),
        (
            ["--with-prior-preservation", "--class-prompts", "/no/such/prompts.txt"],
            "--class-prompts '/no/such/prompts.txt': cannot read it",
        ),
        (["--lora", "--rank", "0"], "--rank 0: must be at least 1"),
        (
            ["--train-identifier", "sks", "--train-text-encoder"],
            "--train-identifier is part of --train-text-encoder",
        ),
    ],
)
def test_bad_options_are_one_line_errors(models, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        main(args(models, tmp_path / "run", *extra))


def test_refuses_to_overwrite_a_finished_lora(models, tmp_path):
    out = tmp_path / "run"
    main(args(models, out, "--lora", "--max-steps", "1"))
    with pytest.raises(SystemExit, match=f"{LORA_FILE} exists; pass --overwrite"):
        main(args(models, out, "--lora", "--max-steps", "1"))


@pytest.mark.slow
def test_two_processes_lora_with_identifier(models, tmp_path):
    """accelerate's multi-process launcher (gloo on CPU): class images made once, replicas agree, one writer."""
    import os
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [
        *components.accelerate_launch("gen.train.dreambooth"),
        *args(
            models,
            tmp_path / "run",
            "--lora",
            "--rank",
            "2",
            "--train-identifier",
            "sks",
            "--with-prior-preservation",
            "--class-prompt",
            "a shape",
            "--num-class-images",
            "3",
            "--max-steps",
            "3",
        ),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sums = re.findall(r"process (\d) weight checksum (\S+)", done.stderr)
    assert len(sums) == 2 and sums[0][1] == sums[1][1]
    assert len(list((tmp_path / "run" / "class_images").glob("*.png"))) == 3
    assert (tmp_path / "run" / LORA_FILE).is_file() and (tmp_path / "run" / EMBEDDINGS_FILE).is_file()

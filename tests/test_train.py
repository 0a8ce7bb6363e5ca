import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import gen
from gen.train import checkpoint
from gen.train.text_to_image import main
from tests import components

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    components.pipeline(tokenizer).save_pretrained(d / "model")
    data = d / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a red circle number {i}")
    (data / "broken.png").write_bytes(b"this is not an image")
    return d


def args(setup, out, *extra):
    return [
        "--data-dir",
        str(setup / "data"),
        "--model",
        str(setup / "model"),
        "--output-dir",
        str(out),
        "--resolution",
        "32",
        "--batch-size",
        "2",
        "--seed",
        "3",
        *extra,
    ]


def weights(folder):
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_smoke_fine_tune_with_ema_text_encoder_and_corrupt_image(setup, tmp_path, caplog):
    out = main(
        args(
            setup,
            tmp_path / "run",
            "--max-steps",
            "2",
            "--ema-decay",
            "0.9",
            "--train-text-encoder",
            "--min-snr-gamma",
            "5",
            "--noise-offset",
            "0.05",
            "--gradient-accumulation-steps",
            "2",
        )
    )
    assert "skipped 1 unreadable image(s)" in caplog.text and "broken.png" in caplog.text
    before, after = weights(setup / "model"), weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "run" / "train_config.json").exists()
    image = gen.load_pipeline(out)("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_smoke_from_scratch_preset(setup, tmp_path):
    out = main(args(setup, tmp_path / "run", "--max-steps", "2", "--from-scratch", "tiny"))
    assert gen.load_pipeline(out).transformer.config.num_layers == 2


def test_refuses_to_overwrite_a_finished_run(setup, tmp_path):
    main(args(setup, tmp_path / "run", "--max-steps", "1"))
    with pytest.raises(SystemExit, match="exists; pass --overwrite, or --resume latest"):
        main(args(setup, tmp_path / "run", "--max-steps", "1"))


def test_incomplete_checkpoints_are_ignored_and_rotation(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save(tmp_path, step, {"step": step, "w": torch.ones(3) * step}, total_limit=2)
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    broken = tmp_path / "checkpoint-8"
    broken.mkdir()
    (broken / "state.pt").write_bytes(b"half")  # killed before its manifest was written
    (tmp_path / ".checkpoint-10.abc.tmp").mkdir()
    assert checkpoint.resolve(tmp_path, "latest").name == "checkpoint-6"
    assert checkpoint.load(checkpoint.resolve(tmp_path, "latest"))["step"] == 6
    with pytest.raises(ValueError, match="not a complete checkpoint folder"):
        checkpoint.resolve(tmp_path, str(broken))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(setup, tmp_path):
    common = [
        "--max-steps",
        "150",
        "--checkpointing-steps",
        "5",
        "--checkpoints-total-limit",
        "2",
        "--ema-decay",
        "0.9",
    ]
    run = tmp_path / "killed"
    # Every run in a subprocess with the same environment: CPU matmul rounding depends on the thread count,
    # which earlier in-process tests may have changed.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    module = [sys.executable, "-m", "gen.train.text_to_image"]
    subprocess.run(
        [*module, *args(setup, tmp_path / "reference", *common)], env=env, check=True, capture_output=True
    )
    reference = tmp_path / "reference" / "model"
    cmd = [*module, *args(setup, run, *common, "--resume", "latest")]
    rng, kills = random.Random(7), []
    for _ in range(5):
        before = {p.name for p in checkpoint.complete(run)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        # Wait until this process is training (it has promoted a new checkpoint), then kill at a random moment:
        # inside a step or inside a checkpoint save.
        while proc.poll() is None and {p.name for p in checkpoint.complete(run)} <= before:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            found = checkpoint.complete(run)
            kills.append(found[-1].name if found else None)
            for p in found:  # zero corrupt checkpoints: every complete one loads
                assert checkpoint.load(p)["step"] == int(p.name.split("-")[1])
        proc.wait()
    subprocess.run([*cmd, "--overwrite"], env=env, check=True, capture_output=True)
    ref, got = weights(reference), weights(run / "model")
    assert all(torch.equal(ref[k], got[k]) for k in ref), "resumed run differs from the uninterrupted one"
    assert len(kills) >= 3, kills
    assert len(checkpoint.complete(run)) <= 2
    print(f"killed at (latest complete checkpoint): {kills}")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    import gen.train.trainer as t2i

    real, calls = t2i.denoiser_loss, []

    def poisoned(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(t2i, "denoiser_loss", poisoned)
    with pytest.raises(FloatingPointError, match="loss is nan at step 4; stopping"):
        main(args(setup, tmp_path / "run", "--max-steps", "10", "--checkpointing-steps", "2"))
    assert [p.name for p in checkpoint.complete(tmp_path / "run")] == ["checkpoint-2", "checkpoint-4"]
    state = checkpoint.load(tmp_path / "run" / "checkpoint-4")
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())
    assert not (tmp_path / "run" / "model").exists()


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    checkpoint.save(tmp_path, 2, {"step": 2, "w": torch.ones(4)})

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.save(tmp_path, 4, {"step": 4, "w": torch.zeros(4)})
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["checkpoint-2"]
    assert not list(tmp_path.glob(".checkpoint-*"))  # the half-written temporary folder is gone
    assert torch.equal(checkpoint.load(tmp_path / "checkpoint-2")["w"], torch.ones(4))


@pytest.mark.slow
def test_two_processes_agree_and_only_the_main_one_writes(setup, tmp_path):
    import re

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # --multi_gpu is accelerate's multi-process launcher (torchrun); without CUDA the processes use gloo.
    cmd = [
        *components.accelerate_launch("gen.train.text_to_image"),
        *args(setup, tmp_path / "run", "--max-steps", "4", "--checkpointing-steps", "2"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 0 of 2" in done.stderr and "process 1 of 2" in done.stderr
    sums = re.findall(r"process (\d) weight checksum (\S+)", done.stderr)
    assert len(sums) == 2 and sums[0][1] == sums[1][1]  # both replicas hold the same weights
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
        "model",
        "train_config.json",
    ]
    assert gen.load_pipeline(tmp_path / "run" / "model").transformer is not None


def test_caching_latents_and_text_gives_the_same_weights(setup, tmp_path):
    plain = weights(main(args(setup, tmp_path / "a", "--max-steps", "4", "--flip")))
    cached = weights(
        main(args(setup, tmp_path / "b", "--max-steps", "4", "--flip", "--cache-latents", "--cache-text"))
    )
    assert all(torch.allclose(plain[k], cached[k], atol=1e-5) for k in plain)


def test_zero_terminal_snr_needs_v_prediction_and_is_saved(setup, tmp_path):
    with pytest.raises(
        SystemExit, match="--zero-terminal-snr needs v-prediction; this model predicts 'epsilon'"
    ):
        main(args(setup, tmp_path / "a", "--zero-terminal-snr"))
    with pytest.raises(SystemExit, match="--prediction-type 'v': choose epsilon, v_prediction or sample"):
        main(args(setup, tmp_path / "a", "--prediction-type", "v"))
    folder = main(
        args(
            setup,
            tmp_path / "b",
            "--max-steps",
            "2",
            "--zero-terminal-snr",
            "--prediction-type",
            "v_prediction",
            "--min-snr-gamma",
            "5",
        )
    )
    config = gen.load_pipeline(folder).scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    assert config.timestep_spacing == "trailing"


def test_8bit_adam_without_bitsandbytes_is_a_one_line_error(setup, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as when it is not installed
    with pytest.raises(SystemExit, match=r"--use-8bit-adam needs bitsandbytes, which is not installed"):
        main(args(setup, tmp_path / "a", "--use-8bit-adam"))


def test_unknown_tracker_is_a_one_line_error(setup, tmp_path):
    with pytest.raises(SystemExit, match="--report-to 'wandb': only 'tensorboard' is supported"):
        main(args(setup, tmp_path / "a", "--report-to", "wandb"))


def test_tensorboard_logs_loss_lr_and_validation_grids(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    main(
        args(
            setup,
            out,
            "--max-steps",
            "2",
            "--report-to",
            "tensorboard",
            "--validation-steps",
            "2",
            "--validation-prompt",
            "a red circle",
        )
    )
    assert (out / "samples" / "step-000002.png").is_file()
    acc = EventAccumulator(str(out / "logs" / "gen-train")).Reload()  # (its subfolder holds the hparams)
    assert [e.step for e in acc.Scalars("loss")] == [1, 2] and len(acc.Scalars("lr")) == 2
    assert acc.Tags()["images"] == ["validation"]


def test_library_checks_raise_value_errors_and_the_scripts_exit_with_them():
    from gen.train.common import TrainError, exit_on_train_error, noise_scheduler

    with pytest.raises(ValueError, match="--prediction-type 'v': choose epsilon"):
        noise_scheduler({}, "v")

    @exit_on_train_error
    def script():
        raise TrainError("--flag: the one-line message")

    with pytest.raises(SystemExit) as e:
        script()
    assert e.value.code == "--flag: the one-line message"  # printed to stderr, exit status 1

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import gen
from gen import generation as G
from gen.cli import main
from gen.diffusion.samplers import SAMPLERS
from gen.generation import metadata
from tests import components
from tests.images import assert_same_image, pixels

STEPS = ["--steps", "4"]


def test_generate_writes_png_prints_path_and_numbers_around_existing(tmp_path, capsys):
    out = tmp_path / "sub" / "a.png"
    assert main(["a red circle on a blue background", "-o", str(out), "--seed", "1", *STEPS]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert Image.open(out).size == (64, 64)
    before = out.read_bytes()
    assert main(["x", "-o", str(out), "--seed", "2", *STEPS]) == 0  # taken: the next free number instead
    assert capsys.readouterr().out.strip() == str(tmp_path / "sub" / "a-00001.png")
    assert out.read_bytes() == before
    assert main(["x", "-o", str(out), "--seed", "2", "--overwrite", *STEPS]) == 0
    assert out.read_bytes() != before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_many_images_naming(tmp_path, capsys):
    assert main(["a star", "-o", str(tmp_path / "o.png"), "-n", "3", "--seed", "0", *STEPS]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / f"o-{k:05d}.png") for k in range(3)]
    assert main(["a star", "-o", str(tmp_path / "o.png"), "-n", "2", "--seed", "0", *STEPS]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / f"o-{k:05d}.png") for k in (3, 4)]


def test_seed_and_batch_invariance_bit_identical(tmp_path, capsys):
    prompt = "a small green star in the top left on a white background"
    assert (
        main(
            [prompt, "-o", str(tmp_path / "b") + "/", "-n", "3", "--batch-size", "3", "--seed", "10", *STEPS]
        )
        == 0
    )
    assert main([prompt, "-o", str(tmp_path / "s.png"), "--seed", "12", *STEPS]) == 0
    assert_same_image(tmp_path / "b" / "00002.png", tmp_path / "s.png")
    images = gen.generate(prompt, num_images=3, batch_size=2, seed=10, steps=4)
    assert_same_image(np.asarray(images[2]), tmp_path / "s.png")  # the Python API, same path


def test_batch_mates_with_long_prompts_do_not_change_an_image(tmp_path, capsys):
    short = "a small green star in the top left on a white background"
    long = " ".join(["a large red circle in the centre on a blue background"] * 10)  # 3 chunks
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{short}\n{long}\n")
    assert (
        main(
            ["--from-file", str(prompts), "--batch-size", "2", "--seed", "30", "-o", f"{tmp_path}/b/", *STEPS]
        )
        == 0
    )
    assert main([short, "--seed", "30", "-o", str(tmp_path / "short.png"), *STEPS]) == 0
    assert main([long, "--seed", "31", "-o", str(tmp_path / "long.png"), *STEPS]) == 0
    assert_same_image(tmp_path / "b" / "00000.png", tmp_path / "short.png")
    assert_same_image(tmp_path / "b" / "00001.png", tmp_path / "long.png")


def test_metadata_and_reproduce_verify(tmp_path, capsys):
    out = tmp_path / "m.png"
    args = [
        "a large red circle on a blue background",
        "-o",
        str(out),
        "--seed",
        "77",
        "--negative",
        "blue",
        "--sampler",
        "euler_a",
        "--guidance",
        "4",
        *STEPS,
    ]
    assert main(args) == 0
    text = Image.open(out).text
    lines = text["parameters"].splitlines()
    assert lines[0] == "a large red circle on a blue background" and lines[1] == "Negative prompt: blue"
    assert "Steps: 4, Sampler: Euler a, CFG scale: 4.0, Seed: 77, Size: 64x64, Model hash: " in lines[2]
    record = json.loads(text["gen"])
    assert record["seed"] == 77 and record["options"]["sampler"] == "euler_a"
    assert record["scheduler"]["_class_name"] == "EulerAncestralDiscreteScheduler"
    assert set(record["versions"]) == {"gen", "torch", "diffusers", "transformers"}
    capsys.readouterr()
    assert main(["reproduce", str(out), "--verify"]) == 0
    assert "max pixel difference: 0" in capsys.readouterr().out
    tampered = tmp_path / "t.png"
    image = Image.open(out)
    image.point(lambda v: 255 - v).save(tampered, pnginfo=metadata.png_info(record))
    assert main(["reproduce", str(tampered), "--verify"]) == 1


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.cls])
def test_every_sampler_makes_an_image(tmp_path, name):
    out = tmp_path / "s.png"
    assert (
        main(
            ["a blue square on a yellow background", "-o", str(out), "--sampler", name, "--seed", "3", *STEPS]
        )
        == 0
    )
    image = pixels(out)
    assert image.shape == (64, 64, 3) and image.std() > 5  # a picture, not a flat or black field


def test_a_flow_only_sampler_is_refused_for_the_embedded_model_in_one_line(tmp_path, capsys):
    assert main(["a red circle", "-o", str(tmp_path / "x.png"), "--sampler", "euler_beta", *STEPS]) == 2
    err = capsys.readouterr().err.strip()
    assert "'euler_beta' is defined here for flow-matching models (SD3, Flux) only" in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()


def test_make_scheduler_keeps_training_settings():
    pipe = gen.load_pipeline()
    s = gen.make_scheduler("dpm++_2m_karras", pipe.scheduler.config)
    assert type(s).__name__ == "DPMSolverMultistepScheduler" and s.config.use_karras_sigmas
    assert s.config.beta_schedule == pipe.scheduler.config.beta_schedule == "scaled_linear"


BAD = [
    (
        ["x", "--sampler", "dpm_2m"],
        "unknown sampler 'dpm_2m' (did you mean 'dpm++_2m'?); choose one of: euler,",
    ),
    (["x", "--width", "60"], "width=60 must be a positive multiple of 8"),
    (["x", "--steps", "0"], "steps 0 must be an integer >= 1"),
    (["x", "--guidance", "-1"], "guidance -1.0 must be a finite number >= 0"),
    (["x", "--guidance", "nan"], "guidance nan must be a finite number"),
    (["x", "--model", "/nonexistent/model"], "model folder '/nonexistent/model' does not exist"),
    (["--from-file", "/nonexistent/p.txt"], "cannot read prompt file /nonexistent/p.txt"),
    (["x", "-o", "out.jpg"], "output 'out.jpg' must be a .png file or a folder"),
    (["x", "--dtype", "fp16"], "dtype fp16 is ~10x slower than fp32 on a CPU"),
    (["x", "-n", "0"], "num-images 0 must be an integer >= 1"),
    ([], "give a prompt or --from-file FILE"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m[:28] for _, m in BAD])
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, message):
    os.chdir(tmp_path)
    assert main([*STEPS, *argv]) == 2  # argv last: its --steps wins
    err = capsys.readouterr().err
    assert err.startswith("gen: error: ") and message in err and err.count("\n") == 1, err
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".png", ".tmp")]


def test_unwritable_output_and_bad_prompt_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["x", "-o", str(blocker / "o.png"), *STEPS]) == 2
    assert "is not a writable folder" in capsys.readouterr().err
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"a red circle\n\xff\xfe bad\n")
    assert main(["--from-file", str(bad), "-o", str(tmp_path / "o") + "/", *STEPS]) == 2
    assert f"{bad}:2: not valid UTF-8 text" in capsys.readouterr().err


def test_from_file_and_grid(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a blue background\n\na white star on black\n")
    grid = tmp_path / "grid.png"
    assert (
        main(
            [
                "--from-file",
                str(prompts),
                "-o",
                str(tmp_path / "o") + "/",
                "-n",
                "2",
                "--grid",
                str(grid),
                *STEPS,
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "o").glob("*.png"))) == 4
    assert Image.open(grid).size == (4 * 64, 64)


def test_ctrl_c_keeps_finished_images(tmp_path, capsys, monkeypatch):
    real, calls = G.render, []

    def interrupted(pipe, o, batch, on_step=None, init=None, control=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(pipe, o, batch, on_step, init, control)

    monkeypatch.setattr(G, "render", interrupted)
    assert main(["x", "-o", str(tmp_path / "o") + "/", "-n", "3", *STEPS]) == 130
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["00000.png"]
    assert "kept 1 finished image" in capsys.readouterr().err


def test_samplers_info_and_prompt_named_like_a_subcommand(tmp_path, capsys):
    assert main(["samplers"]) == 0
    assert "dpm++_2m_karras" in capsys.readouterr().out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (
        info["components"]["transformer"]["class"] == "DiT"
        and info["components"]["tokenizer"]["vocab_size"] == 49408
    )
    assert main(["--", "eval", "-o", str(tmp_path / "e.png"), *STEPS]) == 0
    assert main(["generate", "info", "-o", str(tmp_path / "g.png"), *STEPS]) == 0
    assert (tmp_path / "e.png").exists() and (tmp_path / "g.png").exists()


def test_eval_json(tmp_path, capsys, monkeypatch):
    import gen.evaluation as ev

    # Shrink the prompt set: the plumbing is under test here, not the model (that is the benchmark).
    small = ev.eval_scenes(3)
    monkeypatch.setattr(ev, "eval_scenes", lambda per_split=20, seed=4242: small)
    grid = tmp_path / "grid.png"
    assert main(["eval", "--images-per-prompt", "1", "--steps", "8", "--json", "--grid", str(grid)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"judge", "cfg 5", "no cfg", "grid"}
    assert set(report["cfg 5"]["accuracy"]) == {"seen", "held-out"}
    assert report["cfg 5"]["images"] == 6 and 0 <= report["cfg 5"]["accuracy"]["seen"]["all"] <= 1
    assert report["judge"]["clean"]["shape"] >= 0.98
    assert Image.open(grid).size == (4 * 64, 6 * 64)


def test_installed_executable(tmp_path):
    exe = shutil.which("gen")
    assert exe, "the gen console script is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [exe, "a red circle", "-o", str(tmp_path / "x.png"), "--seed", "4", *STEPS],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "x.png")
    bad = subprocess.run([exe, "x", "--steps", "0"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip() == "gen: error: steps 0 must be an integer >= 1"
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_accelerate_two_processes_equal_one(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a blue background\na small white star in the top right on black\n")
    common = ["--from-file", str(prompts), "-n", "2", "--seed", "5", *STEPS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        *components.accelerate_launch("gen"),
        *common,
        "-o",
        str(tmp_path / "multi") + "/",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        done.stderr.count("gen: 2 image(s) in") == 2
    )  # two processes (torchrun, gloo on CPU), two images each
    assert main([*common, "-o", str(tmp_path / "single") + "/"]) == 0
    names = sorted(p.name for p in (tmp_path / "multi").iterdir())
    assert names == [f"{k:05d}.png" for k in range(4)]
    for name in names:
        assert_same_image(tmp_path / "multi" / name, tmp_path / "single" / name)


def test_speed_flags_recorded_and_bad_flags_one_line(tmp_path, capsys):
    out = tmp_path / "g.png"
    assert (
        main(["a red circle", "-o", str(out), "--guidance-interval", "0,0.5", "--attention", "math", *STEPS])
        == 0
    )
    record = json.loads(Image.open(out).text["gen"])
    assert record["options"]["guidance_interval"] == [0.0, 0.5] and record["options"]["attention"] == "math"
    capsys.readouterr()
    for argv, message in (
        (["x", "--guidance-interval", "0.6,0.2"], "need 0 <= START < END <= 1"),
        (["x", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "usage:" not in err, err


@pytest.mark.parametrize(
    "argv", [["--help"], ["samplers"], ["x", "--steps", "abc"], ["x", "--sampler", "nope"]]
)
def test_help_samplers_and_argument_errors_load_no_torch(argv):
    # What is loaded, not how long it takes: torch and diffusers cost seconds on a cold start.
    code = (
        "import sys\nfrom gen.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:] + done.stderr[-500:]


def test_help_names_every_command(capsys):
    from gen.cli.main import SUBCOMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(f"\n  {name} " in text for name in SUBCOMMANDS if name != "generate"), text

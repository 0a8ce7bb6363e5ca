import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands_in_a_new_virtualenv():
    # A fresh venv, so a dependency installed by hand on the CI machine cannot hide one pyproject.toml lacks.
    readme = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()[:20]]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    setup, test = (line for line in readme if line.startswith("pip install torch"))
    assert setup.endswith(" -o out.png") and test.endswith(" && pytest")
    # The setup command verbatim, except that the image goes to the temporary folder, not into the clone.
    run = setup.removesuffix("out.png") + '"$work/out.png" || exit'
    venv = ['work="$(mktemp -d)"', 'python3 -m venv "$work/venv"', 'source "$work/venv/bin/activate"']
    order = [*venv, run, test]
    assert all(line in ci for line in order), [line for line in order if line not in ci]
    assert [ci.index(line) for line in order] == sorted(ci.index(line) for line in order)
    assert "set -euo pipefail" in ci


def test_import_gen_is_light():
    # No work at import time: `import gen` must not pull torch or diffusers in.
    code = "import sys, gen; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_saved_class_module_paths_are_pinned():
    # model_index.json records these; moving them breaks every saved pipeline.
    from gen.models import DiT
    from gen.pipelines import ControlNetPipeline, ImageToImagePipeline, InpaintPipeline, TextToImagePipeline

    assert DiT.__module__ == "gen.models.dit"
    assert TextToImagePipeline.__module__ == "gen.pipelines.text_to_image"
    assert ImageToImagePipeline.__module__ == "gen.pipelines.image_to_image"
    assert InpaintPipeline.__module__ == "gen.pipelines.inpaint"
    assert ControlNetPipeline.__module__ == "gen.pipelines.controlnet"


def test_wheel_carries_the_model_and_mapped_packages(tmp_path):
    import zipfile

    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(ROOT),
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("gen-*.whl"))).namelist()
    for path in (
        "gen/assets/shapes/model_index.json",
        "gen/assets/shapes/transformer/diffusion_pytorch_model.safetensors",
        "gen/assets/shapes/tokenizer/vocab.json",
        "gen/assets/shapes/judge/config.json",
        "gen/pipelines/text_to_image.py",
        "gen/train/common.py",
        "gen/serve/app.py",
        "gen/serve/page/index.html",
        "gen/serve/page/app.js",
    ):
        assert path in names, path


def test_text_encoder_lora_works_with_the_installed_peft(tokenizer):
    # transformers 5.24 refuses peft < 0.22 here, and PyPI's newest peft is 0.21: hence the pin below 5.24.
    import torch
    from peft import LoraConfig

    from tests import components

    encoder = components.text_encoder(tokenizer)
    ids = torch.tensor([tokenizer("a red circle", padding="max_length").input_ids])
    ref = encoder(ids)[0]
    encoder.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert any("lora_A" in name for name, _ in encoder.named_parameters())
    assert not torch.allclose(encoder(ids)[0], ref)

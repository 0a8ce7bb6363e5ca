import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests import components

ROOT = Path(__file__).resolve().parents[1]


def test_examples_run_on_a_saved_pipeline(tokenizer, tmp_path):
    model = tmp_path / "model"
    components.pipeline(tokenizer).save_pretrained(model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for script, out in (("generate.py", tmp_path / "a.png"), ("swap_scheduler.py", tmp_path / "s")):
        subprocess.run(
            [sys.executable, ROOT / "examples" / script, model, out], check=True, env=env, cwd=tmp_path
        )
    assert Image.open(tmp_path / "a.png").size == (32, 32)
    assert len(list(tmp_path.glob("s-*.png"))) == 3

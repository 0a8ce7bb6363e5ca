import json

from PIL import Image

from gen.cli import main


def test_generate_writes_png_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "sub" / "a.png"
    assert main(["a red circle on a blue background", "-o", str(out), "--steps", "4"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert Image.open(out).size == (64, 64)
    before = out.read_bytes()
    assert main(["x", "-o", str(out), "--steps", "4"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert not list(out.parent.glob(".*tmp"))


def test_prompt_equal_to_a_subcommand(tmp_path):
    assert main(["--", "eval", "-o", str(tmp_path / "e.png"), "--steps", "2"]) == 0
    assert main(["generate", "eval", "-o", str(tmp_path / "g.png"), "--steps", "2"]) == 0
    assert (tmp_path / "e.png").exists() and (tmp_path / "g.png").exists()


def test_missing_model_is_one_line_exit_2(tmp_path, capsys):
    assert main(["x", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gen: error:") and "does not exist" in err and err.count("\n") == 1


def test_eval_json(tmp_path, capsys, monkeypatch):
    import gen.eval as ev

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

"""The weight-free ControlNet preprocessors (gen.control) and `gen control detect`."""

import importlib.machinery

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from gen.cli.main import main
from gen.control import MODULES, detect


def picture(size=(96, 64)) -> Image.Image:
    """A dark square and a dark disc on white: lines and edges where a person would draw them."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 10, 40, 40], fill=(30, 30, 30))
    draw.ellipse([55, 15, 85, 45], outline=(0, 0, 0), width=3)
    return image


def test_canny_is_opencvs_with_a1111s_thresholds():
    image = picture()
    edges = np.asarray(detect(image, "canny"))
    want = cv2.Canny(np.asarray(image), 100, 200)
    assert edges.shape == (64, 96, 3) and (edges[..., 0] == want).all() and (edges == edges[..., :1]).all()
    assert edges[8:12, 20, 0].max() == 255 and edges[25, 25, 0] == 0  # the square's top edge, not its inside
    loose = np.asarray(detect(image, "canny", threshold_a=1, threshold_b=2))
    assert (loose > 0).sum() >= (edges > 0).sum()


def test_each_module_gives_an_rgb_control_image():
    image = picture()
    for name in MODULES:
        out = np.asarray(detect(image, name))
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, name
    rgb = np.asarray(image)
    assert (np.asarray(detect(image, "invert")) == 255 - rgb).all()
    assert set(np.unique(np.asarray(detect(image, "threshold")))) <= {0, 255}
    binary = np.asarray(detect(image, "binary"))  # Otsu: the dark strokes white, the paper black
    assert binary[25, 25, 0] == 255 and binary[5, 5, 0] == 0
    xdog = np.asarray(detect(image, "scribble_xdog"))
    assert xdog[30, 70, 0] == 0 and xdog[15:46, 55:86].max() == 255  # lines on the circle, none in its middle
    lines = np.asarray(detect(image, "lineart_standard"))
    assert lines[15, 70].max() > lines[5, 5].max()
    assert detect(image, "tile_resample", threshold_a=2.0).size == (48, 32)
    assert detect(image, "tile_resample").size == (96, 64)


def test_shuffle_is_seeded():
    image = picture()
    a, b = (np.asarray(detect(image, "shuffle", seed=s)) for s in (1, 1))
    assert (a == b).all() and not (a == np.asarray(detect(image, "shuffle", seed=2))).all()


def test_processor_resolution_is_the_short_side():
    assert detect(picture(), "canny", resolution=128).size == (192, 128)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("sobel", {}, "unknown preprocessor 'sobel'; choose one of none, canny, invert"),
        (
            "openpose",
            {},
            "preprocessor 'openpose' needs lllyasviel's Annotators weights (body_pose_model.pth) in",
        ),
        (
            "canny",
            {"threshold_a": 300},
            "threshold_a 300 for canny (low threshold) must be between 1 and 255",
        ),
        ("canny", {"resolution": 10}, "processor resolution 10 must be between 64 and 4096"),
    ],
)
def test_bad_requests_are_one_line_errors(name, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        detect(picture(), name, **kwargs)


def test_gen_control_detect(tmp_path, capsys):
    picture().save(tmp_path / "in.png")
    out = tmp_path / "edges.png"
    assert main(["control", "detect", "--module", "canny", str(tmp_path / "in.png"), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (np.asarray(Image.open(out)) == np.asarray(detect(picture(), "canny"))).all()
    assert (
        main(["control", "detect", "--module", "depth_midas", str(tmp_path / "in.png"), "-o", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("gen: error: preprocessor 'depth_midas' needs lllyasviel's Annotators weights")
        and err.count("\n") == 1
    )
    assert main(["control", "modules"]) == 0
    assert "canny" in capsys.readouterr().out


def test_threshold_is_on_the_darkest_channel_as_a1111s():
    red = Image.new("RGB", (8, 8), (200, 50, 50))
    assert np.asarray(detect(red, "threshold", threshold_a=127)).max() == 0  # A1111: black, not red
    assert np.asarray(detect(Image.new("RGB", (8, 8), (200, 200, 200)), "threshold")).min() == 255


class FakeOpenpose:
    """controlnet-aux's detector interface (from_pretrained(folder), then called on a PIL picture)."""

    loaded_from: list = []

    @classmethod
    def from_pretrained(cls, folder):
        cls.loaded_from.append(folder)
        return cls()

    def __call__(self, image, detect_resolution, image_resolution, output_type, include_hand, include_face):
        assert output_type == "np" and not include_hand and not include_face
        assert detect_resolution == image_resolution == min(image.size)
        return 255 - np.asarray(image)


def test_weight_based_modules_run_controlnet_aux_on_the_local_folder(tmp_path, monkeypatch):
    """With controlnet-aux importable and the Annotators file in $GEN_ANNOTATORS, openpose runs its detector from
    that folder (never the hub); without the file it is the one-line refusal naming the folder."""
    import sys
    import types

    from gen.control import _detector, available

    fake = types.ModuleType("controlnet_aux")
    fake.OpenposeDetector = FakeOpenpose
    fake.__spec__ = importlib.machinery.ModuleSpec("controlnet_aux", None)
    monkeypatch.setitem(sys.modules, "controlnet_aux", fake)
    monkeypatch.setenv("GEN_ANNOTATORS", str(tmp_path))
    _detector.cache_clear()
    with pytest.raises(
        ValueError, match=f"needs lllyasviel's Annotators weights \\(body_pose_model.pth\\) in {tmp_path}"
    ):
        detect(picture(), "openpose")
    assert "openpose" not in available()
    (tmp_path / "body_pose_model.pth").write_bytes(b"")
    made = np.asarray(detect(picture(), "openpose", resolution=64))
    assert FakeOpenpose.loaded_from == [str(tmp_path)] and made.shape == (64, 96, 3)
    resized = cv2.resize(np.asarray(picture()), (96, 64), interpolation=cv2.INTER_AREA)
    assert (made == 255 - resized).all()
    assert {"openpose", "openpose_full"} <= set(available())  # both read body_pose_model.pth
    _detector.cache_clear()

"""Clip skip as A1111 means it: its numbering (1 the last layer, 2 the penultimate), the encoders it applies to
(SD 1.x yes, SD 2.x no, SDXL only with its sdxl_clip_l_skip setting and then the first encoder alone), checked
against the layers read straight from transformers; the pipelines' own clip_skip keeps diffusers' meaning."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from gen.cli import main
from gen.generation import Options, check_options, metadata
from gen.generation.clip_skip import check_recorded, not_applied, pipeline_clip_skip
from gen.generation.core import validate
from gen.text.encode import final_layer_norm
from tests import components
from tests.images import assert_same_image

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return components.sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


def hidden_states(tokenizer, encoder, prompt=PROMPT) -> tuple[torch.Tensor, ...]:
    ids = tokenizer(
        prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return encoder(ids, output_hidden_states=True).hidden_states


def embeds(pipe, clip_skip) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(PROMPT, "cpu", 1, False, clip_skip=clip_skip)[0][0]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sd_reads_the_nth_layer_from_the_end_then_the_final_norm(unet_pipe, n):
    states = hidden_states(unet_pipe.tokenizer, unet_pipe.text_encoder)
    with torch.no_grad():
        want = final_layer_norm(unet_pipe.text_encoder)(states[-n])[0]
    got = embeds(unet_pipe, pipeline_clip_skip(unet_pipe, n))
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    assert pipeline_clip_skip(unet_pipe, n) == (None if n == 1 else n - 1)  # diffusers' count, one less


def test_sd2s_openclip_encoder_ignores_it(tokenizer, caplog):
    pipe = components.pipeline(tokenizer, "unet")
    config = pipe.text_encoder.config.to_dict() | {"hidden_act": "gelu"}  # OpenCLIP's, as SD 2.x's encoder
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**config)).eval()
    assert pipeline_clip_skip(pipe, 2) is None
    assert not_applied(pipe, 1) is None  # the default: nothing to say
    validate(pipe, Options(clip_skip=2, width=32, height=32))
    assert "clip skip 2 is not applied to SD 2.x's OpenCLIP text encoder, as in A1111" in caplog.text
    # a record of the first format whose clip skip gen then applied to SD 2.x: refused, not made differently
    with pytest.raises(
        ValueError, match=r"the pipelines' clip_skip=1, applied to this model's text encoders"
    ):
        check_recorded(pipe, 2, read_from_format=1)
    check_recorded(pipe, 2, read_from_format=2)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sdxl_with_clip_l_skip_reads_the_first_encoders_layer_alone(xl, n):
    first = hidden_states(xl.tokenizer, xl.text_encoder)[-n]  # no final norm on SDXL
    second = hidden_states(xl.tokenizer_2, xl.text_encoder_2)[-2]  # always the penultimate
    want = torch.cat([first, second], dim=-1)[0]
    got = embeds(xl, pipeline_clip_skip(xl, n, sdxl_clip_l_skip=True))
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    assert pipeline_clip_skip(xl, n, sdxl_clip_l_skip=True) == (n - 2, None)


def test_sdxl_without_the_setting_reads_both_penultimate_layers(xl):
    for n in (None, 1, 2, 3):
        assert pipeline_clip_skip(xl, n) is None
    # the setting alone is A1111's default Clip skip, 1: the first encoder's last layer
    assert pipeline_clip_skip(xl, None, sdxl_clip_l_skip=True) == (-1, None)
    assert not_applied(xl, 2) is None and not_applied(xl, 3, sdxl_clip_l_skip=True) is None
    assert "clip skip 3 is not applied to SDXL, as in A1111: --sdxl-clip-l-skip" in not_applied(xl, 3)
    # diffusers' own clip_skip, from Python, still reads both encoders (tests/test_sdxl.py: diffusers' images)
    both = torch.cat(
        [
            hidden_states(xl.tokenizer, xl.text_encoder)[-3],
            hidden_states(xl.tokenizer_2, xl.text_encoder_2)[-3],
        ],
        dim=-1,
    )[0]
    assert torch.allclose(embeds(xl, 1), both, atol=1e-6)


@pytest.mark.parametrize(
    "clip_skip, message",
    [
        (0, "clip skip 0 must be an integer >= 1 (A1111's numbering: 1 is the text encoder's last layer"),
        ("2", "clip skip '2' must be an integer >= 1"),
        (True, "clip skip True must be an integer >= 1"),
    ],
)
def test_bad_a1111_values_are_refused_in_one_line(clip_skip, message):
    with pytest.raises(ValueError) as e:
        check_options(Options(clip_skip=clip_skip))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a1111_values_past_the_encoders_layers_are_refused(unet_pipe, xl):
    check_options(Options(clip_skip=4))  # the bound is the model's
    with pytest.raises(
        ValueError, match=r"^clip skip 4 must be between 1 and 3: the text encoder has 3 layers"
    ):
        pipeline_clip_skip(unet_pipe, 4)
    with pytest.raises(ValueError, match=r"^clip skip 4 must be between 1 and 3: SDXL's first text encoder"):
        pipeline_clip_skip(xl, 4, sdxl_clip_l_skip=True)
    assert pipeline_clip_skip(xl, 4) is None  # not applied, so not refused


@pytest.mark.parametrize(
    "sdxl, clip_skip, message",
    [
        (False, (1, None), "clip_skip=(1, None): one value per text encoder is for SDXL's two"),
        (False, 3, "clip_skip=3 must be between 0 and 2: text_encoder has 3 layers"),
        (False, -1, "clip_skip=-1 must be between 0 and 2: text_encoder has 3 layers"),
        (True, (2, None), "clip_skip=2 must be between -1 and 1: text_encoder has 3 layers"),
        (True, (None, -2), "clip_skip=-2 must be between -1 and 1: text_encoder_2 has 3 layers"),
        (True, (1, 1, 1), "clip_skip=(1, 1, 1) must be an int, or a pair (first encoder, second) on SDXL"),
        (True, 1.5, "clip_skip=1.5 must be an integer (layers skipped) or None"),
    ],
)
def test_the_pipelines_refuse_bad_clip_skip_before_any_work(unet_pipe, xl, sdxl, clip_skip, message):
    pipe = xl if sdxl else unet_pipe
    for call in (
        lambda: pipe.encode_prompt(PROMPT, "cpu", clip_skip=clip_skip),
        lambda: pipe(PROMPT, clip_skip=clip_skip),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value).startswith(message), str(e.value)


def test_cli_on_sdxl_follows_a1111_and_reproduces(xl, tmp_path, caplog, capsys):
    folder = tmp_path / "sdxl"
    xl.save_pretrained(folder)

    def make(name, *flags):
        out = tmp_path / name
        assert (
            main([PROMPT, "--model", str(folder), "-o", str(out), "--steps", "3", "--seed", "2", *flags]) == 0
        )
        return out, np.asarray(Image.open(out).convert("RGB"))

    _, default = make("default.png")
    _, alone = make("alone.png", "--sdxl-clip-l-skip")  # A1111's default Clip skip, 1: CLIP-L's last layer
    assert np.abs(alone.astype(int) - default).max() > 0
    out, skipped = make("skip3.png", "--clip-skip", "3")
    assert "clip skip 3 is not applied to SDXL, as in A1111" in caplog.text  # the CLI prints the log
    assert_same_image(skipped, default, exact=True)
    assert "Clip skip: 3" in Image.open(out).text["parameters"]  # written as asked, as A1111 does
    caplog.clear()
    out, first = make("clip_l.png", "--clip-skip", "3", "--sdxl-clip-l-skip")
    assert "not applied" not in caplog.text
    assert np.abs(first.astype(int) - default).max() > 0
    record = json.loads(Image.open(out).text["gen"])
    assert (
        record["format"] == 2
        and record["options"]["clip_skip"] == 3
        and record["options"]["sdxl_clip_l_skip"]
    )
    assert main(["reproduce", str(out), "--verify", "--tolerance", "0"]) == 0
    # An earlier gen's record (no "format") of clip_skip=2 on SDXL read both encoders' layer -4: refused in one line
    del record["format"]
    record["options"] |= {"clip_skip": 2, "sdxl_clip_l_skip": False}
    old = tmp_path / "old.png"
    Image.fromarray(first).save(old, pnginfo=metadata.png_info(record))
    capsys.readouterr()
    assert main(["reproduce", str(old)]) == 2
    err = capsys.readouterr().err
    assert f"{old}: made by an earlier gen with the pipelines' clip_skip=2" in err and err.count("\n") == 1


def test_metadata_numbering_and_records_of_the_first_format(tmp_path):
    record = {
        "prompt": "x",
        "seed": 1,
        "options": {"steps": 4, "guidance": 5.0, "clip_skip": 2},
        "sampler_label": "Euler",
        "width": 64,
        "height": 64,
        "model_hash": "0" * 64,
        "model_name": "m",
    }
    assert "Clip skip: 2" in metadata.a1111_parameters(record)
    for value in (1, None):  # the last layer: A1111 leaves it out
        assert "Clip skip" not in metadata.a1111_parameters(
            {**record, "options": {"steps": 4, "guidance": 5.0, "clip_skip": value}}
        )
    # Records written before "format" held the pipeline's count (1 = the penultimate layer): read as A1111's 2.
    old = tmp_path / "old.png"
    Image.new("RGB", (8, 8)).save(
        old, pnginfo=metadata.png_info({**record, "options": {**record["options"], "clip_skip": 1}})
    )
    assert metadata.read(old)["options"]["clip_skip"] == 2
    Image.new("RGB", (8, 8)).save(
        old, pnginfo=metadata.png_info({**record, "options": {**record["options"], "clip_skip": 0}})
    )
    assert metadata.read(old)["options"]["clip_skip"] == 1  # the old 0 was the last layer, A1111's 1
    new = tmp_path / "new.png"
    Image.new("RGB", (8, 8)).save(new, pnginfo=metadata.png_info({**record, "format": 2}))
    assert metadata.read(new)["options"]["clip_skip"] == 2

"""gen serve's APIs through real clients, unchanged (webuiapi, openai, httpx), against a real uvicorn server.

Every served image is compared with the CLI's image for the same prompt, seed and settings, bit for bit: batching
and serving must not change a picture (README, "Seeds you can reproduce")."""

import base64
import io
import json
import threading

import openai
import pytest
import webuiapi
from PIL import Image

from gen.cli import main
from tests.images import assert_same_image, differ
from tests.serve_support import PROMPT, cli_image, png, serving, shared_models, wait_until

STEPS = 4
# Processed.js() in A1111's modules/processing.py
A1111_INFO_KEYS = set(
    "prompt all_prompts negative_prompt all_negative_prompts seed all_seeds subseed all_subseeds subseed_strength"
    " width height sampler_name cfg_scale steps batch_size restore_faces face_restoration_model sd_model_name"
    " sd_model_hash sd_vae_name sd_vae_hash seed_resize_from_w seed_resize_from_h denoising_strength"
    " extra_generation_params index_of_first_image infotexts styles job_timestamp clip_skip"
    " is_using_inpainting_conditioning version".split()
)


@pytest.fixture(scope="module")
def server():
    shared_models()  # loaded before the server starts, once for every test module
    with serving() as running:
        yield running


def webui(server, **kw) -> webuiapi.WebUIApi:
    port = int(server.url.rsplit(":", 1)[1])
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, **kw)


def test_webuiapi_txt2img_equals_the_cli_and_reproduces(server, tmp_path):
    api = webui(server, sampler="Euler a", steps=STEPS)
    result = api.txt2img(prompt=PROMPT, seed=5, width=64, height=64, cfg_scale=5.0, batch_size=2, n_iter=2)
    assert len(result.images) == 4 and result.images[0].size == (64, 64)
    info = result.info
    assert A1111_INFO_KEYS <= set(info), A1111_INFO_KEYS - set(info)
    assert info["all_seeds"] == [5, 6, 7, 8] and info["seed"] == 5 and info["sampler_name"] == "Euler a"
    assert info["sd_model_name"] == "shapes" and info["steps"] == STEPS and info["batch_size"] == 2
    assert info["infotexts"][3] == result.images[3].text["parameters"]
    assert "Seed: 8" in info["infotexts"][3] and "Sampler: Euler a" in info["infotexts"][3]
    assert result.parameters["prompt"] == PROMPT and result.parameters["seed"] == 5
    cli = cli_image(tmp_path, PROMPT, 7, "--steps", str(STEPS), "--sampler", "euler_a", "--cfg", "5")
    assert_same_image(result.images[2], cli)  # made beside batch-mates
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(result.json["images"][2]))
    assert main(["reproduce", str(served), "--verify"]) == 0


def test_seed_minus_one_is_random_and_recorded(server):
    api = webui(server, steps=1)
    first, second = (api.txt2img(prompt=PROMPT, seed=-1, width=64, height=64, batch_size=2) for _ in range(2))
    assert first.info["all_seeds"] != second.info["all_seeds"] and first.parameters["seed"] == -1
    s = first.info["seed"]
    assert first.info["all_seeds"] == [s, s + 1] and f"Seed: {s + 1}," in first.images[1].text["parameters"]


def test_sampler_names_are_a1111s_case_insensitive_with_aliases_and_schedulers(server, tmp_path):
    api = webui(server, steps=STEPS)
    names = {s["name"]: s["aliases"] for s in api.get_samplers()}
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS"} <= set(names)
    assert "k_euler_a" in names["Euler a"] and "euler_a" in names["Euler a"]
    assert [s["name"] for s in api.session.get(api.baseurl + "/schedulers").json()] == [
        "automatic",
        "karras",
        "simple",
        "beta",
    ]
    images = [
        api.txt2img(prompt=PROMPT, seed=3, width=64, height=64, sampler_name=name, scheduler=sched).image
        for name, sched in (("DPM++ 2M Karras", None), ("dpm++ 2m", "Karras"), ("k_dpmpp_2m_ka", "automatic"))
    ]
    assert all(im.text["parameters"].count("Sampler: DPM++ 2M Karras") == 1 for im in images)
    for im in images[1:]:
        assert_same_image(images[0], im, exact=True)
    cli = cli_image(tmp_path, PROMPT, 3, "--steps", str(STEPS), "--sampler", "dpm++_2m_karras", "--cfg", "7")
    assert_same_image(
        images[0], cli, exact=True
    )  # alone, as the CLI made it; webuiapi's default cfg_scale is 7
    with pytest.raises(RuntimeError, match="no Karras variant"):
        api.txt2img(prompt=PROMPT, width=64, height=64, sampler_name="Euler", scheduler="karras")
    with pytest.raises(RuntimeError, match="422.*euler_beta.{0,4} is defined here for flow-matching models"):
        api.txt2img(prompt=PROMPT, width=64, height=64, sampler_name="Euler", scheduler="Beta")
    with pytest.raises(RuntimeError, match="unknown sampler .*Nope"):
        api.txt2img(prompt=PROMPT, width=64, height=64, sampler_name="Nope")


def test_models_options_and_util_set_model(server):
    api = webui(server, steps=2)
    titles = api.util_get_model_names()
    tiny = next(t for t in titles if t.startswith("tiny ["))
    assert api.util_get_current_model().startswith("shapes [")
    api.util_set_model("tiny")  # webuiapi picks the closest title and posts it to /options
    try:
        assert api.util_get_current_model() == tiny
        result = api.txt2img(prompt="x", seed=1, width=32, height=32)
        assert result.info["sd_model_name"] == "tiny" and "Model: tiny" in result.image.text["parameters"]
        override = api.txt2img(
            prompt="x", seed=1, width=64, height=64, override_settings={"sd_model_checkpoint": "shapes"}
        )
        assert override.info["sd_model_name"] == "shapes"
    finally:
        api.set_options({"sd_model_checkpoint": titles[0] if titles[0].startswith("shapes") else titles[1]})
    assert api.get_options()["sd_model_checkpoint"].startswith("shapes [")
    bad = api.session.post(api.baseurl + "/options", json={"sd_model_checkpoint": "nope", "x": 1})
    assert bad.status_code == 422 and "nope" in bad.json()["detail"] and "tiny [" in bad.json()["detail"]
    api.set_options({"any_setting": 3})  # any dict is accepted and echoed
    assert api.get_options()["any_setting"] == 3


def test_clip_skip_setting_is_honoured_as_a1111s(server, tmp_path):
    """CLIP_stop_at_last_layers from override_settings or /options: the CLI's --clip-skip image, recorded."""
    api = webui(server, sampler="Euler", steps=STEPS)
    ask = {"prompt": PROMPT, "seed": 3, "width": 64, "height": 64, "cfg_scale": 5.0}
    result = api.txt2img(**ask, override_settings={"CLIP_stop_at_last_layers": 2})
    assert result.info["clip_skip"] == 2 and "Clip skip: 2" in result.image.text["parameters"]
    cli = cli_image(tmp_path, PROMPT, 3, "--steps", str(STEPS), "--sampler", "euler", "--clip-skip", "2")
    assert_same_image(result.image, cli, exact=True)
    assert differ(api.txt2img(**ask).image, cli)  # the default, 1: the last layer
    api.set_options({"CLIP_stop_at_last_layers": 2})
    try:
        assert_same_image(api.txt2img(**ask).image, cli, exact=True)
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    for value, message in (
        (0, "clip skip 0 must be an integer >= 1"),
        (40, "clip skip 40 must be between 1 and"),
    ):
        bad = api.session.post(api.baseurl + "/options", json={"CLIP_stop_at_last_layers": value})
        assert bad.status_code == 422 and message in bad.json()["detail"], bad.text
        assert api.get_options()["CLIP_stop_at_last_layers"] == 1  # nothing set
        override = api.session.post(
            api.baseurl + "/txt2img", json={**ask, "override_settings": {"CLIP_stop_at_last_layers": value}}
        )
        assert override.status_code == 422 and message in override.json()["detail"], override.text
    job = {"prompt": PROMPT, "seed": 3, "width": 64, "height": 64, "guidance": 5.0, "steps": STEPS}
    with server.client() as http:  # the jobs API: the same number, the same picture
        events = http.post("/gen/v1/jobs?stream=true", json={**job, "sampler": "euler", "clip_skip": 2}).text
        image = next(json.loads(line[6:]) for line in events.splitlines() if '"url"' in line)
        assert "Clip skip: 2" in image["parameters"]
        assert_same_image(Image.open(io.BytesIO(http.get(image["url"]).content)), cli, exact=True)


def test_progress_and_interrupt(server):
    api = webui(server)
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    out = {}
    worker = threading.Thread(
        target=lambda: out.update(
            r=api.txt2img(prompt=PROMPT, seed=1, steps=150, width=64, height=64, n_iter=2)
        )
    )
    worker.start()
    wait_until(lambda: api.get_progress()["state"]["sampling_step"] >= 2)
    busy = api.get_progress()
    assert (
        0 < busy["progress"] < 1
        and busy["state"]["job_count"] == 1
        and busy["state"]["sampling_steps"] == 150
    )
    assert busy["eta_relative"] > 0
    api.interrupt()
    worker.join(60)
    assert out["r"].images == [] and out["r"].info["status"] == "interrupted"
    assert api.get_progress()["state"]["interrupted"] is True


def test_png_info_reads_a1111_parameters(server):
    api = webui(server, steps=2)
    image = api.txt2img(prompt=PROMPT, negative_prompt="green", seed=11, width=64, height=64).image
    info = api.png_info(image).json
    assert info["info"] == image.text["parameters"]
    p = info["parameters"]
    assert (p["Prompt"], p["Negative prompt"], p["Seed"], p["Steps"]) == (PROMPT, "green", "11", "2")
    assert (p["Size-1"], p["Size-2"]) == ("64", "64") and json.loads(info["items"]["gen"])["seed"] == 11
    served = api.session.post(api.baseurl + "/txt2img", json={"prompt": "y", "steps": 1}).json()["images"][0]
    data_url = "data:image/png;base64," + served
    assert (
        api.session.post(api.baseurl + "/png-info", json={"image": data_url}).json()["parameters"]["Prompt"]
        == "y"
    )


def test_openai_client(server, tmp_path):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    response = client.images.generate(
        prompt=PROMPT,
        n=2,
        size="64x64",
        response_format="b64_json",
        model="dall-e-3",
        extra_body={"seed": 9, "steps": STEPS},
    )
    assert len(response.data) == 2 and response.created > 0
    second = png(response.data[1].b64_json)
    assert "Seed: 10" in second.text["parameters"]
    assert_same_image(second, cli_image(tmp_path, PROMPT, 10, "--steps", str(STEPS)))  # beside seed 9
    assert [m.id for m in client.models.list()] == ["shapes", "tiny"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.images.generate(prompt=PROMPT, model="nope")
    with pytest.raises(openai.BadRequestError, match="greater than or equal to 1"):
        client.images.generate(prompt=PROMPT, n=-1)
    with pytest.raises(openai.BadRequestError, match="size '12' must be WIDTHxHEIGHT"):
        client.images.generate(prompt=PROMPT, size="12")
    with pytest.raises(openai.BadRequestError, match="use b64_json"):
        client.images.generate(prompt=PROMPT, response_format="url")


def test_jobs_api_with_server_sent_events(server):
    with server.client() as http:
        created = http.post("/gen/v1/jobs", json={"prompt": PROMPT, "n": 2, "seed": 21, "steps": STEPS})
        assert created.status_code == 202 and created.headers["location"].endswith(created.json()["id"])
        job = created.json()
        events = []
        with http.stream("GET", f"/gen/v1/jobs/{job['id']}/events") as stream:
            name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
        names = [n for n, _ in events]
        assert names[-1] == "done" and names.count("image") == 2 and "state" in names
        assert any(d.get("progress", {}).get("step") == STEPS for n, d in events if n == "state")
        done = http.get(f"/gen/v1/jobs/{job['id']}").json()
        assert done["status"] == "done" and [i["seed"] for i in done["images"]] == [21, 22]
        download = http.get(done["images"][1]["url"])
        assert (
            download.headers["content-type"] == "image/png"
            and 'filename="gen-22.png"' in download.headers["content-disposition"]
        )
        assert png_bytes_parameters(download.content) == done["images"][1]["parameters"]
        assert http.get("/gen/v1/jobs/nope").status_code == 404
        assert http.post("/gen/v1/jobs", json={"prompt": "x", "stepz": 3}).status_code == 422  # typos refused


def test_streamed_job_on_the_post_connection(server):
    with (
        server.client() as http,
        http.stream(
            "POST", "/gen/v1/jobs?stream=true", json={"prompt": PROMPT, "seed": 2, "steps": 2}
        ) as stream,
    ):
        text = "".join(stream.iter_text())
    assert "event: image" in text and text.rstrip().splitlines()[-2] == "event: done"


def png_bytes_parameters(data: bytes) -> str:
    return png(base64.b64encode(data).decode()).text["parameters"]

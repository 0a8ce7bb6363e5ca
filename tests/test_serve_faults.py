"""Bad input gets a 4xx JSON error of one line and the server keeps serving; auth answers 401 before routing."""

import base64
import io
import json
import os
import subprocess
import sys

import httpx
import openai
import pytest
import webuiapi
from PIL import Image

from gen.serve import sampler_names
from gen.serve.config import ServeConfig
from gen.serve.middleware import basic_ok, bearer_ok
from gen.serve.results import parse_parameters
from tests.serve_support import PROMPT, serving, shared_models

BIG = 10 * 2**20  # 10 MB
SURROGATE = b'{"prompt": "a red circle \\ud83d", "steps": 1}'  # JSON's escape for half a UTF-16 pair


def png_header(width: int, height: int) -> str:
    """A PNG that says it is width x height (1-bit grey) and holds no pixel data: what a decompression bomb's
    header looks like, without building one."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    return base64.b64encode(data).decode()


def real_png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BOMB_20K, BOMB_12K, TINY_1X1 = png_header(20000, 20000), png_header(12000, 12000), real_png(1, 1)


@pytest.fixture(scope="module")
def server():
    shared_models()
    with serving() as running:
        yield running


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/sdapi/v1/txt2img", b"{bad json", 422, "not valid JSON"),
        ("/sdapi/v1/txt2img", b'{"prompt": "' + b"a" * BIG + b'"}', 413, "larger than this server accepts"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 16384, "height": 16384}, 422, "size 16384x16384"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 10**6}, 422, "steps 1000000 is more than"),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "x", "batch_size": -1},
            422,
            "batch_size=-1: Input should be greater than or equal to 1",
        ),
        ("/sdapi/v1/txt2img", {"prompt": "x", "n_iter": 0}, 422, "n_iter=0: Input should be greater"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 8, "n_iter": 8}, 422, "images in one request 64"),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "x", "seed": -5},
            422,
            "seed -5 must be an integer from 0 to 18446744073709551615",
        ),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 60}, 422, "nearest valid: 64"),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "x", "cfg_scale": "inf"},
            422,
            "cfg_scale='inf': Input should be a valid number",  # a string is not a number
        ),
        ("/sdapi/v1/txt2img", {"prompt": "x" * 30_000}, 422, "prompt length 30000"),
        ("/sdapi/v1/txt2img", ["not", "an", "object"], 422, "Input should be a valid dictionary"),
        (
            "/sdapi/v1/txt2img",
            b'{"prompt": "x", "cfg_scale": Infinity}',
            422,
            "Input should be a finite number",
        ),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "x", "cfg_scale": True},
            422,
            "cfg_scale=True: Input should be a valid",
        ),
        ("/gen/v1/jobs", {"prompt": "x", "guidance": False}, 422, "guidance=False: Input should be a valid"),
        ("/gen/v1/jobs", {"prompt": "x", "seed": False}, 422, "seed=False: Input should be a valid integer"),
        ("/sdapi/v1/png-info", {"image": "not base64!"}, 422, "not a base64-encoded picture"),
        ("/gen/v1/jobs", {"prompt": "x", "n": -3}, 422, "n=-3: Input should be greater"),
        ("/gen/v1/jobs", {"prompt": "x", "steps": -1}, 422, "steps=-1: Input should be greater"),
        ("/v1/images/generations", {"prompt": "x", "n": -1}, 400, "n=-1: Input should be greater"),
        ("/v1/images/generations", {"prompt": "x", "size": "16384x16384"}, 400, "size 16384x16384"),
        # A lone surrogate is valid JSON but not text: refused before it joins (and fails) a batch
        ("/sdapi/v1/txt2img", SURROGATE, 422, "prompt has an invalid character \\ud83d at position 13"),
        ("/gen/v1/jobs", SURROGATE, 422, "prompt has an invalid character \\ud83d"),
        ("/v1/images/generations", SURROGATE, 400, "prompt has an invalid character \\ud83d"),
        (
            "/sdapi/v1/txt2img",
            b'{"prompt": "x", "negative_prompt": "\\udcff"}',
            422,
            "negative prompt has an",
        ),
        # Finite, yet it overflows the latents: the sender's fault, named
        (
            "/sdapi/v1/txt2img",
            {"prompt": "x", "steps": 2, "cfg_scale": 1e30},
            422,
            "guidance_scale 1e+30 is far",
        ),
        (
            "/gen/v1/jobs?stream=true",
            {"prompt": "x", "steps": 2, "guidance": 1e30},
            200,
            "guidance_scale 1e+30",
        ),
        (
            "/v1/images/generations",
            {"prompt": "x", "steps": 2, "guidance_scale": 1e30},
            400,
            "guidance_scale 1e+30",
        ),
        # Decompression bombs: the header's size is checked before a pixel is decoded
        (
            "/sdapi/v1/img2img",
            {"init_images": [BOMB_20K]},
            422,
            "init image has more than this server allows",
        ),
        (
            "/sdapi/v1/img2img",
            {"init_images": [BOMB_12K]},
            422,
            "init image is 12000x12000 = 144000000 pixels, more",
        ),
        ("/gen/v1/jobs", {"prompt": "x", "init_image": BOMB_12K}, 422, "init image is 12000x12000"),
        ("/sdapi/v1/png-info", {"image": BOMB_20K}, 422, "image has more than this server allows"),
        (
            "/sdapi/v1/img2img",
            {"init_images": [TINY_1X1]},
            422,
            "the image is 1x1, smaller than this model's stride",
        ),
    ],
)
def test_bad_input_is_a_4xx_json_error_and_the_server_keeps_serving(server, path, body, status, message):
    with server.client() as http:
        if isinstance(body, bytes):
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = http.post(path, json=body)
        assert r.status_code == status, r.text
        if path.endswith("stream=true"):  # accepted, then the job's own stream says why it failed
            failed = r.text.split("event: failed\ndata: ")[1].split("\n")[0]
            detail = json.loads(failed)["error"]
        else:
            error = r.json()["error"]
            detail = error["message"] if path.startswith("/v1") else r.json()["detail"]
        assert message in detail and "\n" not in detail, detail
        assert http.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 1}).status_code == 200
        assert http.get("/gen/v1/info").json()["queue"]["waiting"] == 0  # nothing refused was queued


def test_a_streamed_10mb_body_without_length_is_refused_too(server):
    def chunks():
        for _ in range(BIG // 2**16):
            yield b"a" * 2**16

    with server.client() as http:
        r = http.post("/sdapi/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        assert http.get("/sdapi/v1/progress").status_code == 200


def test_unknown_routes_and_methods_are_json(server):
    with server.client() as http:
        assert http.get("/nope").json() == {"error": "not_found", "detail": "Not Found"}
        assert http.get("/sdapi/v1/txt2img").status_code == 405
        assert http.get("/v1/nope").json()["error"]["code"] == "not_found"  # OpenAI's shape under /v1


def test_empty_authorization_header_with_auth_off_works(server):
    with server.client() as http:
        assert http.get("/sdapi/v1/samplers", headers={"Authorization": ""}).status_code == 200
        assert http.get("/v1/models", headers={"Authorization": "Bearer whatever"}).status_code == 200


def test_basic_auth_answers_401_before_404_and_405():
    with serving(api_auth="alice:secret,bob:pw") as server, server.client() as http:
        for method, path in (
            ("GET", "/nope"),
            ("DELETE", "/sdapi/v1/txt2img"),
            ("GET", "/"),
            ("GET", "/docs"),
        ):
            r = http.request(method, path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), (method, path)
            assert r.json()["error"] == "unauthorized"
        for bad in (basic("alice", "wrong"), basic("carol", "secret"), {"Authorization": "Basic !!!"}, {}):
            assert http.get("/sdapi/v1/samplers", headers=bad).status_code == 401
        assert http.get("/nope", headers=basic("bob", "pw")).status_code == 404
        assert http.delete("/sdapi/v1/txt2img", headers=basic("alice", "secret")).status_code == 405
        assert (
            http.get("/v1/models", headers=basic("alice", "secret")).status_code == 200
        )  # no --api-key: Basic
        port = int(server.url.rsplit(":", 1)[1])
        ok = webuiapi.WebUIApi(port=port, username="alice", password="secret", steps=2)
        assert ok.txt2img(prompt=PROMPT, seed=1, width=64, height=64).info["all_seeds"] == [1]
        with pytest.raises(RuntimeError, match="401"):
            webuiapi.WebUIApi(port=port, username="alice", password="nope").txt2img(prompt=PROMPT)


def test_bearer_key_on_v1():
    with serving(api_key="sk-test", api_auth="alice:secret") as server:
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)
        assert len(good.images.generate(prompt=PROMPT, extra_body={"steps": 1}).data) == 1
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        r = httpx.get(server.url + "/v1/nope")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        assert (
            httpx.get(server.url + "/sdapi/v1/samplers", headers=basic("alice", "secret")).status_code == 200
        )


def test_auth_helpers_compare_every_entry():
    creds = ServeConfig(api_auth="a:1,b:2:with:colons").credentials()
    assert creds == [("a", "1"), ("b", "2:with:colons")]
    assert basic_ok(basic("b", "2:with:colons")["Authorization"], creds)
    assert not basic_ok(basic("a", "2:with:colons")["Authorization"], creds)
    assert (
        not basic_ok("Bearer x", creds)
        and bearer_ok("bearer  key ", "key")
        and not bearer_ok("Bearer k", "key")
    )
    with pytest.raises(ValueError, match="'nopassword' must be user:password"):
        ServeConfig(api_auth="a:1,nopassword").credentials()


def test_sampler_names_resolve_as_a1111_clients_send_them():
    assert sampler_names.resolve("EULER A") == sampler_names.resolve("k_euler_ancestral") == "euler_a"
    assert (
        sampler_names.resolve("DPM++ 2M", "Karras")
        == sampler_names.resolve("k_dpmpp_2m_ka")
        == "dpm++_2m_karras"
    )
    assert sampler_names.resolve("dpm++_sde_karras", "karras") == "dpm++_sde_karras"
    assert sampler_names.resolve(None) is None and sampler_names.resolve("", "Automatic") is None
    with pytest.raises(ValueError, match="scheduler 'Exponential' is not supported here"):
        sampler_names.resolve("Euler", "Exponential")


def test_parse_parameters_as_a1111():
    text = 'a "quoted" prompt\nsecond line\nNegative prompt: bad\nSteps: 4, Sampler: Euler a, Note: "x, y", Size: 64x32'
    assert parse_parameters(text) == {
        "Prompt": 'a "quoted" prompt\nsecond line',
        "Negative prompt": "bad",
        "Steps": "4",
        "Sampler": "Euler a",
        "Note": "x, y",
        "Size-1": "64",
        "Size-2": "32",
    }


def test_serve_help_and_bad_flags_load_no_torch_or_fastapi():
    code = (
        "import sys\nfrom gen.cli import main\nprint(main(sys.argv[1:]))\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    for argv in (["serve", "--max-batch", "0"], ["serve", "--api-auth", "nocolon"]):
        done = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
        )
        assert done.stdout.split("\n")[:2] == ["2", "[]"], done.stdout + done.stderr
        assert done.stderr.count("\n") == 1 and "gen: error:" in done.stderr


def test_openapi_docs_and_cors_only_when_asked(server):
    with server.client() as http:
        assert http.get("/docs").status_code == 200
        assert "/sdapi/v1/txt2img" in http.get("/openapi.json").json()["paths"]
        preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
        assert (
            "access-control-allow-origin" not in http.options("/sdapi/v1/txt2img", headers=preflight).headers
        )
    with serving(cors=["http://app.example"], api_auth="a:b") as other, other.client() as http:
        r = http.options(
            "/sdapi/v1/txt2img", headers=preflight
        )  # answered before auth: browsers send no password
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"


@pytest.mark.parametrize("device", ["cuda", "tpu", "mps"])
def test_serve_on_a_device_this_machine_lacks_is_one_line(device):
    done = subprocess.run(
        [sys.executable, "-m", "gen", "serve", "--device", device, "--state-dir", "none", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"gen: error: device '{device}' is not available on this machine; allowed: cpu" in done.stderr


@pytest.mark.parametrize(
    "path, body",
    [
        ("/sdapi/v1/txt2img", {"prompt": PROMPT, "cfg_scale": 1e20, "steps": 6}),
        ("/v1/images/generations", {"prompt": PROMPT, "guidance_scale": 1e20, "steps": 6}),
        ("/gen/v1/jobs?stream=true", {"prompt": PROMPT, "guidance": 1e20, "steps": 6}),
    ],
)
def test_a_huge_finite_guidance_is_a_valid_image_or_a_4xx_never_a_500(server, path, body):
    """The issue's cfg_scale 1e20: whether the latents overflow depends on the sampler and the steps; either the
    image is finite (a valid, if useless, picture) or the request is answered 4xx naming guidance_scale."""
    with server.client() as http:
        r = http.post(path, json=body)
        assert r.status_code in (200, 400, 422), r.text
        text = r.text
        if r.status_code != 200 or "event: failed" in text:
            assert "guidance_scale 1e+20 is far beyond the usual" in text, text[-500:]
        assert http.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 1}).status_code == 200

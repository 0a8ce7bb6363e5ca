"""gen serve's OpenAPI spec under a fuzzer: schemathesis generates requests from /openapi.json (valid ones, invalid
ones, and stateful sequences: create a job, fetch it, delete it, fetch it again) and checks every answer against
the spec -- no 5xx, status codes, content types, bodies and headers as declared, schema-valid requests accepted
(tests/schemathesis.toml names the cross-field rules a schema cannot state), schema-invalid ones refused. Small
limits keep each generated image cheap; the seed makes the run repeatable."""

import subprocess
import sys
from pathlib import Path

from tests.serve_support import PROMPT, serving, shared_models

CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_schemathesis_finds_nothing_and_the_server_still_serves(tmp_path):
    shared_models()
    limits = {"max_steps": 2, "max_pixels": 64 * 64, "max_images": 2, "max_batch": 2}
    with serving(**limits) as server:
        command = [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file",
            str(CONFIG),
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            "15",
            "--workers",
            "1",
            "--seed",
            "23",
            "--request-timeout",
            "120",
            "--no-color",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
        counted = next(line for line in done.stdout.splitlines() if " generated, " in line)
        generated, passed = (int(part.split()[0]) for part in counted.strip().split(", ")[:2])
        assert generated >= 200 and passed == generated, counted
        with server.client() as http:
            served = http.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "seed": 1})
            assert served.status_code == 200 and len(served.json()["images"]) == 1

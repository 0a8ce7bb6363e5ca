import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# --dtype auto picks fp32 in the tests and the commands they start, whatever this CPU: the images they compare bit
# for bit are fp32 ones (tests/test_precision.py forces each answer in turn)
os.environ["GEN_NATIVE_BF16"] = "0"
# An empty Annotators folder: the weight-based preprocessors' refusals do not depend on this machine's cache
os.environ["GEN_ANNOTATORS"] = __import__("tempfile").mkdtemp(prefix="gen-annotators-")

import pytest  # noqa: E402

from tests import components  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return components.write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def dit_pipe(tokenizer):
    return components.pipeline(tokenizer, "transformer")


@pytest.fixture
def unet_pipe(tokenizer):
    return components.pipeline(tokenizer, "unet")

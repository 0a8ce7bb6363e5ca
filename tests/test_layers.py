"""The import DAG in pyproject.toml ([tool.importlinter]), checked on the whole of gen, pipelines/ and train/ too.

grimp (import-linter's graph builder) reads packages from the file system and cannot follow setuptools'
package-dir mapping ("gen.pipelines" = "pipelines", "gen.train" = "train"). So the check runs on a copy of the
sources laid out as installed (gen/pipelines/, gen/train/), in a fresh process that finds that copy first.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {
    "gen": "gen",
    "pipelines": "gen/pipelines",
    "train": "gen/train",
}  # as [tool.setuptools] package-dir
LINT = (
    "import sys\nfrom importlinter.cli import lint_imports\n"
    "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))"
)


def installed_layout(into: Path) -> Path:
    """The Python sources of gen, pipelines/ and train/ under `into`, as the wheel lays them out."""
    for source, target in MAPPED.items():
        for path in (ROOT / source).rglob("*.py"):
            copy = into / target / path.relative_to(ROOT / source)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
    return into


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
    }  # grimp finds `gen` here, not the checkout's editable install
    cmd = [sys.executable, "-c", LINT, str(ROOT / "pyproject.toml")]
    return subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return installed_layout(tmp_path_factory.mktemp("layout"))


def test_every_module_keeps_to_its_layer_and_no_package_has_a_cycle(tree):
    done = lint(tree)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout, done.stdout[-3000:]
    # The mapped packages were in the graph: a copy that missed them would pass without checking them.
    assert (tree / "gen" / "pipelines" / "base.py").is_file() and (
        tree / "gen" / "train" / "trainer.py"
    ).is_file()


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # a function-level import up a layer, in a mapped package: the check sees both
        (
            "gen/pipelines/base.py",
            "def _up():\n    from gen.loading import pipeline\n",
            "gen.pipelines is not allowed",
        ),
        (
            "gen/train/shapes.py",
            "from gen.tools import bench\n",
            "gen.train is not allowed to import gen.tools",
        ),
        ("gen/data/scenes.py", "from gen.data import captions\n", "No cycles are allowed in gen.data"),
    ],
)
def test_an_import_against_the_layers_fails_the_check(tmp_path, module, line, broken):
    tree = installed_layout(tmp_path)
    with (tree / module).open("a") as f:
        f.write("\n" + line)
    done = lint(tree)
    assert done.returncode != 0 and broken in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]

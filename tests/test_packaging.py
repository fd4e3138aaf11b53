"""The library installs and imports without the experiments' dependencies."""

import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (optax is not listed: Flax itself depends on it and imports it.)
HEAVY = ("tensorflow_datasets", "tensorflow", "orbax", "matplotlib", "sklearn", "ml_collections",
         "tqdm")


def test_importing_the_library_pulls_no_experiment_dependency():
    code = (
        "import sys, deq, deq.nnx, deq.linen, deq.cells, deq.regularization\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT / "tests")
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.skipif(tomllib is None, reason="needs tomllib (Python >= 3.11)")
def test_required_dependencies_are_only_what_the_library_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert names == {"jax", "flax"}
    assert "orbax-checkpoint" in " ".join(project["optional-dependencies"]["experiments"])

"""The README: every Python block runs on its own, and its results come from the result files."""

import re
import subprocess
from pathlib import Path

import pytest

from experiments import readme_results as reproduce

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    text = README.read_text()
    return [
        "\n".join(line[indent:] for line in body.splitlines())
        for indent, body in (
            (len(m.group(1)), m.group(2))
            for m in re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M)
        )
    ]


def test_readme_has_the_examples():
    joined = "\n".join(_blocks())
    for needle in ("deq.fixed_point_sqrt", "deq.fixed_point(", "deq.nnx.DEQ", "deq.linen.DEQ",
                   "deq.backward_stats"):
        assert needle in joined, needle


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_python_block_runs_on_its_own(i):
    block = _blocks()[i]
    try:
        exec(compile(block, f"README.md block {i}", "exec"), {"__name__": f"readme_block_{i}"})
    except Exception as e:  # name the block that failed
        raise AssertionError(f"README python block {i} failed:\n{block}") from e


def test_readme_results_are_generated_from_the_result_files():
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=README.parent,
                             capture_output=True, text=True)
    if shallow.returncode or shallow.stdout.strip() != "false":
        pytest.skip("needs the repository's history (result sets name their commits)")
    text = README.read_text()
    assert reproduce.BEGIN in text and reproduce.END in text
    current = text[text.index(reproduce.BEGIN):text.index(reproduce.END) + len(reproduce.END)]
    assert current == reproduce.readme_block(), (
        "the README's results block differs from the result files: run "
        "`python -m experiments.reproduce readme`"
    )


def test_readme_speaks_to_users():
    text = README.read_text()
    for word in ("session", "issue #", "../shared", "/work/"):
        assert word not in text, word
    assert len(text.splitlines()) <= 250

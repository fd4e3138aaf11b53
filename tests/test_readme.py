"""Every Python block of the README runs as written (in order, in one namespace)."""

import re
from pathlib import Path

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
    blocks = _blocks()
    joined = "\n".join(blocks)
    for needle in ("deq.fixed_point_sqrt", "deq.fixed_point(", "deq.nnx.DEQ", "deq.linen.DEQ",
                   "deq.backward_stats"):
        assert needle in joined, needle


def test_readme_python_blocks_run(capsys):
    namespace: dict = {}
    for i, block in enumerate(_blocks()):
        try:
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"README python block {i} failed:\n{block}") from e

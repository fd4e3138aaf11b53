"""Docstring text shared by the NNX and Linen versions of a class, written once."""

from __future__ import annotations

import textwrap


def with_shared_doc(**blocks: str):
    """Class decorator: replace each line ``{name}`` of the docstring by ``blocks[name]``,
    indented like that line."""

    def fill(cls):
        lines = []
        for line in (cls.__doc__ or "").splitlines(keepends=True):
            key = line.strip()
            if key.startswith("{") and key.endswith("}") and key[1:-1] in blocks:
                indent = line[: len(line) - len(line.lstrip())]
                lines.append(textwrap.indent(blocks[key[1:-1]].strip("\n") + "\n", indent))
            else:
                lines.append(line)
        cls.__doc__ = "".join(lines)
        return cls

    return fill

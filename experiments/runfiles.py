"""A run's JSON files in its workdir (``config.json``, ``run_info.json``, ``summary.json``):
written atomically, so that a reader (another process of a multi-process run, a second run,
``deq-compare``) never sees half a file, and read with an error that names a damaged one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from experiments.errors import RunFileError


def write_json(path: Path, obj, **dump_kwargs) -> None:
    """``obj`` as JSON in ``path``, replacing the file in one step (rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, **dump_kwargs)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, role: str):
    """The JSON in ``path``; a file that does not parse raises RunFileError naming it, what it
    holds (``role``) and the way out."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFileError(
            f"{path} is not valid JSON ({e}); it holds {role}. Restore it from a copy, or "
            f"start over in a new --workdir.") from None

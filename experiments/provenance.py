"""Where a result comes from: the machine (CPU model and cores, the accelerators JAX sees) and
the provenance of a result set (commit, whether the tree was dirty, the command, versions)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a result depends on: a change under these paths after its commit makes it stale.
CODE_PATHS = ("deq", "experiments", "configs", "pyproject.toml")
RESULTS = ROOT / "experiments" / "results"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def code_pathspec() -> list[str]:
    return [*CODE_PATHS, ":(exclude)experiments/results"]


def machine() -> dict:
    """CPU model and cores, and the accelerators JAX sees."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = sorted({d.device_kind for d in jax.devices() if d.platform != "cpu"})
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": ", ".join(gpus) or None,
            "backend": jax.default_backend()}


def machine_name(m: dict) -> str:
    return m["gpu"] or f"{m['cpu']}, {m['cores']} cores (CPU)"


def provenance(command: list[str]) -> dict:
    import flax
    import jax

    if os.environ.get("DEQ_SOURCE_COMMIT"):
        # A source tree copied to another machine (e.g. a GPU host) without its .git, or with
        # a .git that is not the tree's: DEQ_SOURCE_COMMIT names the commit it was exported
        # from, clean.
        commit, dirty = os.environ["DEQ_SOURCE_COMMIT"], False
    else:
        try:
            commit = git("rev-parse", "HEAD")
            dirty = bool(git("status", "--porcelain", "--", *code_pathspec()))
        except (OSError, subprocess.CalledProcessError):
            commit, dirty = "unknown", True  # no git checkout: stale until rerun
    return {
        "git_commit": commit,
        "dirty": dirty,
        "command": shlex.join(command),
        "machine": machine(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def stale_sets(results: Path = RESULTS) -> dict[str, str]:
    """Result sets to rerun, with the reason: no provenance, a dirty tree, or code changed."""
    stale = {}
    for d in sorted(p for p in results.iterdir() if p.is_dir()):
        prov = d / "provenance.json"
        if not prov.exists():
            stale[d.name] = "no provenance.json"
            continue
        info = json.loads(prov.read_text())
        commit = info.get("git_commit", "")
        if info.get("dirty", True):
            stale[d.name] = "produced from a tree with uncommitted code changes"
            continue
        try:
            changed = git("diff", "--name-only", commit, "HEAD", "--", *code_pathspec())
        except subprocess.CalledProcessError:
            stale[d.name] = f"its commit {commit[:12]} is not in this repository"
            continue
        if changed:
            stale[d.name] = f"the code changed since {commit[:10]}"
    return stale


def write_results(out: Path, stem: str, md: str, data: dict, prov: dict) -> None:
    """A benchmark's result set: ``{stem}.md`` (printed too), ``{stem}.json`` (``data``) and
    ``provenance.json`` (``prov``) in ``out``, created if needed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
    print(md)

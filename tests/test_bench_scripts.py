"""The benchmark scripts under experiments/: each parses its command line (``--help`` exits 0),
and the loop-overhead benchmark runs end to end on a tiny setting."""

import json
import subprocess
import sys

import pytest

from experiments.provenance import ROOT

SCRIPTS = sorted(p.stem for p in (ROOT / "experiments").glob("bench_*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0(script):
    proc = subprocess.run([sys.executable, "-m", f"experiments.{script}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")


def test_a_wrong_flag_exits_2():
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_loop", "--bogus"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--bogus" in proc.stderr


@pytest.mark.slow
def test_bench_loop_quick_writes_its_table(tmp_path):
    cmd = [sys.executable, "-m", "experiments.bench_loop", "--quick", "--out", str(tmp_path),
           "--only", "fixed_point iteration batched"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["provenance"]["git_commit"]
    loops = {r["loop"] for r in res["rows"]}
    assert loops == {"fixed_point iteration batched"}, loops
    assert "fixed_point iteration batched" in (tmp_path / "results.md").read_text()

"""Data parallelism end to end on the smoke config: ``deq-train --distributed`` as two
processes on this machine (JAX's CPU collectives over gloo), and 8 forced CPU devices in one
process, against one device with the same global batch. (Exact agreement without the
stabiliser: ``tests/test_experiments.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.bench_distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def _train(workdir: Path, *extra: str, devices: int = 1) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.main", "--config", "configs/smoke.py",
         "--workdir", str(workdir),
         # No stabiliser: its random probes are drawn per device, so runs on different
         # device counts would differ by more than the reduction order.
         "--config.reg.jac_weight=0.0", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"a training process hung:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def test_two_processes_and_eight_devices_train_like_one(tmp_path):
    """Started together: a one-device run, an 8-device run in one process, and a run of two
    processes; all three train the same global batches."""
    port = free_port()
    procs = [_train(tmp_path / "two", "--distributed", f"--coordinator_address=localhost:{port}",
                    "--num_processes=2", f"--process_id={i}") for i in range(2)]
    eight = _train(tmp_path / "eight", devices=8)
    single = _train(tmp_path / "one")
    outs = [_finish(p) for p in procs]
    _finish(eight)
    _finish(single)
    # One process speaks for the run: process 1 prints no epoch lines.
    assert "epoch 2/2" in outs[0] and "epoch" not in outs[1], outs[1][-2000:]
    runs = {name: json.loads((tmp_path / name / "summary.json").read_text())
            for name in ("one", "two", "eight")}
    assert runs["two"]["machine"].endswith("2 JAX device(s)")
    assert runs["eight"]["machine"].endswith("8 JAX device(s)")
    # Records are written once: two epoch lines, not four.
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(r)["kind"] == "epoch" for r in lines) == 2 == runs["two"]["epochs"]
    # The same run up to the order of the gradient reductions: the same steps; accuracy and
    # samples at equilibrium within one of the 40 images.
    for name in ("two", "eight"):
        assert runs[name]["final_step"] == runs["one"]["final_step"] == 12
        assert runs[name]["test_accuracy"] == pytest.approx(runs["one"]["test_accuracy"],
                                                            abs=1 / 40)
        assert runs[name]["test_samples"] == 40
        assert abs(runs[name]["test_at_equilibrium"] - runs["one"]["test_at_equilibrium"]) <= 1


def test_distributed_flags_need_distributed(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.main", "--config", "configs/smoke.py",
         "--workdir", str(tmp_path / "w"), "--num_processes=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "go with --distributed" in out.stderr, out.stderr

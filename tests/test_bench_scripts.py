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


def test_bench_stabiliser_repeats_the_result_sets_runs():
    from experiments import bench_stabiliser as b
    from experiments.seeds import SET_OVERRIDES, short_run_overrides

    # Default: the runs of the config's result set (the mnist set trains one epoch).
    assert b.run_overrides("configs/mnist_deq.py", 0) == SET_OVERRIDES["mnist"]
    assert b.run_overrides("configs/mnist_multiscale_deq.py", 0) == \
        SET_OVERRIDES["mnist_multiscale"]
    assert b.run_overrides("configs/digits_deq.py", 5) == short_run_overrides(5)
    assert "data.limit_train=640" in short_run_overrides(5)


def test_bench_stabiliser_tables_from_rows():
    from experiments import bench_stabiliser as b

    def row(variant, seed, steps, acc, unconverged):
        return {"config": "mnist_deq", "variant": variant, "seed": seed, "train_steps": 468,
                "jac_target": 0.5,
                "test_fwd_steps": steps, "train_fwd_steps": steps - 1, "test_accuracy": acc,
                "median_step_time": 0.3, "test_worst_residual": 1e-4, "at_equilibrium": 1.0,
                "train_unconverged": unconverged, "train_bwd_unconverged": 0.0}

    rows = [row("with", 0, 9.0, 0.985, 0.0), row("without", 0, 18.0, 0.987, 0.04),
            row("with", 1, 8.0, 0.983, 0.0), row("without", 1, 16.0, 0.984, 0.0)]
    (agg,) = b.aggregate(rows)
    assert agg["eval_steps_ratio"] == pytest.approx(34 / 17)
    assert agg["accuracy_difference"]["mean"] == pytest.approx(-0.0015)
    assert agg["without"]["train_unconverged"]["mean"] == pytest.approx(0.02)
    assert b.steps_description(rows) == "mnist_deq 468"
    assert b.targets_description(rows) == "mnist_deq 0.5"
    md = b.markdown([agg], {"machine": "m", "commit": "c", "seeds": 2, "steps": "mnist_deq 468",
                            "targets": "mnist_deq 0.5"})
    assert "2.00x fewer forward steps" in md and "-0.15 +- 0.07 points" in md
    assert "reg.jac_target: mnist_deq 0.5" in md


def test_bench_stabiliser_refuses_a_config_without_a_result_set():
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_stabiliser", "--configs",
                           "configs/digits_deq.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--steps N" in proc.stderr

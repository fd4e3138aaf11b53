"""Data parallelism on one machine: the training step with 1 process against 2 processes (JAX's
multi-process runtime, CPU collectives over gloo), and 1 against 8 forced CPU devices in one
process.

Each variant trains the digits configs (DEQ and unrolled) for ``--epochs`` epochs (22 steps
each) of the same global batch with ``deq-train``, started as a user would
(``--distributed`` with an explicit coordinator for the two processes), and reports the
median training-step time and the final test accuracy. ``--root DIR`` runs another checkout
(e.g. an older commit, for a before/after).

Usage::

  python -m experiments.bench_distributed [--epochs 3] [--workdir runs/bench_distributed]

Writes ``bench_distributed.{md,json}`` and ``provenance.json`` into
``experiments/results/bench_distributed/`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("configs/digits_deq.py", "configs/digits_unrolled.py")
VARIANTS = ("1 process", "2 processes", "8 CPU devices")


def free_port() -> int:
    """A TCP port free on localhost now, for a coordinator address."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(root: Path, config: str, workdir: Path, overrides: list[str], env: dict,
            extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.main", "--config", str(root / config),
           "--workdir", str(workdir), *(f"--config.{o}" for o in overrides), *extra]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_variant(root: Path, config: str, variant: str, epochs: int, workdir: Path) -> dict:
    overrides = ["train.batch_size=64", f"train.num_epochs={epochs}",
                 "train.progress_bar=False", "train.log_every=5"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    wd = workdir / f"{Path(config).stem}_{variant.replace(' ', '_')}"
    if variant == "2 processes":
        port = free_port()
        procs = [_launch(root, config, wd, overrides, env,
                         ["--distributed", f"--coordinator_address=localhost:{port}",
                          "--num_processes=2", f"--process_id={i}"]) for i in range(2)]
    else:
        if variant == "8 CPU devices":
            env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        procs = [_launch(root, config, wd, overrides, env, [])]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"bench_distributed: {config} ({variant}) failed:\n{outs[0][-3000:]}")
    s = json.loads((wd / "summary.json").read_text())
    return {"config": Path(config).stem, "variant": variant,
            "median_step_time": s["median_step_time"], "test_accuracy": s["test_accuracy"],
            "final_step": s["final_step"], "machine": s["machine"]}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Data parallelism on one machine (experiments/bench_distributed.py)", "",
             f"Machine: {meta['machine']}; commit {meta['commit']}. The digits configs, "
             f"{meta['epochs']} epochs of batch 64 (the global batch in every variant); median "
             "training step over the logged intervals (5 steps each).", "",
             "| config | variant | step (ms) | vs 1 process | test accuracy |",
             "|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["config"] == r["config"] and b["variant"] == VARIANTS[0])
        lines.append(f"| {r['config']} | {r['variant']} | {1e3 * r['median_step_time']:.1f} | "
                     f"{r['median_step_time'] / base['median_step_time']:.2f}x | "
                     f"{100 * r['test_accuracy']:.2f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_distributed",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3, help="epochs of every run (22 steps each)")
    ap.add_argument("--root", default=str(ROOT), help="the checkout to run (default: this one)")
    ap.add_argument("--workdir", default="runs/bench_distributed")
    ap.add_argument("--out", default="experiments/results/bench_distributed")
    a = ap.parse_args(argv)
    if a.epochs < 1:
        ap.error("--epochs must be at least 1")
    root = Path(a.root).resolve()
    workdir = Path(a.workdir).resolve()
    rows = [run_variant(root, c, v, a.epochs, workdir) for c in CONFIGS for v in VARIANTS]

    from experiments.provenance import machine, machine_name, provenance, write_results

    prov = provenance(["python", "-m", "experiments.bench_distributed",
                       *(sys.argv[1:] if argv is None else argv)])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip()[:10]
    meta = {"machine": machine_name(machine()), "commit": commit, "epochs": a.epochs}
    write_results(a.out, "bench_distributed", markdown(rows, meta), {"meta": meta, "rows": rows},
                  prov)
    return rows


if __name__ == "__main__":
    main()

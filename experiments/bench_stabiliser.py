"""What the Jacobian penalty with its adaptive weight costs and buys, measured on short runs.

Each config trains ``--steps`` steps (batch 128, one pass over that many images) per seed,
twice: with the stabiliser as the config ships it (``reg.jac_auto``: the weight follows the
training solve's steps, see ``deq.regularization.AdaptiveWeight``) and without it
(``reg.jac_weight=0``). Reported per variant, mean +- std over the seeds: forward solver steps
at evaluation (with its fallback) and in training, test accuracy, test samples at equilibrium
(relative residual <= 1e-3) and the worst one, training solves (forward and backward) that
stopped unconverged, and the median training-step time.

Usage::

  python -m experiments.bench_stabiliser --mnist-dir DIR [--seeds 2] [--workdir runs/stab]

Writes ``bench_stabiliser.{md,json}`` and ``provenance.json`` into
``experiments/results/bench_stabiliser/`` (``--out``). Runs resume from ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

# config -> training steps of its runs (the multiscale cell costs ~5x the single-scale one).
CONFIGS = {"configs/mnist_deq.py": 300, "configs/mnist_multiscale_deq.py": 100}
VARIANTS = {"with": [], "without": ["reg.jac_weight=0.0"]}
FIELDS = ("test_fwd_steps", "train_fwd_steps", "test_accuracy", "median_step_time",
          "test_worst_residual")


def _run(config: str, steps: int, seed: int, variant: str, a) -> dict:
    from experiments.seeds import _train

    overrides = [f"data.limit_train={steps * 128}", "train.batch_size=128",
                 "train.num_epochs=1", "optim.warmup_steps=50", f"data.dir={a.mnist_dir}",
                 f"name={Path(config).stem}_{variant}", *VARIANTS[variant]]
    wd = _train(config, seed, Path(a.workdir), overrides)
    s = json.loads((wd / "summary.json").read_text())
    return {"config": Path(config).stem, "variant": variant, "seed": seed,
            **{k: s.get(k) for k in FIELDS},
            "at_equilibrium": s["test_at_equilibrium"] / s["test_samples"],
            "train_unconverged": s["train_fwd_unconverged"] / s["train_steps"],
            "train_bwd_unconverged": s["train_bwd_unconverged"] / s["train_steps"]}


def _ms(xs) -> dict:
    xs = np.asarray(xs, float)
    return {"mean": float(xs.mean()), "std": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0}


def aggregate(rows: list[dict]) -> list[dict]:
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        by = {v: [r for r in rows if r["config"] == config and r["variant"] == v]
              for v in VARIANTS}
        agg = {v: {k: _ms([r[k] for r in rs]) for k in
                   (*FIELDS, "at_equilibrium", "train_unconverged", "train_bwd_unconverged")}
               for v, rs in by.items()}

        def ratio(k, agg=agg):
            return agg["without"][k]["mean"] / agg["with"][k]["mean"]

        paired = [w["test_accuracy"] - o["test_accuracy"]
                  for w, o in zip(by["with"], by["without"])]
        out.append({"config": config, "seeds": len(by["with"]), **agg,
                    "eval_steps_ratio": ratio("test_fwd_steps"),
                    "step_time_ratio": 1 / ratio("median_step_time"),
                    "accuracy_difference": _ms(paired)})
    return out


def markdown(agg: list[dict], meta: dict) -> str:
    pm = lambda d, f="{:.1f}", s=1: (f.format(s * d["mean"]) + " +- "  # noqa: E731
                                     + f.format(s * d["std"]))
    lines = ["# The Jacobian stabiliser with its adaptive weight (experiments/bench_stabiliser.py)",
             "", f"Machine: {meta['machine']}; commit {meta['commit']}. MNIST, batch 128, "
             f"{meta['steps']} training steps, {meta['seeds']} seeds (mean +- std). 'with': the "
             "config as shipped (reg.jac_auto); 'without': reg.jac_weight=0. At equilibrium: "
             "test samples whose relative residual is at most 1e-3.", "",
             "| config | stabiliser | fwd steps eval | fwd steps train | test accuracy | "
             "at equilibrium | worst residual | train solves unconverged fwd / bwd | step (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in agg:
        for v in VARIANTS:
            d = a[v]
            lines.append(
                f"| {a['config']} | {v} | {pm(d['test_fwd_steps'])} | "
                f"{pm(d['train_fwd_steps'])} | {pm(d['test_accuracy'], '{:.2f}', 100)}% | "
                f"{pm(d['at_equilibrium'], '{:.2f}', 100)}% | "
                f"{d['test_worst_residual']['mean']:.1e} | "
                f"{pm(d['train_unconverged'], '{:.1f}', 100)}% / "
                f"{pm(d['train_bwd_unconverged'], '{:.1f}', 100)}% | "
                f"{pm(d['median_step_time'], '{:.0f}', 1e3)} |")
    lines.append("")
    for a in agg:
        lines.append(
            f"- {a['config']}: {a['eval_steps_ratio']:.2f}x fewer forward steps at evaluation "
            f"with the stabiliser, accuracy {100 * a['accuracy_difference']['mean']:+.2f} +- "
            f"{100 * a['accuracy_difference']['std']:.2f} points (paired by seed), training "
            f"step {a['step_time_ratio']:.2f}x.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_stabiliser",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--mnist-dir", default=os.environ.get("DEQ_MNIST_DIR", ""),
                    help="folder with the MNIST IDX files (default $DEQ_MNIST_DIR)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0,
                    help="training steps of every run (0: per config, "
                    + ", ".join(f"{Path(c).stem} {n}" for c, n in CONFIGS.items()) + ")")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="comma-separated config files (default: %(default)s)")
    ap.add_argument("--workdir", default="runs/bench_stabiliser")
    ap.add_argument("--out", default="experiments/results/bench_stabiliser")
    a = ap.parse_args(argv)
    if not a.mnist_dir or not Path(a.mnist_dir).expanduser().is_dir():
        ap.exit(2, "bench_stabiliser: needs MNIST: pass --mnist-dir DIR (the IDX files) or "
                   "set DEQ_MNIST_DIR.\n")

    from experiments.provenance import machine, machine_name, provenance, write_results

    rows = []
    for config in a.configs.split(","):
        steps = a.steps or CONFIGS.get(config, 300)
        for seed in range(a.seeds):
            for variant in VARIANTS:
                rows.append(_run(config, steps, seed, variant, a))
    agg = aggregate(rows)
    prov = provenance(["python", "-m", "experiments.bench_stabiliser",
                       *(sys.argv[1:] if argv is None else argv)])
    meta = {"machine": machine_name(machine()), "commit": prov["git_commit"][:10],
            "seeds": a.seeds, "steps": a.steps or ", ".join(
                f"{Path(c).stem} {CONFIGS.get(c, 300)}" for c in a.configs.split(","))}
    write_results(a.out, "bench_stabiliser", markdown(agg, meta),
                  {"meta": meta, "rows": rows, "aggregate": agg}, prov)
    return agg


if __name__ == "__main__":
    main()

"""What the Jacobian penalty with its adaptive weight costs and buys, measured on the runs of
the result sets.

Each config trains the runs of its result set (``python -m experiments.reproduce``): mnist_deq
one epoch (468 steps of batch 128), as the mnist set; mnist_multiscale_deq its set's 200 steps
of batch 128. Each run is made twice per seed: with the stabiliser as the config ships it
(``reg.jac_auto``: the weight follows the training solve's steps, see
``deq.regularization.AdaptiveWeight``) and without it (``reg.jac_weight=0``). ``--steps N``
trains short runs of N steps instead. Reported per variant, mean +- std over the seeds: forward
solver steps at evaluation (with its fallback) and in training, test accuracy, test samples at
equilibrium (relative residual <= 1e-3) and the worst one, training solves (forward and
backward) that stopped unconverged, and the median training-step time.

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

ROOT = Path(__file__).resolve().parents[1]

# config -> the result set whose runs it repeats (experiments.seeds.SET_OVERRIDES).
CONFIGS = {"configs/mnist_deq.py": "mnist", "configs/mnist_multiscale_deq.py": "mnist_multiscale"}
VARIANTS = {"with": [], "without": ["reg.jac_weight=0.0"]}
FIELDS = ("test_fwd_steps", "train_fwd_steps", "test_accuracy", "median_step_time",
          "test_worst_residual")


def run_overrides(config: str, steps: int) -> list[str]:
    """The config overrides of a run: its result set's (``steps`` 0), else a short run of
    ``steps`` steps of batch 128."""
    from experiments.seeds import SET_OVERRIDES, short_run_overrides

    if steps:
        return short_run_overrides(steps)
    return list(SET_OVERRIDES.get(CONFIGS[config], []))


def targets_description(rows: list[dict]) -> str:
    """'mnist_deq 0.5, mnist_multiscale_deq 0.3': each config's reg.jac_target as shipped."""
    return ", ".join(f"{c} {t}" for c, t in dict.fromkeys(
        (r["config"], r.get("jac_target")) for r in rows if r["variant"] == "with"))


def steps_description(rows: list[dict]) -> str:
    """'mnist_deq 468, mnist_multiscale_deq 200': the training steps of each config's runs."""
    steps = {}
    for r in rows:
        steps.setdefault(r["config"], set()).add(r["train_steps"])
    return ", ".join(f"{c} {'/'.join(str(n) for n in sorted(ns))}" for c, ns in steps.items())


def _run(config: str, steps: int, seed: int, variant: str, a) -> dict:
    from experiments.seeds import _train

    overrides = [*run_overrides(config, steps), f"data.dir={a.mnist_dir}",
                 f"name={Path(config).stem}_{variant}", *VARIANTS[variant]]
    wd = _train(config, seed, Path(a.workdir), overrides)
    s = json.loads((wd / "summary.json").read_text())
    cfg = json.loads((wd / "config.json").read_text())
    return {"config": Path(config).stem, "variant": variant, "seed": seed,
            "train_steps": s["train_steps"], "jac_target": cfg.get("reg.jac_target"),
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
             "config as shipped (reg.jac_auto; reg.jac_target: "
             f"{meta.get('targets', '-')}); 'without': reg.jac_weight=0. At equilibrium: "
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
                    help="training steps of every run (default 0: the runs of each config's "
                         "result set: " + ", ".join(f"{Path(c).stem} as the {n} set"
                                                    for c, n in CONFIGS.items()) + ")")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="comma-separated config files (default: %(default)s)")
    ap.add_argument("--workdir", default="runs/bench_stabiliser")
    ap.add_argument("--out", default="experiments/results/bench_stabiliser")
    a = ap.parse_args(argv)
    if a.steps < 0 or a.seeds < 1:
        ap.error("--steps must be >= 0 and --seeds >= 1")
    configs = a.configs.split(",")
    for config in configs:
        if not (ROOT / config).is_file():
            ap.error(f"--configs: no config file {config}")
        if not a.steps and config not in CONFIGS:
            ap.error(f"--configs: {config} has no result set to repeat; pass --steps N for "
                     "short runs of it")
    if not a.mnist_dir or not Path(a.mnist_dir).expanduser().is_dir():
        ap.exit(2, "bench_stabiliser: needs MNIST: pass --mnist-dir DIR (the IDX files) or "
                   "set DEQ_MNIST_DIR.\n")

    from experiments.provenance import machine, machine_name, provenance, write_results

    rows = []
    for config in configs:
        for seed in range(a.seeds):
            for variant in VARIANTS:
                rows.append(_run(config, a.steps, seed, variant, a))
    agg = aggregate(rows)
    prov = provenance(["python", "-m", "experiments.bench_stabiliser",
                       *(sys.argv[1:] if argv is None else argv)])
    meta = {"machine": machine_name(machine()), "commit": prov["git_commit"][:10],
            "seeds": a.seeds, "steps": steps_description(rows),
            "targets": targets_description(rows)}
    write_results(a.out, "bench_stabiliser", markdown(agg, meta),
                  {"meta": meta, "rows": rows, "aggregate": agg}, prov)
    return agg


if __name__ == "__main__":
    main()

"""Rerun a result set from a clean checkout and write what the README shows.

Usage::

  python -m experiments.reproduce digits                  # 5 seeds x (DEQ, unrolled), ~5 min
  python -m experiments.reproduce mnist --mnist-dir DIR   # 2 seeds x (DEQ, unrolled)
  python -m experiments.reproduce mnist_multiscale --mnist-dir DIR  # 1 seed, 200-step runs
  python -m experiments.reproduce stale                   # list result sets to rerun
  python -m experiments.reproduce readme                  # rewrite the README's results block

A set ``S`` is written to ``experiments/results/S/``: ``seeds.md`` / ``seeds.json`` (per-seed
accuracies, mean +- standard deviation, the paired DEQ - unrolled difference, memory, time,
solver steps), ``compute_accuracy.png`` / ``.json`` (test accuracy and equilibrium residual
against the number of forward solver steps at inference, DEQ and unrolled), ``solvers.md`` /
``.json`` (steps to a relative residual of 1e-4 on the trained DEQ's cell for plain iteration,
Anderson and Broyden) and ``provenance.json`` (the commit, whether the tree was clean, the
command, the machine, versions, the date). Training runs go to ``--workdir`` (default
``runs/reproduce``) and resume if interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
# What a result depends on: a change under these paths after its commit makes it stale.
CODE_PATHS = ("deq", "experiments", "configs", "pyproject.toml")
SETS = {
    "digits": ("configs/digits_deq.py", "configs/digits_unrolled.py"),
    "mnist": ("configs/mnist_deq.py", "configs/mnist_unrolled.py"),
    "mnist_multiscale": ("configs/mnist_multiscale_deq.py", "configs/mnist_multiscale_unrolled.py"),
}
DEFAULT_SEEDS = {"digits": 5, "mnist": 3, "mnist_multiscale": 1}
TITLES = {"digits": "Embedded digits", "mnist": "MNIST, 1-epoch runs"}
# The multiscale cell costs ~10x the single-scale step on a CPU: its set is a short run (the
# first SHORT_RUN_STEPS steps of batch 128, one epoch over that many images), without the
# compute-accuracy curves and the solver table.
SHORT_RUN_STEPS = 200
SET_OVERRIDES = {"mnist_multiscale": [f"data.limit_train={SHORT_RUN_STEPS * 128}",
                                      "train.batch_size=128", "train.num_epochs=1",
                                      "optim.warmup_steps=50"],
                 # One epoch (469 steps) per run, so that 3 seeds of both networks fit in
                 # about 20 minutes on 2 CPU cores.
                 "mnist": ["train.num_epochs=1"]}
BUDGET_FACTOR = 4  # the equilibrium check: accuracy again with this many times the eval budget
TITLES["mnist_multiscale"] = f"MNIST, multiscale cell, {SHORT_RUN_STEPS}-step runs"
WITH_CURVES = ("digits", "mnist")
STEPS_GRID = (1, 2, 4, 8, 12, 16, 24, 32, 50)
SOLVER_RTOL = 1e-4
SOLVER_MAX_STEPS = 200


# ------------------------------------------------------------------------------------------
# Provenance and staleness


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def _code_pathspec() -> list[str]:
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
            commit = _git("rev-parse", "HEAD")
            dirty = bool(_git("status", "--porcelain", "--", *_code_pathspec()))
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
            changed = _git("diff", "--name-only", commit, "HEAD", "--", *_code_pathspec())
        except subprocess.CalledProcessError:
            stale[d.name] = f"its commit {commit[:12]} is not in this repository"
            continue
        if changed:
            stale[d.name] = f"the code changed since {commit[:10]}"
    return stale


# ------------------------------------------------------------------------------------------
# Training the seeds


def _train(config_path: str, seed: int, workdir: Path, overrides: list[str]) -> Path:
    from experiments.cli import load_config
    from experiments.train import train_and_evaluate

    config = load_config(str(ROOT / config_path),
                         [f"seed={seed}", "train.progress_bar=False", *overrides])
    wd = workdir / f"{config.name}_seed{seed}"
    print(f"== {config.name} seed {seed}: training into {wd}", flush=True)
    train_and_evaluate(config, wd)
    return wd


def _mean_std(xs) -> dict:
    xs = np.asarray(xs, float)
    return {"mean": float(xs.mean()), "std": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0,
            "n": int(len(xs))}


SUMMARY_FIELDS = ("test_accuracy", "median_step_time", "train_step_temp_bytes", "train_fwd_steps",
                  "test_fwd_steps", "train_fwd_rel_residual", "test_fwd_rel_residual",
                  "train_bwd_steps", "num_params", "epochs", "test_at_equilibrium",
                  "test_samples", "test_worst_residual", "train_fwd_unconverged",
                  "train_steps")


def seeds_table(runs: dict[str, list[Path]]) -> dict:
    """Per-seed summaries of each mode and their aggregates (mean +- sample std)."""
    out = {"runs": {}, "aggregate": {}}
    for mode, wds in runs.items():
        rows = []
        for wd in wds:
            s = json.loads((wd / "summary.json").read_text())
            rows.append({"seed": json.loads((wd / "config.json").read_text())["seed"],
                         **{k: s.get(k) for k in SUMMARY_FIELDS}})
        out["runs"][mode] = rows
        out["aggregate"][mode] = {
            k: _mean_std([r[k] for r in rows]) for k in SUMMARY_FIELDS
            if all(isinstance(r[k], (int, float)) for r in rows)
        }
    deq_acc = {r["seed"]: r["test_accuracy"] for r in out["runs"]["deq"]}
    unr_acc = {r["seed"]: r["test_accuracy"] for r in out["runs"]["unrolled"]}
    paired = [deq_acc[s] - unr_acc[s] for s in sorted(deq_acc) if s in unr_acc]
    out["aggregate"]["paired_difference"] = _mean_std(paired)
    out["aggregate"]["paired_difference"]["per_seed"] = paired
    mem = [out["aggregate"][m]["train_step_temp_bytes"]["mean"] for m in ("deq", "unrolled")]
    out["aggregate"]["memory_ratio"] = mem[0] / mem[1]
    return out


def _pct(ms: dict) -> str:
    return f"{100 * ms['mean']:.2f}%" + (f" +- {100 * ms['std']:.2f}" if ms["n"] > 1 else "")


def _points(ms: dict) -> str:
    """A mean difference in points, with its spread when there is one."""
    return f"{100 * ms['mean']:+.2f}" + (f" +- {100 * ms['std']:.2f}" if ms["n"] > 1 else "")


def write_seed_tables(out: Path, runs: dict[str, list[Path]], machine_str: str,
                      budget: list[dict] | None = None) -> str:
    """``seeds.json`` and ``seeds.md`` in ``out`` from finished runs; returns the markdown."""
    table = seeds_table(runs)
    if budget:
        table["budget"] = budget
    (out / "seeds.json").write_text(json.dumps(table, indent=1))
    md = seeds_markdown(table, machine_str)
    (out / "seeds.md").write_text(md + "\n")
    return md


def seeds_markdown(table: dict, machine_str: str) -> str:
    agg = table["aggregate"]
    lines = [
        "| | test accuracy (mean +- std) | per seed | train step (median) | "
        "train-step memory | fwd steps train / test | fwd rel. residual train / test | "
        "test samples at equilibrium (worst residual) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("deq", "unrolled"):
        a, rows = agg[mode], table["runs"][mode]
        per_seed = ", ".join(f"{100 * r['test_accuracy']:.2f}" for r in rows)
        lines.append(
            f"| {mode} | {_pct(a['test_accuracy'])} | {per_seed} | "
            f"{1e3 * a['median_step_time']['mean']:.1f} ms | "
            f"{a['train_step_temp_bytes']['mean'] / 2**20:.1f} MiB | "
            f"{a['train_fwd_steps']['mean']:.1f} / {a['test_fwd_steps']['mean']:.1f} | "
            f"{a['train_fwd_rel_residual']['mean']:.1e} / "
            f"{a['test_fwd_rel_residual']['mean']:.1e} | {_equilibrium(rows)} |"
        )
    d = agg["paired_difference"]
    lines += [
        "",
        f"Paired difference DEQ - unrolled (same seed): {_points(d)} points over "
        f"{_seeds(d['n'])} "
        f"(per seed: {', '.join(f'{100 * x:+.2f}' for x in d['per_seed'])}). "
        f"Train-step memory DEQ / unrolled: {agg['memory_ratio']:.2f}x.",
        *([f"\n{_budget_sentence(table['budget'])}"] if table.get("budget") else []),
        "",
        f"Machine: {machine_str}.",
    ]
    return "\n".join(lines)


def _equilibrium(rows: list[dict]) -> str:
    """Test samples at equilibrium over the seeds, and the worst residual of any."""
    if any(r.get("test_samples") is None for r in rows):
        return "not recorded"
    n = sum(r["test_samples"] for r in rows)
    eq = sum(r["test_at_equilibrium"] for r in rows)
    return f"{eq} of {n} ({max(r['test_worst_residual'] for r in rows):.1e})"


def _budget_sentence(budget: list[dict]) -> str:
    changed = sum(b["changed"] for b in budget)
    n = sum(b["samples"] for b in budget)
    acc1 = 100 * np.mean([b["accuracy"] for b in budget])
    acc4 = 100 * np.mean([b["accuracy_more"] for b in budget])
    eq = sum(b["at_equilibrium_more"] for b in budget)
    return (f"Equilibrium check (DEQ): with {BUDGET_FACTOR}x the evaluation budget "
            f"({budget[0]['budget']} -> {budget[0]['budget_more']} steps, and as many again for "
            f"the fallback), {changed} of {n} test predictions change over the seeds; accuracy "
            f"{acc1:.2f}% -> {acc4:.2f}% (mean), {eq} of {n} samples at equilibrium.")


def budget_check(wds: list[Path]) -> list[dict]:
    """Each trained DEQ evaluated at its eval budget and at BUDGET_FACTOR times it: accuracy,
    samples at equilibrium and predictions that change (an equilibrium does not move)."""
    from flax import nnx

    from experiments.steps import EQUILIBRIUM_RTOL

    config = json.loads((wds[0] / "config.json").read_text())
    budget = config["solver.eval_max_steps"] or config["solver.max_steps"]
    out = [{"budget": budget, "budget_more": BUDGET_FACTOR * budget} for _ in wds]
    preds = {}
    for key, steps in (("", budget), ("_more", BUDGET_FACTOR * budget)):
        model, test = _eval_model(wds[0], **{"solver.eval_max_steps": steps})
        run = nnx.jit(lambda model, images: model.with_residuals(images))
        for i, wd in enumerate(wds):
            _load_params(model, wd)
            p, r = zip(*[(np.argmax(np.asarray(lo), -1), np.asarray(res)) for lo, res in
                         (run(model, images) for images, _ in _batches(test))])
            p, r = np.concatenate(p), np.concatenate(r)
            preds[key, i] = p
            out[i].update({f"accuracy{key}": float(np.mean(p == test.labels)),
                           f"at_equilibrium{key}": int(np.sum(r <= EQUILIBRIUM_RTOL)),
                           "samples": len(p)})
    for i in range(len(wds)):
        out[i]["changed"] = int(np.sum(preds["", i] != preds["_more", i]))
    return out



# ------------------------------------------------------------------------------------------
# Trained models: compute-accuracy curve and forward solvers on the trained cell


def _eval_model(wd: Path, **overrides):
    """The evaluation model described by a run's stored config (plus overrides), its test set."""
    from flax import nnx

    from experiments import data as data_lib
    from experiments import models
    from experiments.cli import load_config, set_fields

    config = load_config(str(ROOT / "configs" / "default.py"))
    set_fields(config, json.loads((wd / "config.json").read_text()))
    set_fields(config, overrides)
    _, test, info = data_lib.load_dataset(
        config.data.name, data_dir=config.data.dir or None,
        tfds_dir=config.data.tfds_dir or None, limit_test=config.data.limit_test or None,
    )
    model = models.Classifier(config, tuple(info["image_shape"]), info["num_classes"],
                              evaluation=True, rngs=nnx.Rngs(0))
    return model, test


def _load_params(model, wd: Path) -> None:
    """Put the parameters of a run's latest checkpoint into ``model`` (same architecture)."""
    from flax import nnx

    from experiments.train import load_checkpoint

    _, state = load_checkpoint(wd)

    def pure(tree):  # orbax restores each nnx.Param as {"value": array}
        if isinstance(tree, dict):
            return pure(tree["value"]) if set(tree) == {"value"} else {
                k: pure(v) for k, v in tree.items()}
        return tree

    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, pure(state["params"]))
    nnx.update(model, params)


def _batches(split, size=500):
    for i in range(0, len(split.labels), size):
        yield np.asarray(split.images[i:i + size]), np.asarray(split.labels[i:i + size])


def accuracy_at_depth(wds: list[Path], steps: int) -> list[dict]:
    """Test accuracy and residuals of trained runs (one config) when the solve gets ``steps``.

    One model and one compilation serve every run: only the parameters change.
    """
    import jax.numpy as jnp
    from flax import nnx

    # A tolerance out of reach, so the DEQ uses the whole budget like the unrolled network,
    # and no fallback, which would add up to as many steps again.
    model, test = _eval_model(wds[0], **{"solver.eval_max_steps": steps,
                                         "solver.eval_rtol": 1e-12, "solver.atol": 1e-12,
                                         "solver.eval_fallback": ""})

    @nnx.jit
    def run(model, images):
        logits = model(images)
        s = model.deq.stats.get_value()
        return jnp.argmax(logits, -1), s.mean_rel_residual, s.rel_residual

    out = []
    for wd in wds:
        _load_params(model, wd)
        correct, mean_res, worst = 0, 0.0, []
        for images, labels in _batches(test):
            pred, m, w = run(model, images)
            correct += int(np.sum(np.asarray(pred) == labels))
            mean_res += float(m) * len(labels)
            worst.append(float(w))
        n = len(test.labels)
        out.append({"steps": steps, "accuracy": correct / n, "mean_rel_residual": mean_res / n,
                    "worst_rel_residual": max(worst)})
    return out


def compute_accuracy(runs: dict[str, list[Path]], out: Path, machine_str: str) -> dict:
    curves = {}
    for mode, wds in runs.items():
        by_depth = [accuracy_at_depth(wds, k) for k in STEPS_GRID]  # [depth][seed]
        curves[mode] = [list(seed) for seed in zip(*by_depth)]  # [seed][depth]
    (out / "compute_accuracy.json").write_text(json.dumps(curves, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, per_seed in curves.items():
        acc = np.array([[p["accuracy"] for p in c] for c in per_seed])
        res = np.array([[p["mean_rel_residual"] for p in c] for c in per_seed])
        for ax, ys in ((axes[0], 100 * acc), (axes[1], res)):
            mean = ys.mean(0)
            ax.plot(STEPS_GRID, mean, marker="o", label=f"{mode} ({len(per_seed)} seeds)")
            if len(per_seed) > 1:
                ax.fill_between(STEPS_GRID, ys.min(0), ys.max(0), alpha=0.2)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_ylabel("mean relative residual |f(z) - z| / |f(z)|")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("forward solver steps at inference")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Test-time compute vs accuracy (band: min-max over seeds). {machine_str}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "compute_accuracy.png", dpi=110)
    plt.close(fig)
    return curves


def solver_steps(wd: Path) -> dict:
    """Per-sample steps to ``SOLVER_RTOL`` on the trained cell, for each forward solver."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import deq

    model, test = _eval_model(wd)
    _load_params(model, wd)
    layer = model.deq
    graphdef, state = nnx.split(layer.cell)

    def f(z, args):
        st, x = args
        return nnx.merge(graphdef, st)(z, x)

    solvers = {
        "FixedPointIteration": deq.FixedPointIteration(rtol=SOLVER_RTOL, atol=0.0),
        "Anderson": deq.Anderson(rtol=SOLVER_RTOL, atol=0.0),
        "Broyden": deq.Broyden(rtol=SOLVER_RTOL, atol=0.0),
    }
    out = {}
    for name, solver in solvers.items():

        def one(x, st, solver=solver):
            z0 = jnp.zeros(layer.cell.state_shape(x.shape)) if hasattr(
                layer.cell, "state_shape") else jnp.zeros_like(x)
            sol = deq.fixed_point(f, z0, (st, x), solver=solver, adjoint=deq.JacobianFreeAdjoint(),
                                  max_steps=SOLVER_MAX_STEPS, batched=False)
            return sol.stats.num_steps, sol.stats.converged

        per_sample = jax.jit(jax.vmap(one, in_axes=(0, None)))
        steps, conv = [], []
        for images, _ in _batches(test):
            x = model.deq_input(jnp.asarray(images))
            s, c = per_sample(x, state)
            steps.append(np.asarray(s))
            conv.append(np.asarray(c))
        steps, conv = np.concatenate(steps), np.concatenate(conv)
        out[name] = {"mean_steps": float(steps.mean()), "worst_steps": int(steps.max()),
                     "converged_fraction": float(conv.mean())}
    base = out["FixedPointIteration"]["mean_steps"]
    for v in out.values():
        v["vs_iteration"] = v["mean_steps"] / base
    return out


def solvers_markdown(per_seed: list[dict], machine_str: str) -> str:
    lines = [
        f"Steps to a relative residual of {SOLVER_RTOL:g} per test sample on the trained DEQ's "
        f"cell (budget {SOLVER_MAX_STEPS}), mean over {len(per_seed)} trained seed(s).",
        "",
        "| solver | mean steps | worst sample | vs plain iteration | converged |",
        "|---|---|---|---|---|",
    ]
    for name in per_seed[0]:
        m = np.mean([s[name]["mean_steps"] for s in per_seed])
        w = max(s[name]["worst_steps"] for s in per_seed)
        r = np.mean([s[name]["vs_iteration"] for s in per_seed])
        c = np.mean([s[name]["converged_fraction"] for s in per_seed])
        lines.append(f"| {name} | {m:.1f} | {w} | {r:.2f} | {100 * c:.1f}% |")
    lines += ["", f"Machine: {machine_str}."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# The README's results block


README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _prov_line(prov: dict | None, stale: str | None, rerun: str) -> str:
    if prov is None:
        return f"from an earlier version of the code, without provenance: rerun `{rerun}`"
    where = (f"{machine_name(prov['machine'])}, jax {prov.get('jax')}, commit "
             f"{prov['git_commit'][:10]}")
    return f"{where}; stale, {stale}: rerun `{prov['command']}`" if stale else where


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _verdict(d: dict) -> str:
    """What the paired accuracy difference shows, given its spread over seeds."""
    if d["n"] < 2:
        return "One seed: no spread, so no accuracy difference can be read from it."
    se = d["std"] / np.sqrt(d["n"])
    if abs(d["mean"]) <= 2 * se:
        return (f"The difference is within two standard errors (s.e. {100 * se:.2f} points) of "
                f"zero: at {d['n']} seeds the two networks' accuracies are not told apart.")
    side = "ahead of" if d["mean"] > 0 else "behind"
    return (f"The DEQ is {side} its unrolled baseline by more than two standard errors "
            f"(s.e. {100 * se:.2f} points) over {d['n']} seeds.")


def _seeds_lines(name: str, title: str, results: Path, stale: dict) -> list[str]:
    seeds = results / name / "seeds.json"
    if not seeds.exists():
        return []
    table = json.loads(seeds.read_text())
    prov_path = results / name / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.exists() else None
    agg, d = table["aggregate"], table["aggregate"]["paired_difference"]
    where = _prov_line(prov, stale.get(name), f"python -m experiments.reproduce {name}")
    lines = [
        f"- **{title}**, {_seeds(agg['deq']['test_accuracy']['n'])} each "
        f"([tables and plots](experiments/results/{name}/); {where}):"
        f" test accuracy DEQ {_pct(agg['deq']['test_accuracy'])}, unrolled "
        f"{_pct(agg['unrolled']['test_accuracy'])}; paired difference DEQ - unrolled "
        f"{_points(d)} points; train-step memory "
        f"{agg['memory_ratio']:.2f}x of the unrolled network's; train step "
        f"{1e3 * agg['deq']['median_step_time']['mean']:.1f} ms vs "
        f"{1e3 * agg['unrolled']['median_step_time']['mean']:.1f} ms. {_verdict(d)}"
    ]
    if all(r.get("test_samples") is not None for r in table["runs"]["deq"]):
        lines.append(f"  DEQ test samples at equilibrium (relative residual <= 1e-3, all seeds): "
                     f"{_equilibrium(table['runs']['deq'])}."
                     + (f" {_budget_sentence(table['budget'])}" if table.get("budget") else ""))
    curves = results / name / "compute_accuracy.json"
    if curves.exists():
        c = json.loads(curves.read_text())
        acc = {m: {k: 100 * np.mean([seed[i]["accuracy"] for seed in c[m]])
                   for i, k in enumerate(STEPS_GRID)} for m in c}
        lines.append(
            "  Test-time compute (mean over seeds, accuracy at 4 / 12 / 50 forward steps): DEQ "
            + " / ".join(f"{acc['deq'][k]:.1f}%" for k in (4, 12, 50)) + ", unrolled "
            + " / ".join(f"{acc['unrolled'][k]:.1f}%" for k in (4, 12, 50)) + "."
        )
    solvers = results / name / "solvers.json"
    if solvers.exists():
        sv = json.loads(solvers.read_text())
        ratio = {k: np.mean([s[k]["vs_iteration"] for s in sv]) for k in sv[0]}
        mean = {k: np.mean([s[k]["mean_steps"] for s in sv]) for k in sv[0]}
        lines.append(
            f"  Forward solvers on the trained cell (steps to a relative residual of "
            f"{SOLVER_RTOL:g}): plain iteration {mean['FixedPointIteration']:.1f}, Anderson "
            f"{mean['Anderson']:.1f} ({ratio['Anderson']:.2f}x), Broyden {mean['Broyden']:.1f} "
            f"({ratio['Broyden']:.2f}x)."
        )
    return lines


def _implicit_rows(res: dict) -> dict:
    return {r["name"]: r for r in res["steps"]
            if r.get("time_ms") is not None and r["group"] == "deq" and r.get("implicit")}


def _before_after(path: Path, res: dict) -> str:
    """How the implicit steps compare with the previous library's, where that run exists."""
    before = path.parent.parent / "bench_core_before" / path.name
    if not before.exists():
        return ""
    old, new = _implicit_rows(json.loads(before.read_text())), _implicit_rows(res)
    common = [k for k in new if k in old and old[k]["temp_bytes"]]
    if not common:
        return ""
    t = [new[k]["time_ms"] / old[k]["time_ms"] for k in common]
    m = [new[k]["temp_bytes"] / old[k]["temp_bytes"] for k in common]
    commit = json.loads(before.read_text())["provenance"]["git_commit"][:7]
    return (f"; against the library before forward-mode support (commit {commit}, same machine, "
            f"[table](experiments/results/{before.relative_to(RESULTS)}".replace(".json", ".md")
            + f")) its {len(common)} implicit steps take {min(t):.2f}x to {max(t):.2f}x the time "
            f"and {min(m):.2f}x to {max(m):.2f}x the memory")


def _bench_core_lines(results: Path, stale: dict) -> list[str]:
    lines = []
    for path in sorted([*results.glob("bench_core/bench_core_*.json"),
                        *results.glob("gpu/bench_core/bench_core_*.json")]):
        res = json.loads(path.read_text())
        if "provenance" not in res:
            continue
        c = res["config"]
        steps = [r for r in res["steps"] if r.get("time_ms") is not None]
        best = min(_implicit_rows(res).values(), key=lambda r: r["time_ms"])
        peers = {g: min((r["time_ms"] for r in steps if r["group"] == g), default=None)
                 for g in ("optimistix", "jaxopt")}
        vs = "".join(f", {t / best['time_ms']:.1f}x faster than {g}"
                     for g, t in peers.items() if t)
        flat = res["flatness"]
        growth = max(abs(r["growth"]) for r in flat["implicit"])
        fw = {r["key"]: r["ratio_vs_iteration"] for r in res["forward"]}
        rel = path.relative_to(results)
        lines.append(
            f"- **Core benchmark**, conv cell, batch {c['batch']}, {c['channels']} channels, "
            f"precision {c['precision']} ([{path.stem}](experiments/results/"
            f"{rel.with_suffix('.md')}); "
            f"{_prov_line(res['provenance'], stale.get(rel.parts[0]), '')}): fastest implicit "
            f"step {best['time_ms']:.0f} ms ({best['name'].removeprefix('deq implicit: ')}){vs}; "
            f"its memory changes by {100 * growth:.1f}% from 10 to 100 forward steps, unrolled "
            f"backprop adds {flat['unrolled_slope_bytes_per_step'] / 2**20:.1f} MiB per step; "
            f"Anderson needs {fw['anderson']:.2f}x and Broyden {fw['broyden']:.2f}x the steps of "
            f"plain iteration on this random-kernel cell{_before_after(path, res)}."
        )
    return lines


def _bench_derivatives_lines(results: Path, stale: dict) -> list[str]:
    lines = []
    for path in sorted([*results.glob("bench_derivatives/bench_derivatives_*.json"),
                        *results.glob("gpu/bench_derivatives/bench_derivatives_*.json")]):
        res = json.loads(path.read_text())
        c, rel = res["config"], path.relative_to(results)
        by = {(r["method"], r["derivative"]): r for r in res["rows"]}
        implicit = next(r["method"] for r in res["rows"] if r["method"].startswith("implicit"))
        unrolled = [m for m in dict.fromkeys(r["method"] for r in res["rows"])
                    if m.startswith("unrolled")][-2:]
        parts = []
        for d, label in (("hvp params", "Hessian-vector product in the parameters"),
                         ("force", "input gradient dL/dx"), ("jvp x", "forward-mode JVP")):
            i = by[(implicit, d)]
            vs = ", ".join(
                f"{by[(u, d)]['time_ms'] / i['time_ms']:.2f}x the time and "
                f"{by[(u, d)]['temp_bytes'] / i['temp_bytes']:.2f}x the memory at "
                f"{u.split(': ')[1].split(' ')[0]} steps (error {by[(u, d)]['rel_error']:.0e})"
                for u in unrolled)
            parts.append(f"{label}: implicit {i['time_ms']:.1f} ms, "
                         f"{i['temp_bytes'] / 2**20:.0f} MiB (error {i['rel_error']:.0e}); "
                         f"unrolled {vs}")
        lines.append(
            f"- **Derivatives beyond the gradient**, the core benchmark's cell, batch "
            f"{c['batch']}, {c['channels']} channels ([{path.stem}](experiments/results/"
            f"{rel.with_suffix('.md')}); "
            f"{_prov_line(res['provenance'], stale.get(rel.parts[0]), '')}"
            f"): " + "; ".join(parts) + ". Errors are against a tight implicit reference.")
    return lines


def _bench_eager_lines(results: Path, stale: dict) -> list[str]:
    path = results / "bench_eager" / "results.json"
    if not path.exists():
        return []
    res = json.loads(path.read_text())
    later = {(r["framework"], r["mode"]): r["later_s"] for r in res["rows"]}
    ratio = {fw: later[(fw, "eager")] / next(v for (f, m), v in later.items()
                                            if f == fw and m != "eager")
             for fw in ("nnx", "linen")}
    return [
        f"- **Eager calls** ([table](experiments/results/bench_eager/results.md); "
        f"{_prov_line(res['provenance'], stale.get('bench_eager'), '')}): after the first call, an "
        f"un-jitted DEQ model call takes {ratio['nnx']:.2f}x (NNX) and {ratio['linen']:.2f}x "
        f"(Linen) the time of the jitted call."
    ]


def _bench_own_cell_lines(results: Path, stale: dict) -> list[str]:
    lines = []
    for path in sorted((results / "bench_own_cell").glob("bench_own_cell_steps*.json")):
        res = json.loads(path.read_text())
        if "provenance" not in res:
            continue
        rows = {r["variant"]: r for r in res["rows"]}
        ref = rows["MDEQCell"]["step_ms"]
        own, plain = rows.get("own+recipe"), rows.get("own/plain nnx.Conv")
        if own is None:
            continue
        text = (
            f"- **Your own cell** ({res['meta']['data']}, {res['meta']['steps']} training steps; "
            f"[table](experiments/results/bench_own_cell/{path.name.replace('.json', '.md')}); "
            f"{_prov_line(res['provenance'], stale.get('bench_own_cell'), '')}): with the "
            f"recipe, {own['step_ms'] / ref:.2f}x the step time of `MDEQCell` of the same width, "
            f"{100 * own['train_converged_frac']:.0f}% of training and "
            f"{100 * own['eval_converged_frac']:.0f}% of test solves converged (worst test "
            f"residual {own['eval_res_worst']:.1e})"
        )
        if plain is not None:
            text += (
                f"; written plainly (`nnx.Conv`, no weight norm, no penalty) "
                f"{plain['step_ms'] / ref:.2f}x, {100 * plain['train_converged_frac']:.0f}% / "
                f"{100 * plain['eval_converged_frac']:.0f}% converged"
            )
        lines.append(text + ".")
    return lines


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _flax_row(r: dict, k: int) -> str:
    return (f"{100 * r['eval1x_res_1e3_frac']:.2f}% of test samples at equilibrium (worst "
            f"residual {r['eval1x_res_worst']:.1e}), accuracy {100 * r['eval1x_acc']:.2f}% "
            f"({100 * r[f'eval{k}x_acc']:.2f}% with {k}x the eval budget, "
            f"{r['pred_changed']} predictions changed), {r['eval1x_fwd_steps_mean']:.1f} forward "
            f"steps at evaluation, {r['train_unconverged']} of {r['train_steps']} training solves "
            f"unconverged")


def _bench_flax_example_lines(results: Path, stale: dict) -> list[str]:
    res = _load(results / "bench_flax_example" / "bench_flax_example.json")
    if res is None:
        return []
    k, rows = res["meta"]["eval_budget_mult"], {r["variant"]: r for r in res["rows"]}
    plain = rows.get("plain", {}).get("step_ms")
    vs = lambda r: f", step {r['step_ms'] / plain:.2f}x the plain CNN's" if plain else ""  # noqa
    parts = [f"{name}: {_flax_row(rows[key], k)}{vs(rows[key])}"
             for key, name in (("nnx", "NNX"), ("linen", "Linen")) if key in rows]
    if "own" in rows and "nnx" in rows:
        parts.append(f"the README's own cell in its place: step "
                     f"{rows['own']['step_ms'] / rows['nnx']['step_ms']:.2f}x the package "
                     f"cell's, {_flax_row(rows['own'], k)}")
    off = _load(results / "bench_flax_example_nostab" / "bench_flax_example.json")
    if off is not None:
        r = off["rows"][0]
        parts.append(f"without the stabiliser (NNX, `jac_reg_samples=0`): {_flax_row(r, k)}, "
                     f"step {r['step_ms']:.0f} ms against {rows['nnx']['step_ms']:.0f} ms")
    m = res["meta"]
    return [f"- **A DEQ dropped into the Flax NNX MNIST example** "
            f"(`deq.nnx.DEQ(MDEQCell(32, 32, num_groups=4))`, nothing else set; SGD 0.1, "
            f"momentum 0.9, batch {m['batch']}, {m['steps']} steps, {m['eval_images_used']} test "
            f"images; [table](experiments/results/bench_flax_example/bench_flax_example.md); "
            f"{_prov_line(res['provenance'], stale.get('bench_flax_example'), '')}): "
            + "; ".join(parts) + "."]


def _bench_stabiliser_lines(results: Path, stale: dict) -> list[str]:
    res = _load(results / "bench_stabiliser" / "bench_stabiliser.json")
    prov = _load(results / "bench_stabiliser" / "provenance.json")
    if res is None or prov is None:
        return []
    parts = []
    for a in res["aggregate"]:
        d = a["accuracy_difference"]
        parts.append(
            f"{a['config']}: {a['eval_steps_ratio']:.2f}x fewer forward steps at evaluation "
            f"({a['with']['test_fwd_steps']['mean']:.1f} against "
            f"{a['without']['test_fwd_steps']['mean']:.1f}), accuracy "
            f"{100 * d['mean']:+.2f} +- {100 * d['std']:.2f} points, training step "
            f"{a['step_time_ratio']:.2f}x, test samples at equilibrium "
            f"{100 * a['with']['at_equilibrium']['mean']:.2f}% against "
            f"{100 * a['without']['at_equilibrium']['mean']:.2f}%")
    return [f"- **What the stabiliser buys** (MNIST, {res['meta']['steps']} steps, "
            f"{res['meta']['seeds']} seeds, with against without; "
            f"[table](experiments/results/bench_stabiliser/bench_stabiliser.md); "
            f"{_prov_line(prov, stale.get('bench_stabiliser'), '')}): " + "; ".join(parts) + "."]


def _bench_distributed_lines(results: Path, stale: dict) -> list[str]:
    res = _load(results / "bench_distributed" / "bench_distributed.json")
    prov = _load(results / "bench_distributed" / "provenance.json")
    if res is None or prov is None:
        return []
    before = _load(results / "bench_distributed" / "before" / "bench_distributed.json")

    def ratios(rows, variant):
        base = {r["config"]: r["median_step_time"] for r in rows if r["variant"] == VARIANT_1}
        return ", ".join(f"{r['config'].split('_')[-1]} {r['median_step_time'] / base[r['config']]:.2f}x"
                         for r in rows if r["variant"] == variant)

    parts = []
    for variant in ("2 processes", "8 CPU devices"):
        text = f"{variant}: {ratios(res['rows'], variant)}"
        if before is not None:
            text += (f" (before per-device steps, commit {before['meta']['commit'][:7]}: "
                     f"{ratios(before['rows'], variant)})")
        parts.append(text)
    same = all(len({round(r["test_accuracy"], 6) for r in res["rows"] if r["config"] == c}) == 1
               for c in {r["config"] for r in res["rows"]})
    return [f"- **Data parallelism on one machine** (digits, {res['meta']['epochs']} epochs of "
            f"batch 64, the training step against one process; "
            f"[table](experiments/results/bench_distributed/bench_distributed.md); "
            f"{_prov_line(prov, stale.get('bench_distributed'), '')}): " + "; ".join(parts)
            + (". Test accuracy identical in every variant." if same else ".")]


VARIANT_1 = "1 process"


def readme_block(results: Path = RESULTS) -> str:
    """The README's results summary, generated from the result files (never hand-copied)."""
    stale = stale_sets(results)
    parts = [
        *(line for name, title in TITLES.items()
          for line in _seeds_lines(name, title, results, stale)),
        *_bench_flax_example_lines(results, stale),
        *_bench_stabiliser_lines(results, stale),
        *_bench_distributed_lines(results, stale),
        *_bench_core_lines(results, stale),
        *_bench_derivatives_lines(results, stale),
        *_bench_eager_lines(results, stale),
        *_bench_own_cell_lines(results, stale),
    ]
    return "\n".join([BEGIN, *parts, END])


def update_readme(path: Path = README) -> bool:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block.")
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: readme_block(), text,
                 flags=re.S)
    path.write_text(new)
    return new != text


# ------------------------------------------------------------------------------------------
# Command line


def run_set(name: str, seeds: int, workdir: Path, overrides: list[str], command: list[str],
            out: Path | None = None):
    prov = provenance(command)
    if prov["dirty"]:
        print("warning: the code has uncommitted changes; this set will be marked dirty "
              "(stale) until rerun from a clean commit.", file=sys.stderr)
    out = out or RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    deq_cfg, unrolled_cfg = SETS[name]
    runs = {"deq": [], "unrolled": []}
    overrides = [*SET_OVERRIDES.get(name, []), *overrides]
    for seed in range(seeds):
        runs["deq"].append(_train(deq_cfg, seed, workdir / name, overrides))
        runs["unrolled"].append(_train(unrolled_cfg, seed, workdir / name, overrides))
    machine_str = machine_name(prov["machine"])
    print("== equilibrium check: the DEQs again with more evaluation steps", flush=True)
    print(write_seed_tables(out, runs, machine_str, budget_check(runs["deq"])), flush=True)
    if name not in WITH_CURVES:
        (out / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
        print(f"\nwrote {out}")
        return
    print("== compute-accuracy curves", flush=True)
    compute_accuracy(runs, out, machine_str)
    print("== forward solvers on the trained cells", flush=True)
    solvers = [solver_steps(wd) for wd in runs["deq"]]
    (out / "solvers.json").write_text(json.dumps(solvers, indent=1))
    smd = solvers_markdown(solvers, machine_str)
    (out / "solvers.md").write_text(smd + "\n")
    print(smd)
    (out / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
    print(f"\nwrote {out}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m experiments.reproduce", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", choices=[*SETS, "stale", "readme"])
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds, 0..N-1 (default: 5 digits, 2 mnist, "
                             "1 mnist_multiscale)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/reproduce"),
                        help="where the training runs go (default runs/reproduce)")
    parser.add_argument("--mnist-dir", default=os.environ.get("DEQ_MNIST_DIR", ""),
                        help="folder with the MNIST IDX files (default $DEQ_MNIST_DIR)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result folder (default experiments/results/<set>)")
    parser.epilog = ("Config fields of every run can be overridden as in deq-train: "
                     "--config.<field>=<value>, e.g. --config.train.num_epochs=2.")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.set == "stale":
        stale = stale_sets()
        for name, why in stale.items():
            print(f"stale: experiments/results/{name}: {why}")
        if not stale:
            print("every result set is up to date with the code.")
        return 1 if stale else 0
    if args.set == "readme":
        changed = update_readme()
        print("README results block " + ("updated." if changed else "already up to date."))
        return 0
    overrides = [a.removeprefix("--") for a in rest]
    if args.set.startswith("mnist"):
        if not args.mnist_dir or not Path(args.mnist_dir).is_dir():
            parser.error("the mnist set needs --mnist-dir DIR (or DEQ_MNIST_DIR) with the "
                         "MNIST IDX files")
        overrides.append(f"data.dir={args.mnist_dir}")
    seeds = args.seeds or DEFAULT_SEEDS[args.set]
    run_set(args.set, seeds, args.workdir, overrides,
            ["python", "-m", "experiments.reproduce", *argv], out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The seeds of a result set: training them, their tables (accuracy, memory, time, solver
steps, test samples at equilibrium), the equilibrium check at a larger evaluation budget, the
compute-accuracy curves and the forward-solver table of the trained cells."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments.cli import load_config
from experiments.provenance import ROOT
from experiments.train import train_and_evaluate

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


def short_run_overrides(steps: int) -> list[str]:
    """The config overrides of a short MNIST run: its first ``steps`` steps of batch 128 (one
    epoch over that many images), with a 50-step warmup."""
    return [f"data.limit_train={steps * 128}", "train.batch_size=128", "train.num_epochs=1",
            "optim.warmup_steps=50"]


SET_OVERRIDES = {"mnist_multiscale": short_run_overrides(SHORT_RUN_STEPS),
                 # One epoch (468 steps of batch 128, the last partial batch dropped) per run,
                 # so that 3 seeds of both networks fit in about 20 minutes on 2 CPU cores.
                 "mnist": ["train.num_epochs=1"]}
BUDGET_FACTOR = 4  # the equilibrium check: accuracy again with this many times the eval budget
TITLES["mnist_multiscale"] = f"MNIST, multiscale cell, {SHORT_RUN_STEPS}-step runs"
WITH_CURVES = ("digits", "mnist")
STEPS_GRID = (1, 2, 4, 8, 12, 16, 24, 32, 50)
SOLVER_RTOL = 1e-4
SOLVER_MAX_STEPS = 200


# ------------------------------------------------------------------------------------------
# Training the seeds


def _train(config_path: str, seed: int, workdir: Path, overrides: list[str]) -> Path:
    config = load_config(str(ROOT / config_path),
                         [f"seed={seed}", "train.progress_bar=False", *overrides])
    wd = workdir / f"{config.name}_seed{seed}"
    print(f"== {config.name} seed {seed}: training into {wd}", flush=True)
    train_and_evaluate(config, wd)
    return wd


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _mean_std(xs) -> dict:
    xs = np.asarray(xs, float)
    return {"mean": float(xs.mean()), "std": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0,
            "n": int(len(xs))}


SUMMARY_FIELDS = ("test_accuracy", "median_step_time", "train_step_temp_bytes", "train_fwd_steps",
                  "test_fwd_steps", "train_fwd_rel_residual", "test_fwd_rel_residual",
                  "train_bwd_steps", "num_params", "epochs", "test_at_equilibrium",
                  "test_samples", "test_worst_residual", "train_fwd_unconverged",
                  "train_bwd_unconverged", "train_steps")


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
    training = _training_sentence(table["runs"]["deq"])
    lines += [
        "",
        f"Paired difference DEQ - unrolled (same seed): {_points(d)} points over "
        f"{_seeds(d['n'])} "
        f"(per seed: {', '.join(f'{100 * x:+.2f}' for x in d['per_seed'])}). "
        f"Train-step memory DEQ / unrolled: {agg['memory_ratio']:.2f}x.",
        *([f"\n{training}"] if training else []),
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


def _training_sentence(rows: list[dict]) -> str:
    """The DEQ's training solves that stopped unconverged, over the seeds ('' if not recorded)."""
    if any(r.get("train_fwd_unconverged") is None or r.get("train_steps") is None
           for r in rows):
        return ""
    n = sum(r["train_steps"] for r in rows)
    fwd = sum(r["train_fwd_unconverged"] for r in rows)
    out = f"Training solves unconverged (DEQ, all seeds): forward {fwd} of {n} batches"
    if all(r.get("train_bwd_unconverged") is not None for r in rows):
        out += f", backward (adjoint) {sum(r['train_bwd_unconverged'] for r in rows)} of {n}"
    return out + "."


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

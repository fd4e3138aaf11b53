"""A user's own conv cell in a DEQ: train-step time on CPU and convergence after a short run.

Four cells of the same width in the same classifier (conv stem, stride 2 -> DEQ -> flatten
head), the same layer options (Anderson, ``max_steps``, implicit adjoint, Jacobian penalty on
a sub-batch) and the same data:

* ``own+recipe``: the README's own cell ``z -> relu(GroupNorm(conv(z) + x))`` with the recipe:
  ``deq.cells.nnx.WeightNorm(deq.cells.nnx.Conv(...), init_scale=0.25)`` and the penalty;
* ``own+recipe/nnx.Conv``: the same, but the weight-normalised conv is Flax's ``nnx.Conv``
  (isolates the fast CPU gradient of ``deq.cells.nnx.Conv``);
* ``own/plain nnx.Conv``: the same cell as a user first writes it -- ``nnx.Conv``, no weight
  norm, no penalty (for contrast only);
* ``MDEQCell``: the package's cell (``deq.cells.nnx.MDEQCell``) with the penalty.

Each trains ``--steps`` steps (Adam, 1e-3) on MNIST from ``--data_dir`` (the sklearn digits,
upsampled to 28x28, if MNIST is absent) and reports: the median train-step time after
compilation, forward steps of the training solves, and per-sample relative residuals
``|f(z) - z| / |f(z)|`` of the training batches and of ``--eval_images`` test images after the
run (converged = at most the solver's rtol, 1e-4 by default; also the fraction under 1e-3).

Usage::

  python -m experiments.bench_own_cell [--steps 40] [--batch 64] [--width 16]

Writes ``bench_own_cell_steps<N>.{md,json}`` and ``provenance.json`` into
``experiments/results/bench_own_cell/`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import deq
import deq.nnx
from deq.cells.nnx import Conv, MDEQCell, WeightNorm

RTOL = 1e-4


class OwnCell(nnx.Module):
    """``z -> relu(GroupNorm(conv(z) + x))``, the cell a user writes."""

    def __init__(self, width: int, *, recipe: bool, fast_conv: bool, rngs: nnx.Rngs):
        conv_cls = Conv if fast_conv else nnx.Conv
        conv = conv_cls(width, width, (3, 3), use_bias=False, rngs=rngs)
        self.conv = WeightNorm(conv, init_scale=0.25) if recipe else conv
        self.norm = nnx.GroupNorm(width, num_groups=4, rngs=rngs)

    def __call__(self, z, x):
        return jax.nn.relu(self.norm(self.conv(z) + x))


VARIANTS = {
    "own+recipe": dict(own=True, recipe=True, fast_conv=True),
    "own+recipe/nnx.Conv": dict(own=True, recipe=True, fast_conv=False),
    "own/plain nnx.Conv": dict(own=True, recipe=False, fast_conv=False),
    "MDEQCell": dict(own=False, recipe=True, fast_conv=True),
}


class Model(nnx.Module):
    def __init__(self, width: int, max_steps: int, *, own: bool, recipe: bool, fast_conv: bool,
                 rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, width, (3, 3), strides=2, rngs=rngs)
        self.stem_norm = nnx.GroupNorm(width, num_groups=4, rngs=rngs)
        cell = (OwnCell(width, recipe=recipe, fast_conv=fast_conv, rngs=rngs) if own
                else MDEQCell(width, width, num_groups=4, rngs=rngs))
        # The layer's defaults include the stabiliser; the plain variant switches it off.
        self.deq = deq.nnx.DEQ(cell, solver=deq.Anderson(rtol=RTOL), max_steps=max_steps,
                               **({} if recipe else {"jac_reg_samples": 0}))
        self.head = nnx.Linear(width * 14 * 14, 10, rngs=rngs)

    def features(self, images):
        return jax.nn.relu(self.stem_norm(self.stem(images)))

    def __call__(self, images):
        x = self.features(images)
        z = self.deq(x)
        return self.head(z.reshape(z.shape[0], -1)), x, z


def _residuals(cell, z, x):
    fz = cell(z, x)
    return jnp.sqrt(jnp.sum((fz - z) ** 2, axis=(1, 2, 3)) / jnp.sum(fz ** 2, axis=(1, 2, 3)))


@nnx.jit
def train_step(model, optimizer, images, labels):
    def loss_fn(model):
        logits, x, z = model(images)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        # The residuals of this solve, with the parameters it used (before the update).
        res = jax.lax.stop_gradient(_residuals(model.deq.cell, z, x))
        return ce, (ce, res)  # the layer applies its stabiliser's gradient itself

    (_, (ce, res)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    steps = model.deq.stats.get_value().num_steps
    optimizer.update(model, grads)
    return ce, steps, res


@nnx.jit
def eval_residuals(model, images, labels):
    logits, x, z = model(images)
    return (logits.argmax(-1) == labels), model.deq.stats.get_value().num_steps, _residuals(
        model.deq.cell, z, x)


def load_data(data_dir: str | None, limit_train: int, limit_test: int):
    """MNIST from ``data_dir`` if its files are there, else the sklearn digits at 28x28."""
    if data_dir and Path(data_dir).expanduser().is_dir() and any(
        Path(data_dir).expanduser().glob("train-images*")
    ):
        from experiments import data as data_lib

        train, test, _ = data_lib.load_dataset("mnist", data_dir=data_dir,
                                               limit_train=limit_train, limit_test=limit_test)
        return "MNIST", (train.images, train.labels), (test.images, test.labels)
    from sklearn.datasets import load_digits

    d = load_digits()
    img = np.kron(d.images, np.ones((4, 4)))[:, 2:30, 2:30, None] / 16.0  # 32 -> 28
    img = ((img - img.mean()) / img.std()).astype(np.float32)
    y = d.target.astype(np.int32)
    return ("sklearn digits at 28x28 (MNIST absent)", (img[:1400], y[:1400]),
            (img[1400:1400 + limit_test], y[1400:1400 + limit_test]))


def run_variant(name, opts, args, train, test):
    model = Model(args.width, args.max_steps, rngs=nnx.Rngs(args.seed), **opts)
    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    times, fwd_steps, train_res, losses = [], [], [], []
    for step in range(args.steps):
        idx = rng.choice(len(train[0]), args.batch, replace=False)
        t0 = time.perf_counter()
        ce, steps, res = train_step(model, optimizer, train[0][idx], train[1][idx])
        jax.block_until_ready((ce, res))
        if step >= 2:  # the first two calls compile
            times.append(time.perf_counter() - t0)
        losses.append(float(ce))
        fwd_steps.append(int(steps))
        train_res.append(np.asarray(res))
    tail = np.concatenate(train_res[-max(1, args.steps // 4):])  # the last quarter of the run
    correct, eval_res, eval_steps = [], [], []
    for i in range(0, len(test[0]), args.batch):
        ok, steps, res = eval_residuals(model, test[0][i:i + args.batch],
                                        test[1][i:i + args.batch])
        correct.append(np.asarray(ok))
        eval_res.append(np.asarray(res))
        eval_steps.append(int(steps))
    eval_res = np.concatenate(eval_res)
    return {
        "variant": name,
        "step_ms": 1e3 * statistics.median(times),
        "train_loss_last": float(np.mean(losses[-5:])),
        "fwd_steps_mean": float(np.mean(fwd_steps[-max(1, args.steps // 4):])),
        "train_converged_frac": float(np.mean(tail <= RTOL * 1.01)),
        "train_res_1e3_frac": float(np.mean(tail <= 1e-3)),
        "train_res_median": float(np.median(tail)),
        "train_res_worst": float(np.max(tail)),
        "eval_acc": float(np.mean(np.concatenate(correct))),
        "eval_fwd_steps_mean": float(np.mean(eval_steps)),
        "eval_converged_frac": float(np.mean(eval_res <= RTOL * 1.01)),
        "eval_res_1e3_frac": float(np.mean(eval_res <= 1e-3)),
        "eval_res_median": float(np.median(eval_res)),
        "eval_res_worst": float(np.max(eval_res)),
    }


def markdown(rows, meta) -> str:
    ref = next(r for r in rows if r["variant"] == "MDEQCell")["step_ms"]
    lines = [
        "# A user's own conv cell in a DEQ (experiments/bench_own_cell.py)",
        "",
        f"Machine: {meta['machine']}; commit {meta.get('commit')}. Data: {meta['data']}. "
        f"Width {meta['width']}, batch "
        f"{meta['batch']}, {meta['steps']} Adam steps (lr {meta['lr']}), Anderson rtol {RTOL}, "
        f"max_steps {meta['max_steps']}, implicit adjoint; Jacobian penalty (1 probe, 32 "
        "samples) wherever the recipe is used. Step time: median after compilation. "
        "Residuals: per-sample |f(z)-z|/|f(z)|, training = last quarter of the run's batches, "
        f"eval = {meta['eval_images']} test images after the run; converged = at most rtol.",
        "",
        "| cell | step (ms) | vs MDEQCell | fwd steps (train / eval) | train converged "
        "(<=1e-3) | train residual median / worst | eval converged (<=1e-3) | eval residual "
        "median / worst | eval acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['step_ms']:.0f} | {r['step_ms'] / ref:.2f}x | "
            f"{r['fwd_steps_mean']:.1f} / {r['eval_fwd_steps_mean']:.1f} | "
            f"{100 * r['train_converged_frac']:.0f}% ({100 * r['train_res_1e3_frac']:.0f}%) | "
            f"{r['train_res_median']:.1e} / {r['train_res_worst']:.1e} | "
            f"{100 * r['eval_converged_frac']:.0f}% ({100 * r['eval_res_1e3_frac']:.0f}%) | "
            f"{r['eval_res_median']:.1e} / {r['eval_res_worst']:.1e} | "
            f"{100 * r['eval_acc']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--max_steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_images", type=int, default=512)
    p.add_argument("--data_dir", default=os.environ.get("DEQ_MNIST_DIR", ""),
                   help="folder with the MNIST IDX files (default $DEQ_MNIST_DIR)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--out", default="experiments/results/bench_own_cell")
    args = p.parse_args(argv)

    from experiments.provenance import provenance, write_results
    from experiments.train import machine_description

    data_name, train, test = load_data(args.data_dir, max(4096, args.batch * args.steps),
                                       args.eval_images)
    meta = {"machine": machine_description(), "data": data_name, "jax": jax.__version__,
            "commit": provenance([])["git_commit"][:10],
            **{k: v for k, v in vars(args).items() if k != "out"}}
    rows = []
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        rows.append(run_variant(name, VARIANTS[name], args, train, test))
        print(f"{name}: {rows[-1]} ({time.perf_counter() - t0:.0f}s)", flush=True)
    if not any(r["variant"] == "MDEQCell" for r in rows):
        print(json.dumps(rows, indent=1))
        return
    prov = provenance(["python", "-m", "experiments.bench_own_cell",
                       *(sys.argv[1:] if argv is None else argv)])
    write_results(args.out, f"bench_own_cell_steps{args.steps}", markdown(rows, meta),
                  {"meta": meta, "rows": rows, "provenance": prov}, prov)


if __name__ == "__main__":
    main()

"""A DEQ layer dropped "as is" into the Flax NNX MNIST example: converged solves? equilibria?

Flax's MNIST CNN (conv, Dropout, BatchNorm, relu, pool; conv, BatchNorm, relu, pool; two
Linear) with ``deq.nnx.DEQ(MDEQCell(32, 32, num_groups=4))`` after the first pooling, nothing
else set (``--layer-kwargs`` adds options); ``linen``: its Linen twin; ``own``: the README's own
cell (``z -> relu(GroupNorm(conv(z) + x))``, weight norm 0.25) in its place; ``plain``: no DEQ. SGD
on the cross-entropy alone (MNIST from ``--data_dir``, else sklearn digits at 28x28). Reports
the median step time (and vs plain), unconverged training solves (forward; backward: the
adjoint solves that warned) and their forward steps,
the final loss, and on test images, at the layer's eval budget and ``--eval-budget-mult``
times it: accuracy, per-sample ``|f(z) - z| / |f(z)|`` from the cell at the returned ``z``
(fraction <= 1e-3, <= the solver's rtol, worst), forward steps, predicted classes changed.

Usage (writes ``bench_flax_example.{md,json}`` and ``provenance.json`` into ``--out``,
default ``experiments/results/bench_flax_example``)::

  python -m experiments.bench_flax_example [--steps 150] [--variants plain,nnx,linen,own]
      [--layer-kwargs '{"jac_reg_samples": 1}'] [--eval-budget-mult 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import deq.cells.linen
import deq.linen
import deq.nnx
from deq import _layer_common as _common
from deq.cells.nnx import Conv, MDEQCell, WeightNorm

VARIANTS = ("plain", "nnx", "linen", "own")
_pool = lambda x: nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


class OwnCell(nnx.Module):
    """The README's own cell, ``z -> relu(GroupNorm(conv(z) + x))``, with its recipe."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = WeightNorm(Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs),
                               init_scale=0.25)
        self.norm = nnx.GroupNorm(channels, num_groups=2, rngs=rngs)

    def __call__(self, z, x):
        return jax.nn.relu(self.norm(self.conv(z) + x))


class CNN(nnx.Module):
    """Flax's NNX MNIST example; a DEQ after the first pooling unless layer_kwargs is None
    (``own``: the README's own cell instead of ``MDEQCell``)."""

    def __init__(self, layer_kwargs: dict | None, *, rngs: nnx.Rngs, own: bool = False):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(32, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.025, rngs=rngs)
        extra = {"rngs": rngs} if (layer_kwargs or {}).get("jac_reg_samples") else {}
        cell = OwnCell(32, rngs=rngs) if own else MDEQCell(32, 32, num_groups=4, rngs=rngs)
        self.deq = nnx.data(None) if layer_kwargs is None else deq.nnx.DEQ(
            cell, **layer_kwargs, **extra)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(64, rngs=rngs)
        self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=0.025, rngs=rngs)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def features(self, x):  # the DEQ's input x
        return _pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))

    def head(self, z):
        x = _pool(nnx.relu(self.batch_norm2(self.conv2(z))))
        return self.linear2(nnx.relu(self.dropout2(self.linear1(x.reshape(x.shape[0], -1)))))

    def __call__(self, x):
        x = self.features(x)
        return self.head(x if self.deq is None else self.deq(x))


class LinenCNN(nn.Module):
    """The same model in Linen; ``layer_kwargs`` (key, value) pairs of the DEQ layer."""

    layer_kwargs: tuple = ()

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dropout(0.025, deterministic=not train)(nn.Conv(32, (3, 3))(x))
        x = nn.avg_pool(nn.relu(nn.BatchNorm(use_running_average=not train)(x)), (2, 2), (2, 2))
        z = deq.linen.DEQ(cell=deq.cells.linen.MDEQCell(32, num_groups=4),
                          **dict(self.layer_kwargs))(x, deterministic=not train)
        self.sow("intermediates", "deq_io", (x, z))  # the DEQ's input and output, for residuals
        x = nn.BatchNorm(use_running_average=not train)(nn.Conv(64, (3, 3))(z))
        x = nn.avg_pool(nn.relu(x), (2, 2), (2, 2)).reshape(x.shape[0], -1)
        x = nn.Dropout(0.025, deterministic=not train)(nn.relu(nn.Dense(256)(x)))
        return nn.Dense(10)(x)


_residuals = lambda fz, z: jnp.sqrt(((fz - z) ** 2).sum((1, 2, 3)) / (fz ** 2).sum((1, 2, 3)))
_ce = lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
# What the layers' implicit adjoint warns from a backward solve that did not converge.
_BACKWARD_WARNING = "backward (adjoint) solve did not converge"
_budget = _common.eval_max_steps  # the layers' own eval budget and solver (fallback included)
_info = lambda m: {"rtol": float(_common.eval_solver(m).rtol), "eval_budget": _budget(m)}


@nnx.jit
def nnx_train_step(model, optimizer, images, labels):
    loss, grads = nnx.value_and_grad(lambda m: _ce(m(images), labels))(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def nnx_eval_step(model, images):
    x = model.features(images)
    if model.deq is None:
        return model.head(x).argmax(-1), None, None
    z = model.deq(x)  # residuals from the cell itself, at the returned z:
    fz = model.deq.cell(z, x)
    return model.head(z).argmax(-1), _residuals(fz, z), model.deq.stats.get_value().num_steps


def setup_nnx(args, layer_kwargs, own=False):
    """train(x, y) -> (loss, stats); evaluate(mult) -> x -> (classes, residuals, fwd steps)."""
    model = CNN(layer_kwargs, rngs=nnx.Rngs(args.seed), own=own)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    model.train()

    def train(images, labels):
        loss = nnx_train_step(model, optimizer, images, labels)
        return loss, None if model.deq is None else model.deq.stats.get_value()

    def evaluate(mult):
        model.eval()
        m = nnx.clone(model)
        if m.deq is not None and mult != 1:
            m.deq.eval_max_steps = mult * _budget(m.deq)
        return lambda images: nnx_eval_step(m, images)

    return train, evaluate, None if model.deq is None else _info(model.deq)


def setup_linen(args, layer_kwargs):
    """The same for the Linen twin (see :func:`setup_nnx`)."""
    model = LinenCNN(tuple(sorted(layer_kwargs.items())))
    layer = deq.linen.DEQ(cell=deq.cells.linen.MDEQCell(32, num_groups=4), **layer_kwargs)
    key, tx = jax.random.key(args.seed), optax.sgd(0.1, momentum=0.9)
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 28, 28, 1)), train=False))(key)
    state = [v["params"], v["batch_stats"], tx.init(v["params"]), key]  # updated by train

    @jax.jit
    def step(params, batch_stats, opt_state, key, images, labels):
        key, k_drop, k_jac = jax.random.split(key, 3)
        def loss_fn(params):
            logits, upd = model.apply(
                {"params": params, "batch_stats": batch_stats}, images, train=True,
                rngs={"dropout": k_drop, "jac_reg": k_jac},
                mutable=["batch_stats", "intermediates", "losses"])
            return _ce(logits, labels), upd
        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), upd["batch_stats"], opt_state, key, loss,
                upd["intermediates"]["DEQ_0"]["stats"][0])

    def train(images, labels):
        *state[:], loss, stats = step(*state, images, labels)
        return loss, stats

    def evaluate(mult):
        kw = dict(layer_kwargs, **({"eval_max_steps": mult * _budget(layer)} if mult != 1 else {}))
        m = model.clone(layer_kwargs=tuple(sorted(kw.items())))
        @jax.jit
        def run(params, batch_stats, images):
            logits, upd = m.apply({"params": params, "batch_stats": batch_stats}, images,
                                  train=False, mutable=["intermediates"])
            x, z = upd["intermediates"]["deq_io"][0]
            fz = layer.cell.apply({"params": params["DEQ_0"]["cell"]}, z, x)
            steps = upd["intermediates"]["DEQ_0"]["stats"][0].num_steps
            return logits.argmax(-1), _residuals(fz, z), steps

        return lambda images: run(state[0], state[1], images)

    return train, evaluate, _info(layer)


def run_variant(name, args, layer_kwargs, train_data, test):
    setup = {"linen": setup_linen, "own": lambda *a: setup_nnx(*a, own=True)}.get(name, setup_nnx)
    train, evaluate, info = setup(args, None if name == "plain" else layer_kwargs)
    rng, times, losses, stats = np.random.default_rng(args.seed), [], [], []
    bwd_failed = []  # training steps whose backward (adjoint) solve did not converge
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", deq.nnx.UnconvergedWarning)
        # The layers' implicit adjoint warns (RuntimeWarning) from each failed backward solve.
        warnings.simplefilter("always", RuntimeWarning)
        for i in range(args.steps):
            idx = rng.choice(len(train_data[0]), args.batch, replace=False)
            seen = len(caught)
            t0 = time.perf_counter()
            loss, st = train(train_data[0][idx], train_data[1][idx])
            jax.block_until_ready(loss)
            if i >= 2 or args.steps <= 2:  # the first two calls compile
                times.append(time.perf_counter() - t0)
            losses.append(float(loss))
            stats.append(st)
            jax.effects_barrier()  # the step's host callbacks (warnings) have run
            if any(_BACKWARD_WARNING in str(w.message) for w in caught[seen:]):
                bwd_failed.append(i)
    warned = [str(w.message) for w in caught if issubclass(w.category, deq.nnx.UnconvergedWarning)]
    for message in warned:
        print(f"{name}: UnconvergedWarning: {message}", file=sys.stderr)
    row = {"variant": name, "step_ms": 1e3 * float(np.median(times)),
           "train_loss_end": float(np.mean(losses[-10:])), "train_steps": args.steps}
    if name != "plain":
        frac = [float(s.converged_fraction) for s in stats if hasattr(s, "converged_fraction")]
        row.update(**info, train_unconverged=sum(not bool(s.converged) for s in stats),
                   train_unconverged_at=[i for i, s in enumerate(stats) if not bool(s.converged)],
                   train_bwd_unconverged=len(bwd_failed), train_bwd_unconverged_at=bwd_failed,
                   train_fwd_steps_mean=float(np.mean([int(s.num_steps) for s in stats])),
                   train_converged_fraction_mean=float(np.mean(frac)) if frac else None,
                   unconverged_warning=bool(warned))
    preds = {}
    for mult in (1,) if name == "plain" else (1, args.eval_budget_mult):
        predict, tag = evaluate(mult), f"eval{mult}x"
        out = [predict(test[0][i:i + args.eval_batch])
               for i in range(0, len(test[0]), args.eval_batch)]
        preds[mult] = np.concatenate([np.asarray(o[0]) for o in out])
        row[f"{tag}_acc"] = float(np.mean(preds[mult] == test[1]))
        if name != "plain":
            res = np.concatenate([np.asarray(o[1]) for o in out])
            row.update({f"{tag}_res_1e3_frac": float(np.mean(res <= 1e-3)),
                        f"{tag}_res_rtol_frac": float(np.mean(res <= info["rtol"] * 1.01)),
                        f"{tag}_res_worst": float(np.max(res)),
                        f"{tag}_res_median": float(np.median(res)),
                        f"{tag}_fwd_steps_mean": float(np.mean([int(o[2]) for o in out]))})
            row["pred_changed"] = int(np.sum(preds[1] != preds[mult]))  # 1x vs the last
    return row


def markdown(rows, meta) -> str:
    k = meta["eval_budget_mult"]
    plain = next((r["step_ms"] for r in rows if r["variant"] == "plain"), None)
    pct = lambda v: f"{100 * v:.1f}%"
    info = lambda key: "/".join(sorted({f"{r[key]:g}" for r in rows if key in r}))

    def both(r, key, fmt):  # "1x / kx", "1x" (plain) or "-"
        return " / ".join(fmt(r[t]) for t in (f"eval1x_{key}", f"eval{k}x_{key}") if t in r) or "-"

    head = ["variant", "step (ms)", "vs plain", "train solves unconverged",
            "train backward solves unconverged", "train fwd steps",
            "train loss", f"acc 1x / {k}x", f"res <= 1e-3 1x / {k}x", f"res <= rtol 1x / {k}x",
            f"worst res 1x / {k}x", f"eval fwd steps 1x / {k}x", f"class changed 1x->{k}x"]
    lines = [
        "# A DEQ layer dropped into Flax's NNX MNIST example (bench_flax_example.py)", "",
        f"Machine: {meta['machine']}; commit {meta['commit']}{' (dirty)' if meta['dirty'] else ''}"
        f", jax {meta['jax']}. Data: {meta['data']}, {meta['eval_images_used']} test images. "
        f"{meta['steps']} SGD steps (0.1, momentum 0.9), batch {meta['batch']}, cross-entropy "
        f"only; DEQ options {json.dumps(meta['layer_kwargs'])}. Step: median after compilation. "
        "Residual: per-sample |f(z)-z|/|f(z)| from the cell at the returned z (rtol: the eval "
        f"solver's, {info('rtol')}, 1% float32 slack); 1x: as built (eval budget "
        f"{info('eval_budget')}), {k}x: that times {k}. Train loss: last 10 steps' mean.", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        frac = r.get("train_converged_fraction_mean")
        unconv = "-" if "rtol" not in r else (
            f"{r['train_unconverged']}/{r['train_steps']}{' (warned)' * r['unconverged_warning']}"
            + (f"; {100 * frac:.2f}% of samples converged" if frac is not None else ""))
        cells = [r["variant"], f"{r['step_ms']:.0f}",
                 f"{r['step_ms'] / plain:.2f}x" if plain else "-", unconv,
                 "-" if "rtol" not in r else f"{r['train_bwd_unconverged']}/{r['train_steps']}",
                 f"{r['train_fwd_steps_mean']:.1f}" if "rtol" in r else "-",
                 f"{r['train_loss_end']:.3f}", both(r, "acc", pct), both(r, "res_1e3_frac", pct),
                 both(r, "res_rtol_frac", pct), both(r, "res_worst", "{:.1e}".format),
                 both(r, "fwd_steps_mean", "{:.1f}".format), str(r.get("pred_changed", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in [("--steps", 150), ("--batch", 128), ("--seed", 0), ("--eval-batch", 500),
                          ("--eval-budget-mult", 4), ("--eval-images", 10000)]:
        p.add_argument(flag, type=int, default=default, help=f"default {default}")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="subset of " + ",".join(VARIANTS))
    p.add_argument("--layer-kwargs", default="{}", help="JSON dict of extra options of both "
                   "DEQ layers, e.g. '{\"jac_reg_samples\": 1}'")
    p.add_argument("--data_dir", default=os.environ.get("DEQ_MNIST_DIR", ""),
                   help="folder with the MNIST IDX files (default $DEQ_MNIST_DIR)")
    p.add_argument("--out", default="experiments/results/bench_flax_example")
    args = p.parse_args(argv)
    layer_kwargs = json.loads(args.layer_kwargs)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not isinstance(layer_kwargs, dict) or not set(variants) <= set(VARIANTS):
        p.error(f"--layer-kwargs must be a JSON dict and --variants a subset of {VARIANTS}")
    from experiments.bench_own_cell import load_data
    from experiments.provenance import provenance, write_results
    from experiments.train import machine_description
    limit_train = min(60000, max(4096, args.batch * args.steps))
    data_name, train, test = load_data(args.data_dir, limit_train, args.eval_images)
    prov = provenance(["python", "-m", "experiments.bench_flax_example",
                       *(sys.argv[1:] if argv is None else argv)])
    meta = {**vars(args), "machine": machine_description(), "data": data_name,
            "jax": jax.__version__, "commit": prov["git_commit"][:10], "dirty": prov["dirty"],
            "eval_images_used": len(test[0]), "layer_kwargs": layer_kwargs}
    rows = []
    for name in variants:
        t0 = time.perf_counter()
        rows.append(run_variant(name, args, layer_kwargs, train, test))
        print(f"{name}: {rows[-1]} ({time.perf_counter() - t0:.0f}s)", flush=True)
    write_results(args.out, "bench_flax_example", markdown(rows, meta),
                  {"meta": meta, "rows": rows, "provenance": prov}, prov)


if __name__ == "__main__":
    main()

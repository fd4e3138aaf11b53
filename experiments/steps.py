"""The jitted steps of the training loop: optimiser, train step, eval step, evaluation.

The train step adds its metrics to an accumulator that stays on the device (``new_metrics``);
the loop brings it to the host once per logging interval (``train.log_every``, and before
every checkpoint), so a step costs no host round trip.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import deq
from experiments import data as data_lib

# Per-step metrics summed over the finite steps of an interval.
METRICS = ("loss", "jac_loss", "accuracy", "grad_norm", "fwd_steps", "fwd_rel_residual",
           "fwd_abs_residual", "fwd_converged", "bwd_steps", "bwd_rel_residual",
           "bwd_converged")
# A test sample is at equilibrium when its relative residual |f(z) - z| / |f(z)| is at most this.
EQUILIBRIUM_RTOL = 1e-3
# Values of the first non-finite step of an interval, for the message that names it.
BAD_VALUES = ("loss", "jac_loss", "grad_norm")


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    o = config.optim
    if o.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, o.learning_rate, min(o.warmup_steps, max(total_steps - 1, 0)),
            max(total_steps, 1), end_value=0.0,
        )
    else:
        lr = o.learning_rate
    if o.name == "adamw":
        tx = optax.adamw(lr, weight_decay=o.weight_decay)
    elif o.name == "adam":
        tx = optax.adam(lr)
    else:
        tx = optax.sgd(lr, momentum=0.9)
    if o.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    return tx


@dataclasses.dataclass
class Task:
    """Everything the step functions close over (static for jit)."""

    graphdef: Any
    eval_graphdef: Any
    tx: optax.GradientTransformation
    skip_nonfinite: bool  # train.on_nonfinite == 'skip'


def new_metrics() -> dict:
    """An empty metrics accumulator (host arrays: ``jax.device_put`` it where the step runs).

    ``first_bad`` is the 1-based index of the interval's first non-finite step (-1: none),
    ``bad`` that step's loss, Jacobian penalty and gradient norm.
    """
    f, i = np.float32(0), np.int32(0)
    return {"sums": dict.fromkeys(METRICS, f), "fwd_steps_max": f, "bwd_steps_max": f,
            "steps": i, "skipped": i, "fwd_unconverged": i, "bwd_unconverged": i,
            "first_bad": np.int32(-1), "bad": dict.fromkeys(BAD_VALUES, f)}


def _add(acc: dict, step, finite, metrics: dict) -> dict:
    # Keep the recorded first non-finite step (and its values): this step is finite, or an
    # earlier step of the interval was not.
    keep_recorded = finite | (acc["first_bad"] >= 0)
    zero = lambda v: jnp.where(finite, v, 0).astype(jnp.float32)  # noqa: E731
    return {
        "sums": {k: acc["sums"][k] + zero(metrics[k]) for k in METRICS},
        "fwd_steps_max": jnp.maximum(acc["fwd_steps_max"], zero(metrics["fwd_steps"])),
        "bwd_steps_max": jnp.maximum(acc["bwd_steps_max"], zero(metrics["bwd_steps"])),
        "steps": acc["steps"] + 1,
        "skipped": acc["skipped"] + (~finite).astype(jnp.int32),
        "fwd_unconverged": acc["fwd_unconverged"] + (finite & ~metrics["fwd_converged"]),
        "bwd_unconverged": acc["bwd_unconverged"] + (finite & ~metrics["bwd_converged"]),
        "first_bad": jnp.where(keep_recorded, acc["first_bad"], step + 1).astype(jnp.int32),
        "bad": {k: jnp.where(keep_recorded, acc["bad"][k], metrics[k]).astype(jnp.float32)
                for k in BAD_VALUES},
    }


def _per_device(fn, mesh, in_specs, reductions: dict):
    """``fn`` on each device's rows of the batch, its outputs reduced once at the end.

    Data parallelism over ``mesh``'s ``"data"`` axis: every device solves its own samples and
    stops when they have converged, so no collective runs inside the solver's loops (under
    XLA's automatic partitioning, the batched stopping test and the weight gradients of the
    loop bodies are reduced over the devices at every iteration). ``fn`` returns a dict;
    ``reductions`` names each entry's collective (``"mean"``, ``"sum"``, ``"max"``, ``"all"``).
    Without a mesh (one device), ``fn`` itself.
    """
    if mesh is None:
        return fn
    reduce = {"mean": jax.lax.pmean, "sum": jax.lax.psum, "max": jax.lax.pmax,
              "all": jax.lax.pmin}

    def local(*args):
        out = fn(*args)
        # One collective per kind of reduction, on all its values at once: across processes
        # each collective is a round trip, whatever its size.
        reduced = {}
        for kind in dict.fromkeys(reductions.values()):
            group = {k: v for k, v in out.items() if reductions[k] == kind}
            leaves, treedef = jax.tree_util.tree_flatten(group)
            dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
            flat = jnp.concatenate([jnp.ravel(v).astype(dtype) for v in leaves])
            flat = reduce[kind](flat, "data")
            parts, start = [], 0
            for v in leaves:
                parts.append(flat[start:start + v.size].reshape(v.shape).astype(v.dtype))
                start += v.size
            reduced.update(jax.tree_util.tree_unflatten(treedef, parts))
        return reduced

    # No replication check: the solver's closure-converted cell (deq.fixed_point) mixes
    # per-device and replicated operands, which JAX's varying-axes typing rejects; every
    # output is reduced over the devices above, so it is replicated.
    if hasattr(jax, "shard_map"):
        return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(),
                             check_vma=False)
    from jax.experimental.shard_map import shard_map  # JAX before jax.shard_map

    return shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(), check_rep=False)


def make_train_step(task: Task, mesh=None):
    """``train_step(params, opt_state, acc, rest, images, labels, base_key, step)`` ->
    ``(params, opt_state, acc)``; ``step`` is the 0-based global step (its random key is
    ``fold_in(base_key, step)``). With a ``mesh``, each device computes the gradient of its
    rows, and the gradients are averaged once (one all-reduce per step). The stabiliser then
    runs per device too: its probes, its sub-batch (``reg.jac_batch`` rows of each device)
    and its adaptive weight (from that device's solve). The solver metrics are the worst
    device's (``bwd_rel_residual``: the largest per-device ratio, a bound on the batch's)."""

    def gradients(params, rest, images, labels, key):
        if mesh is not None:
            # Each device draws its own random numbers (the stabiliser's probes) for its rows.
            key = jax.random.fold_in(key, jax.lax.axis_index("data"))

        def loss_fn(params, probe):
            model = nnx.merge(task.graphdef, params, rest, copy=True)
            logits = model(images, probe=probe, key=key)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            # The layer's stabiliser adds its penalty's gradient itself; jac_loss is its
            # weighted value, for the logs.
            jac = model.deq.jac_loss.get_value()
            return ce, (ce, jac, logits, model.deq.stats.get_value())

        probe = deq.backward_stats_probe()
        (_, (ce, jac, logits, stats)), (grads, probe_grad) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(params, probe)
        bwd = deq.backward_stats(probe_grad)
        return {
            "grads": grads, "loss": ce, "jac_loss": jac,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "fwd_steps": stats.num_steps, "fwd_rel_residual": stats.rel_residual,
            "fwd_abs_residual": stats.abs_residual, "fwd_converged": stats.converged,
            "bwd_steps": bwd.num_steps, "bwd_rel_residual": bwd.rel_residual,
            "bwd_converged": bwd.converged,
        }

    gradients = _per_device(gradients, mesh, (P(), P(), P("data"), P("data"), P()), {
        "grads": "mean", "loss": "mean", "jac_loss": "mean", "accuracy": "mean",
        "fwd_steps": "max", "fwd_rel_residual": "max", "fwd_abs_residual": "max",
        "fwd_converged": "all", "bwd_steps": "max", "bwd_rel_residual": "max",
        "bwd_converged": "all"})

    def train_step(params, opt_state, acc, rest, images, labels, base_key, step):
        key = jax.random.fold_in(base_key, step)
        metrics = gradients(params, rest, images, labels, key)
        grads = metrics.pop("grads")
        grad_norm = metrics["grad_norm"] = optax.tree.norm(grads)
        finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["jac_loss"])
                  & jnp.isfinite(grad_norm))
        # A non-finite step leaves the parameters and optimiser state as they were. With
        # on_nonfinite='stop', so do the steps after it in the same interval: the loop stops
        # at the end of the interval, naming the bad step, with the state from before it.
        apply = finite if task.skip_nonfinite else finite & (acc["first_bad"] < 0)
        updates, new_opt_state = task.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
            lambda n, o: jnp.where(apply, n, o), new, old)
        return (keep(new_params, params), keep(new_opt_state, opt_state),
                _add(acc, step, finite, metrics))

    return train_step


def make_eval_step(task: Task, mesh=None):
    """``eval_step(params, rest, images, labels, mask)`` -> sums and solver statistics of a
    padded batch (with a ``mesh``, each device solves its own rows)."""

    def eval_step(params, rest, images, labels, mask):
        model = nnx.merge(task.eval_graphdef, params, rest, copy=True)
        logits, residual = model.with_residuals(images)
        stats = model.deq.stats.get_value()
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels) & mask
        return {
            "loss_sum": jnp.sum(jnp.where(mask, ce, 0.0)),
            "correct": jnp.sum(correct),
            "count": jnp.sum(mask),
            "fwd_steps": stats.num_steps,
            "fwd_rel_residual": stats.rel_residual,
            "fwd_converged": stats.converged,
            # Each test sample's own distance from equilibrium, padding rows left out.
            "at_equilibrium": jnp.sum(mask & (residual <= EQUILIBRIUM_RTOL)),
            "worst_residual": jnp.max(jnp.where(mask, residual, 0.0)),
        }

    return _per_device(eval_step, mesh, (P(), P(), P("data"), P("data"), P("data")), {
        "loss_sum": "sum", "correct": "sum", "count": "sum", "fwd_steps": "max",
        "fwd_rel_residual": "max", "fwd_converged": "all", "at_equilibrium": "sum",
        "worst_residual": "max"})


def evaluate(eval_step, params, rest, split, batch_size, put_batch) -> dict:
    """Test loss and accuracy over ``split`` and the forward solves' statistics (one
    transfer to the host at the end)."""
    outs = jax.device_get([
        eval_step(params, rest, *put_batch(images, labels, mask))
        for images, labels, mask in data_lib.eval_batches(split, batch_size, pad=True)
    ])
    total = lambda key: float(sum(np.asarray(o[key], np.float64) for o in outs))  # noqa: E731
    steps = [int(o["fwd_steps"]) for o in outs]
    return {
        "loss": total("loss_sum") / total("count"),
        "accuracy": total("correct") / total("count"),
        "fwd_steps": float(np.mean(steps)), "fwd_steps_max": int(np.max(steps)),
        "fwd_rel_residual": float(max(float(o["fwd_rel_residual"]) for o in outs)),
        "batches": len(outs), "fwd_unconverged": sum(not bool(o["fwd_converged"]) for o in outs),
        "samples": int(total("count")), "at_equilibrium": int(total("at_equilibrium")),
        "worst_residual": float(max(float(o["worst_residual"]) for o in outs)),
    }

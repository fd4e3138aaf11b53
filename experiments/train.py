"""Training and evaluation of the DEQ and unrolled classifiers, driven by an ml_collections config.

``train_and_evaluate(config, workdir)`` is the whole job: data, model, optax optimiser, jitted
and data-parallel train/eval steps, metrics (``workdir/metrics.jsonl``), orbax checkpoints
(``workdir/checkpoints``) and resumption, and a final ``workdir/summary.json``.

Resuming: rerunning the same command with the same workdir restores the latest checkpoint and
continues from it; batches and random keys are functions of ``(seed, epoch, step)`` only, so a
resumed run ends with the same parameters as an uninterrupted one. Metric lines written after
the restored checkpoint (by the interrupted run) are dropped and written again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import deq
from experiments import data as data_lib
from experiments import models

logger = logging.getLogger(__name__)

# Fields that may change between an interrupted run and its resumption: they do not change
# what is computed. Anything else must match the config stored in the workdir.
RESUMABLE_FIELDS = {
    "train.progress_bar", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.eval_batch_size", "data.dir", "data.tfds_dir",
}


# ------------------------------------------------------------------------------------------
# Config validation


def _choice(config, field, options):
    value = _get(config, field)
    if value not in options:
        raise ValueError(f"config.{field}={value!r} is not one of {sorted(options)}.")


def _positive(config, field, allow_zero=False):
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
        value == 0 and not allow_zero
    ):
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"config.{field}={value!r} must be a number {need}.")


def _get(config, field):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first bad field of ``config``."""
    _choice(config, "data.name", data_lib.DATASETS)
    _choice(config, "mode", models.MODES)
    _choice(config, "model.cell", models.CELLS)
    _choice(config, "model.z_init", ("zeros", "inject"))
    _choice(config, "model.head", models.HEADS)
    if config.model.cell == "mlp" and config.model.head != "pool":
        raise ValueError(
            f"config.model.head={config.model.head!r} applies to the 'mdeq' cell only; the "
            "'mlp' cell's head is a linear layer on its state (leave model.head='pool')."
        )
    _choice(config, "solver.name", models.SOLVERS)
    _choice(config, "adjoint.name", models.ADJOINTS)
    _choice(config, "adjoint.solver", models.ADJOINT_SOLVERS)
    _choice(config, "optim.name", ("adamw", "adam", "sgd"))
    _choice(config, "optim.schedule", ("cosine", "constant"))
    _choice(config, "solver.precision", ("", "default", "high", "highest", "float32",
                                         "bfloat16", "tensorfloat32"))
    for f in ("model.features", "solver.max_steps", "adjoint.max_steps", "adjoint.phantom_steps",
              "optim.learning_rate", "train.num_epochs", "train.batch_size",
              "train.eval_batch_size", "train.log_every", "train.checkpoint_every",
              "train.keep_checkpoints", "solver.history", "model.num_groups",
              "model.stem_stride", "reg.jac_samples"):
        _positive(config, f)
    for f in ("solver.rtol", "solver.atol", "solver.eval_rtol", "solver.eval_max_steps",
              "adjoint.rtol", "reg.jac_weight", "optim.weight_decay", "optim.warmup_steps",
              "optim.grad_clip", "data.limit_train", "data.limit_test", "model.hidden",
              "solver.damping", "model.head_channels", "reg.jac_batch"):
        _positive(config, f, allow_zero=True)
    for f in ("solver.max_steps", "solver.eval_max_steps", "adjoint.max_steps",
              "train.num_epochs", "train.batch_size", "seed"):
        if isinstance(_get(config, f), bool) or not isinstance(_get(config, f), int):
            raise ValueError(f"config.{f}={_get(config, f)!r} must be an int.")
    if not 0 <= config.solver.damping < 1:
        raise ValueError(f"config.solver.damping={config.solver.damping} must be in [0, 1).")
    if not 0 <= config.adjoint.phantom_damping < 1:
        raise ValueError(
            f"config.adjoint.phantom_damping={config.adjoint.phantom_damping} must be in [0, 1)."
        )
    if config.model.cell == "mdeq":
        hidden = config.model.hidden or config.model.features
        for name, ch in (("model.features", config.model.features), ("model.hidden", hidden)):
            if ch % config.model.num_groups:
                raise ValueError(
                    f"config.{name}={ch} must be divisible by "
                    f"config.model.num_groups={config.model.num_groups}."
                )
    if config.data.name == "mnist" and not config.data.dir and not config.data.tfds_dir:
        logger.info("data.dir is empty: MNIST must already be built in the TFDS directory.")


def _flatten_config(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            out.update(_flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


# Config fields added after runs were already stored, with the value that reproduces those
# older runs: a stored config without the field resumes as if it had this value.
ADDED_FIELDS = {"model.head": "pool"}


def _check_stored_config(config, workdir: Path) -> None:
    path = workdir / "config.json"
    current = _flatten_config(config.to_dict())
    if path.exists():
        stored = {**ADDED_FIELDS, **json.loads(path.read_text())}
        diff = sorted(
            k for k in set(stored) | set(current)
            if k not in RESUMABLE_FIELDS and stored.get(k) != current.get(k)
        )
        if diff:
            details = ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in diff)
            raise ValueError(
                f"workdir {workdir} holds a run with a different config ({details}). Resuming "
                "would mix two experiments: use a new --workdir, or delete this one."
            )
    else:
        path.write_text(json.dumps(current, indent=1, sort_keys=True))


# ------------------------------------------------------------------------------------------
# Optimiser


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


# ------------------------------------------------------------------------------------------
# Steps


@dataclasses.dataclass
class Task:
    """Everything the step functions close over (static for jit)."""

    graphdef: Any
    eval_graphdef: Any
    tx: optax.GradientTransformation
    jac_weight: float


def _stats_metrics(prefix, stats):
    return {
        f"{prefix}_steps": stats.num_steps,
        f"{prefix}_rel_residual": stats.rel_residual,
        f"{prefix}_abs_residual": stats.abs_residual,
        f"{prefix}_converged": stats.converged,
    }


def make_train_step(task: Task):
    def train_step(params, opt_state, rest, images, labels, key):
        def loss_fn(params, probe):
            model = nnx.merge(task.graphdef, params, rest, copy=True)
            logits = model(images, probe=probe, key=key)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            jac = model.deq.jac_loss.get_value()
            return ce + task.jac_weight * jac, (ce, jac, logits, model.deq.stats.get_value())

        probe = deq.backward_stats_probe()
        (_, (ce, jac, logits, stats)), (grads, probe_grad) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(params, probe)
        updates, opt_state = task.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        bwd = deq.backward_stats(probe_grad)
        metrics = {
            "loss": ce,
            "jac_loss": jac,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "grad_norm": optax.tree.norm(grads),
            **_stats_metrics("fwd", stats),
            "bwd_steps": bwd.num_steps,
            "bwd_rel_residual": bwd.rel_residual,
            "bwd_converged": bwd.converged,
        }
        return params, opt_state, metrics

    return train_step


def make_eval_step(task: Task):
    def eval_step(params, rest, images, labels, mask):
        model = nnx.merge(task.eval_graphdef, params, rest, copy=True)
        logits = model(images)
        stats = model.deq.stats.get_value()
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels) & mask
        return {
            "loss_sum": jnp.sum(jnp.where(mask, ce, 0.0)),
            "correct": jnp.sum(correct),
            "count": jnp.sum(mask),
            "fwd_steps": stats.num_steps,
            "fwd_rel_residual": stats.rel_residual,
        }

    return eval_step


# ------------------------------------------------------------------------------------------
# Checkpoints and metrics


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored into this run's model."""


def _abstract(tree, sharding):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree
    )


def restore_latest(manager: ocp.CheckpointManager, target, sharding, directory: Path):
    step = manager.latest_step()
    if step is None:
        return None, None
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(_abstract(target,
                                                                                  sharding)))
    except Exception as e:  # orbax raises many types; the user needs one clear message
        raise CheckpointError(
            f"cannot restore the checkpoint of step {step} in {directory}: "
            f"{type(e).__name__}: {e}. It is corrupt or was written by a different model or "
            "config. It was left untouched: move it away or use a new --workdir."
        ) from e
    return step, restored


class MetricsWriter:
    """JSON lines in ``workdir/metrics.jsonl``; on resume, drops lines past the checkpoint."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [
                line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self._f = open(path, "a")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _to_py(tree):
    def conv(x):
        x = np.asarray(x)
        if x.dtype == bool:
            return bool(x)
        if np.issubdtype(x.dtype, np.integer):
            return int(x)
        return float(x)

    return {k: conv(v) for k, v in tree.items()}


def machine_description() -> str:
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if dev.platform == "cpu":
        return f"CPU: {cpu}, {os.cpu_count()} cores, {jax.device_count()} JAX device(s)"
    return f"{jax.device_count()} x {dev.device_kind} ({dev.platform}), host CPU {cpu}"


# ------------------------------------------------------------------------------------------
# The job


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       stop_after: int | None = None) -> dict | None:
    """Train and evaluate the model described by ``config``; resume from ``workdir``.

    Args:
      config: see ``configs/default.py``.
      workdir: checkpoints, metrics and the summary go here; an existing run there resumes.
      stop_after: stop abruptly after this many training steps of this call, without a
        final checkpoint or summary, exactly like an interrupted job (used by the resume
        tests and for time-boxed jobs); None runs to the end.

    Returns:
      The summary dict also written to ``workdir/summary.json`` (None if stopped early).
    """
    validate_config(config)
    workdir = Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    _check_stored_config(config, workdir)

    train, test, info = data_lib.load_dataset(
        config.data.name, data_dir=config.data.dir or None, tfds_dir=config.data.tfds_dir or None,
        limit_train=config.data.limit_train or None, limit_test=config.data.limit_test or None,
    )
    bs = config.train.batch_size
    steps_per_epoch = data_lib.steps_per_epoch(train, bs)
    if steps_per_epoch == 0:
        raise ValueError(
            f"config.train.batch_size={bs} is larger than the training set ({len(train)})."
        )
    total_steps = steps_per_epoch * config.train.num_epochs

    # Data parallelism: the batch is split over all devices, parameters are replicated.
    ndev = jax.device_count()
    if bs % ndev or config.train.eval_batch_size % ndev:
        raise ValueError(
            f"config.train.batch_size={bs} and eval_batch_size={config.train.eval_batch_size} "
            f"must be divisible by the number of devices ({ndev})."
        )
    # Auto axes: XLA propagates the batch sharding through the solver; the core stays
    # sharding-agnostic.
    mesh = jax.make_mesh((ndev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    image_shape, num_classes = tuple(info["image_shape"]), info["num_classes"]
    rngs = nnx.Rngs(params=config.seed, jac_reg=config.seed + 1)
    model = models.Classifier(config, image_shape, num_classes, rngs=rngs)
    eval_model = models.Classifier(config, image_shape, num_classes, evaluation=True,
                                   rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_graphdef, _, eval_rest = nnx.split(eval_model, nnx.Param, ...)
    tx = make_optimizer(config, total_steps)
    opt_state = tx.init(params)
    num_params = sum(int(np.prod(np.shape(p))) for p in jax.tree_util.tree_leaves(params))
    task = Task(graphdef, eval_graphdef, tx, float(config.reg.jac_weight))

    ckpt_dir = workdir / "checkpoints"
    manager = ocp.CheckpointManager(
        ckpt_dir.absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.train.keep_checkpoints, create=True,
            enable_async_checkpointing=False,
        ),
    )
    state = {"params": params, "opt_state": opt_state}
    start_step, restored = restore_latest(manager, state, replicated, ckpt_dir)
    if restored is not None:
        state = restored
        logger.info("resumed from step %d in %s", start_step, ckpt_dir)
    start_step = start_step or 0
    state = jax.device_put(state, replicated)
    params, opt_state = state["params"], state["opt_state"]

    writer = MetricsWriter(workdir / "metrics.jsonl", start_step)
    train_step = jax.jit(make_train_step(task), donate_argnums=(0, 1))
    eval_step = jax.jit(make_eval_step(task))
    base_key = jax.random.PRNGKey(config.seed)

    def put_batch(*arrays):
        return tuple(
            jax.make_array_from_process_local_data(data_sharding, _local_rows(a)) for a in arrays
        )

    # Compile once up front: the compiled step also tells the training-step memory.
    ex_images, ex_labels = put_batch(train.images[:bs], train.labels[:bs])
    t0 = time.perf_counter()
    rest = jax.device_put(rest, replicated)
    eval_rest = jax.device_put(eval_rest, replicated)
    compiled = train_step.lower(params, opt_state, rest, ex_images, ex_labels,
                                base_key).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp_bytes = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else None
    run_info = {
        "name": config.name, "mode": config.mode, "machine": machine_description(),
        "jax": jax.__version__, "num_params": num_params, "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps, "train_step_temp_bytes": temp_bytes,
        "compile_seconds": compile_s,
    }
    (workdir / "run_info.json").write_text(json.dumps(run_info, indent=1))
    logger.info("%s", run_info)

    step = start_step
    epoch_records = [r for r in read_metrics(workdir) if r.get("kind") == "epoch"]
    for epoch in range(start_step // steps_per_epoch, config.train.num_epochs):
        skip = step - epoch * steps_per_epoch  # batches of this epoch done before a restart
        batches = data_lib.train_batches(train, bs, seed=config.seed, epoch=epoch)
        agg: dict[str, list] = {}
        epoch_t0 = time.perf_counter()
        bar = _progress(config, steps_per_epoch, skip, epoch)
        for i, (images, labels) in enumerate(batches):
            if i < skip:
                continue
            key = jax.random.fold_in(base_key, step)
            t = time.perf_counter()
            params, opt_state, metrics = compiled(params, opt_state, rest,
                                                  *put_batch(images, labels), key)
            metrics = _to_py(jax.device_get(metrics))
            metrics["step_time"] = time.perf_counter() - t
            step += 1
            if stop_after is not None and step - start_step >= stop_after:
                writer.close()
                return None
            for k, v in metrics.items():
                agg.setdefault(k, []).append(float(v))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                                fwd=metrics["fwd_steps"], bwd=metrics["bwd_steps"])
            if step % config.train.log_every == 0:
                writer.write({"kind": "train", "step": step, "epoch": epoch, **metrics})
            if step % config.train.checkpoint_every == 0 and step % steps_per_epoch:
                manager.save(step, args=ocp.args.StandardSave({"params": params,
                                                               "opt_state": opt_state}))
        if bar is not None:
            bar.close()
        epoch_time = time.perf_counter() - epoch_t0
        ev = evaluate(eval_step, params, eval_rest, test, config.train.eval_batch_size, put_batch)
        record = {
            "kind": "epoch", "step": step, "epoch": epoch + 1, "epoch_time": epoch_time,
            **{f"train_{k}": float(np.mean(v)) for k, v in agg.items()},
            "train_fwd_steps_max": float(np.max(agg["fwd_steps"])) if agg else None,
            "train_bwd_steps_max": float(np.max(agg["bwd_steps"])) if agg else None,
            **{f"test_{k}": v for k, v in ev.items()},
            "peak_memory_bytes": _peak_memory(),
        }
        writer.write(record)
        epoch_records.append(record)
        logger.info(
            "epoch %d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | fwd steps %.1f "
            "bwd steps %.1f | %.1fs", epoch + 1, record.get("train_loss", float("nan")),
            record.get("train_accuracy", float("nan")), ev["loss"], ev["accuracy"],
            record.get("train_fwd_steps", float("nan")),
            record.get("train_bwd_steps", float("nan")), epoch_time,
        )
        manager.save(step, args=ocp.args.StandardSave({"params": params,
                                                       "opt_state": opt_state}), force=True)
    manager.wait_until_finished()
    writer.close()

    step_times = [r["step_time"] for r in read_metrics(workdir)
                  if r.get("kind") == "train" and r["step"] > 1]
    last = epoch_records[-1] if epoch_records else {}
    summary = {
        **run_info,
        "final_step": step,
        "epochs": len(epoch_records),
        "test_accuracy": last.get("test_accuracy"),
        "best_test_accuracy": max((r["test_accuracy"] for r in epoch_records), default=None),
        "test_loss": last.get("test_loss"),
        "median_step_time": float(np.median(step_times)) if step_times else None,
        "mean_epoch_time": float(np.mean([r["epoch_time"] for r in epoch_records]))
        if epoch_records else None,
        "train_fwd_steps": last.get("train_fwd_steps"),
        "train_bwd_steps": last.get("train_bwd_steps"),
        "train_fwd_rel_residual": last.get("train_fwd_rel_residual"),
        "test_fwd_steps": last.get("test_fwd_steps"),
        "test_fwd_rel_residual": last.get("test_fwd_rel_residual"),
        "peak_memory_bytes": last.get("peak_memory_bytes"),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def load_checkpoint(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
    """The raw ``{"params", "opt_state"}`` arrays of a run's latest (or given) checkpoint."""
    directory = (Path(workdir) / "checkpoints").absolute()
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}.")
    return step, manager.restore(step, args=ocp.args.StandardRestore())


def evaluate(eval_step, params, rest, split, batch_size, put_batch) -> dict:
    loss = correct = count = 0.0
    steps, residuals = [], []
    for images, labels, mask in data_lib.eval_batches(split, batch_size, pad=True):
        out = jax.device_get(eval_step(params, rest, *put_batch(images, labels, mask)))
        loss += float(out["loss_sum"])
        correct += float(out["correct"])
        count += float(out["count"])
        steps.append(int(out["fwd_steps"]))
        residuals.append(float(out["fwd_rel_residual"]))
    return {
        "loss": loss / count, "accuracy": correct / count,
        "fwd_steps": float(np.mean(steps)), "fwd_steps_max": int(np.max(steps)),
        "fwd_rel_residual": float(np.max(residuals)),
    }


def _local_rows(a: np.ndarray) -> np.ndarray:
    """This process's share of a global batch (all of it on a single host)."""
    n = jax.process_count()
    if n == 1:
        return a
    per = a.shape[0] // n
    i = jax.process_index()
    return a[i * per:(i + 1) * per]


def _peak_memory():
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None  # the CPU backend reports none; see train_step_temp_bytes
    return int(stats.get("peak_bytes_in_use", 0))


def _progress(config, total, initial, epoch):
    if not config.train.progress_bar:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"{config.name} epoch {epoch + 1}",
                leave=False, dynamic_ncols=True)


__all__ = ["CheckpointError", "load_checkpoint", "read_metrics", "train_and_evaluate",
           "validate_config"]

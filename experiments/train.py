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
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import deq
from experiments import checkpoints as ckpt_lib
from experiments import data as data_lib
from experiments import models
from experiments.checkpoints import CheckpointError
from experiments.cli import ConfigError

logger = logging.getLogger(__name__)

# Fields that may change between an interrupted run and its resumption: they do not change
# what is computed. Anything else must match the config stored in the workdir.
RESUMABLE_FIELDS = {
    "train.progress_bar", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.eval_batch_size", "train.on_nonfinite", "data.dir", "data.tfds_dir",
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
    """Raise ConfigError (a ValueError) naming the first bad field of ``config``."""
    try:
        _validate_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(str(e).strip("'\"")) from None


def _validate_config(config: ml_collections.ConfigDict) -> None:
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
    _choice(config, "train.on_nonfinite", ("stop", "skip"))
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
ADDED_FIELDS = {"model.head": "pool", "train.on_nonfinite": "stop"}


def _check_stored_config(config, workdir: Path) -> None:
    """Refuse to resume a run stored in ``workdir`` with a different config (writes nothing)."""
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


def _store_config(config, workdir: Path) -> None:
    path = workdir / "config.json"
    if not path.exists():
        path.write_text(json.dumps(_flatten_config(config.to_dict()), indent=1, sort_keys=True))


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
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient leaves the parameters and optimiser state as they were
        # (no host sync here: the loop reads the flag with the other metrics).
        finite = jnp.isfinite(ce) & jnp.isfinite(jac) & jnp.isfinite(grad_norm)
        updates, new_opt_state = task.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o),
                                                       new, old)
        params, opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
        bwd = deq.backward_stats(probe_grad)
        metrics = {
            "finite": finite,
            "loss": ce,
            "jac_loss": jac,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "grad_norm": grad_norm,
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
            "fwd_converged": stats.converged,
        }

    return eval_step


# ------------------------------------------------------------------------------------------
# Checkpoints and metrics


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient (``train.on_nonfinite='stop'``)."""


def _parse_metrics(path: Path) -> list[dict]:
    """The records of ``path``; lines that do not parse (a crash mid-write leaves a truncated
    last line) are dropped with a warning naming them."""
    records, bad = [], []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad.append(i)
    if bad:
        where = ("its truncated last line" if bad == [len(lines)]
                 else f"unreadable line(s) {', '.join(map(str, bad))}")
        logger.warning("%s: dropped %s (written by an interrupted run).", path, where)
    return records


class MetricsWriter:
    """JSON lines in ``workdir/metrics.jsonl``; on resume, drops lines past the checkpoint
    and lines that do not parse (a truncated last line from a crash mid-write)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [r for r in _parse_metrics(path) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
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
    return _parse_metrics(path)


class EpochStats:
    """Running sums of one epoch's training metrics. Saved with every checkpoint
    (``progress``), so an epoch resumed mid-way averages over all of its steps."""

    def __init__(self, epoch: int, state: dict | None = None):
        state = state if state and state.get("epoch") == epoch else {}
        self.epoch = epoch
        self.sums: dict[str, float] = dict(state.get("sums", {}))
        self.maxima: dict[str, float] = dict(state.get("maxima", {}))
        self.counts: dict[str, int] = {"steps": 0, "skipped": 0, "fwd_unconverged": 0,
                                       "bwd_unconverged": 0, **state.get("counts", {})}
        self.seconds = float(state.get("seconds", 0.0))
        self.restored = bool(state)

    def add(self, metrics: dict) -> None:
        self.counts["steps"] += 1
        if not metrics["finite"]:
            self.counts["skipped"] += 1
            return
        self.counts["fwd_unconverged"] += not metrics["fwd_converged"]
        self.counts["bwd_unconverged"] += not metrics["bwd_converged"]
        for k, v in metrics.items():
            if k != "finite":
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        for k in ("fwd_steps", "bwd_steps"):
            self.maxima[k] = max(self.maxima.get(k, 0.0), float(metrics[k]))

    def state(self, seconds: float) -> dict:
        return {"epoch": self.epoch, "sums": self.sums, "maxima": self.maxima,
                "counts": self.counts, "seconds": self.seconds + seconds}

    def record(self) -> dict:
        n = self.counts["steps"] - self.counts["skipped"]
        return {
            **({f"train_{k}": v / n for k, v in self.sums.items()} if n else {}),
            "train_fwd_steps_max": self.maxima.get("fwd_steps"),
            "train_bwd_steps_max": self.maxima.get("bwd_steps"),
            "train_steps": self.counts["steps"],
            "train_skipped_steps": self.counts["skipped"],
            "train_fwd_unconverged": self.counts["fwd_unconverged"],
            "train_bwd_unconverged": self.counts["bwd_unconverged"],
        }


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
        Nothing is written there before the data and the model are set up, so a run that
        fails to start (bad config, missing data) leaves no trace.
      stop_after: stop abruptly after this many training steps of this call, without a
        final checkpoint or summary, exactly like an interrupted job (used by the resume
        tests and for time-boxed jobs); None runs to the end.

    Returns:
      The summary dict also written to ``workdir/summary.json`` (None if stopped early).

    Raises:
      ValueError / FileNotFoundError: a bad config or missing data (nothing written).
      CheckpointError: the latest checkpoint is damaged, corrupt or non-finite (left untouched).
      NonFiniteError: a non-finite loss or gradient with ``train.on_nonfinite='stop'``.
    """
    validate_config(config)
    workdir = Path(workdir).expanduser()
    _check_stored_config(config, workdir)

    train, test, info = data_lib.load_dataset(
        config.data.name, data_dir=config.data.dir or None, tfds_dir=config.data.tfds_dir or None,
        limit_train=config.data.limit_train or None, limit_test=config.data.limit_test or None,
    )
    bs = config.train.batch_size
    if bs > len(train):
        raise ConfigError(
            f"config.train.batch_size={bs} is larger than the training set ({len(train)})."
        )
    steps_per_epoch = data_lib.steps_per_epoch(train, bs)
    total_steps = steps_per_epoch * config.train.num_epochs

    # Data parallelism: the batch is split over all devices, parameters are replicated.
    ndev = jax.device_count()
    if bs % ndev or config.train.eval_batch_size % ndev:
        raise ConfigError(
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

    # Data and model are set up: from here on the run has a workdir.
    workdir.mkdir(parents=True, exist_ok=True)
    _store_config(config, workdir)
    ckpt_dir = (workdir / "checkpoints").absolute()
    manager = ckpt_lib.make_manager(ckpt_dir, config.train.keep_checkpoints)
    state = {"params": params, "opt_state": opt_state}
    start_step, restored, progress = ckpt_lib.restore_latest(manager, state, replicated,
                                                             ckpt_dir)
    if restored is not None:
        state = restored
        logger.info("resumed from step %d (checkpoint %s)", start_step, ckpt_dir / str(start_step))
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
    logger.debug("%s", run_info)

    def save(step, epoch_stats, seconds, force=False):
        ckpt_lib.save(manager, step, {"params": params, "opt_state": opt_state},
                      {"epoch": epoch_stats.state(seconds)}, force=force)

    step = start_step
    epoch_records = [r for r in read_metrics(workdir) if r.get("kind") == "epoch"]
    for epoch in range(start_step // steps_per_epoch, config.train.num_epochs):
        skip = step - epoch * steps_per_epoch  # batches of this epoch done before a restart
        batches = data_lib.train_batches(train, bs, seed=config.seed, epoch=epoch)
        stats = EpochStats(epoch, (progress or {}).get("epoch") if skip else None)
        partial = bool(skip) and not stats.restored  # a checkpoint without the partial sums
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
            if not metrics["finite"]:
                _nonfinite(config, step, metrics, manager, ckpt_dir, writer,
                           stats.counts["skipped"])
            if stop_after is not None and step - start_step >= stop_after:
                writer.close()
                return None
            stats.add(metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                                fwd=metrics["fwd_steps"], bwd=metrics["bwd_steps"])
            if step % config.train.log_every == 0:
                writer.write({"kind": "train", "step": step, "epoch": epoch, **metrics})
            if step % config.train.checkpoint_every == 0 and step % steps_per_epoch:
                save(step, stats, time.perf_counter() - epoch_t0)
        if bar is not None:
            bar.close()
        epoch_time = stats.seconds + time.perf_counter() - epoch_t0
        ev = evaluate(eval_step, params, eval_rest, test, config.train.eval_batch_size, put_batch)
        record = {
            "kind": "epoch", "step": step, "epoch": epoch + 1, "epoch_time": epoch_time,
            **stats.record(),
            **{f"test_{k}": v for k, v in ev.items()},
            "peak_memory_bytes": _peak_memory(),
            **({"partial": True} if partial else {}),
        }
        writer.write(record)
        epoch_records.append(record)
        logger.info("%s", epoch_line(record, config.train.num_epochs))
        save(step, EpochStats(epoch + 1), 0.0, force=True)
    manager.wait_until_finished()
    writer.close()

    step_times = [r["step_time"] for r in read_metrics(workdir)
                  if r.get("kind") == "train" and r["step"] > 1]
    last = epoch_records[-1] if epoch_records else {}
    def count(key):  # None where an epoch was run by a version that did not count
        if not epoch_records or any(key not in r for r in epoch_records):
            return None
        return int(sum(r[key] for r in epoch_records))

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
        # Every solve of the run (all epochs, resumed ones included), counted per batch.
        "train_steps": count("train_steps"),
        "skipped_steps": count("train_skipped_steps"),
        "train_fwd_unconverged": count("train_fwd_unconverged"),
        "train_bwd_unconverged": count("train_bwd_unconverged"),
        "eval_batches": count("test_batches"),
        "eval_fwd_unconverged": count("test_fwd_unconverged"),
        "partial_epochs": sum(bool(r.get("partial")) for r in epoch_records),
    }
    unconverged = [summary[k] for k in ("train_fwd_unconverged", "train_bwd_unconverged",
                                        "eval_fwd_unconverged")]
    summary["all_solves_converged"] = None if None in unconverged else not any(unconverged)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _nonfinite(config, step, metrics, manager, ckpt_dir, writer, skipped: int) -> None:
    """A step whose loss or gradient is not finite: its update was not applied. Stop (the
    default) or, with ``train.on_nonfinite='skip'``, warn (the first few times per epoch) and
    go on; ``skipped`` counts the steps of this epoch skipped before this one."""
    values = {"loss": metrics["loss"], "Jacobian penalty": metrics["jac_loss"],
              "gradient norm": metrics["grad_norm"]}
    bad = [k for k, v in values.items() if not np.isfinite(v)]
    what = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
    what = f"{' and '.join(bad)} ({what})"
    if config.train.on_nonfinite == "skip":
        if skipped < 5:
            logger.warning("step %d: non-finite %s; skipped (its update was not applied)%s.",
                           step, what, "; further skipped steps of this epoch are only "
                           "counted" if skipped == 4 else "")
        return
    writer.write({"kind": "nonfinite", "step": step, **metrics})
    writer.close()
    last = manager.latest_step()
    where = (f"the last good checkpoint is step {last} ({ckpt_dir / str(last)})"
             if last is not None else "there is no checkpoint yet")
    raise NonFiniteError(
        f"training stopped at step {step}: non-finite {what}. The update of this step was not "
        f"applied and nothing after it was saved; {where}. Rerunning the same command resumes "
        "from there and will likely meet the same step: add --config.train.on_nonfinite=skip "
        "to skip such steps (allowed in this workdir), or lower optim.learning_rate / enable "
        "optim.grad_clip in a new --workdir."
    )


def epoch_line(r: dict, num_epochs: int) -> str:
    """The console line of one epoch record."""
    f = lambda key, spec: "n/a" if r.get(key) is None else format(r[key], spec)
    skipped = f", {r['train_skipped_steps']} skipped" if r.get("train_skipped_steps") else ""
    return (
        f"epoch {r['epoch']}/{num_epochs}: train loss {f('train_loss', '.4f')} "
        f"acc {f('train_accuracy', '.4f')}{skipped} | test acc {f('test_accuracy', '.4f')} | "
        f"fwd steps {f('train_fwd_steps', '.1f')} res {f('train_fwd_rel_residual', '.1e')} | "
        f"bwd steps {f('train_bwd_steps', '.1f')} res {f('train_bwd_rel_residual', '.1e')} | "
        f"{r['epoch_time']:.1f}s" + (" (partial: resumed without epoch sums)"
                                     if r.get("partial") else "")
    )


def convergence_report(summary: dict) -> str:
    """One line: did every forward and backward solve converge, and how many did not."""
    def part(label, bad, total):
        return f"{label} all {total} converged" if not bad else \
            f"{label} {bad} of {total} did NOT converge"

    if summary.get("all_solves_converged") is None:
        return ("solver convergence was not counted for every epoch (epochs run by an older "
                "version): see train_fwd_rel_residual in metrics.jsonl.")
    n = summary["train_steps"] - summary["skipped_steps"]
    line = "; ".join([
        part("forward solves (train batches):", summary["train_fwd_unconverged"], n),
        part("backward solves:", summary["train_bwd_unconverged"], n),
        part("forward solves (eval batches):", summary["eval_fwd_unconverged"],
             summary["eval_batches"]),
    ])
    if summary.get("skipped_steps"):
        line += f"; {summary['skipped_steps']} training steps skipped (non-finite)"
    if summary.get("mode") == "unrolled":
        line += " (unrolled mode: a fixed number of steps, convergence is not required)"
    return line


def load_checkpoint(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
    """The raw ``{"params", "opt_state"}`` arrays of a run's latest (or given) checkpoint,
    verified against its digest."""
    return ckpt_lib.load(Path(workdir) / "checkpoints", step)


def evaluate(eval_step, params, rest, split, batch_size, put_batch) -> dict:
    loss = correct = count = 0.0
    steps, residuals, unconverged = [], [], 0
    for images, labels, mask in data_lib.eval_batches(split, batch_size, pad=True):
        out = jax.device_get(eval_step(params, rest, *put_batch(images, labels, mask)))
        loss += float(out["loss_sum"])
        correct += float(out["correct"])
        count += float(out["count"])
        steps.append(int(out["fwd_steps"]))
        residuals.append(float(out["fwd_rel_residual"]))
        unconverged += not bool(out["fwd_converged"])
    return {
        "loss": loss / count, "accuracy": correct / count,
        "fwd_steps": float(np.mean(steps)), "fwd_steps_max": int(np.max(steps)),
        "fwd_rel_residual": float(np.max(residuals)),
        "batches": len(steps), "fwd_unconverged": unconverged,
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


__all__ = ["CheckpointError", "NonFiniteError", "convergence_report", "load_checkpoint",
           "read_metrics", "train_and_evaluate", "validate_config"]

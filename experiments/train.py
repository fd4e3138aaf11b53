"""Training and evaluation of the DEQ and unrolled classifiers, driven by an ml_collections config.

``train_and_evaluate(config, workdir)`` is the loop; what it calls lives next to it:
``experiments.steps`` (optimiser, jitted train/eval steps, evaluation),
``experiments.metrics`` (``metrics.jsonl``, epoch sums, ``run_info.json``, ``summary.json``,
the non-finite-step policy), ``experiments.checkpoints`` (orbax checkpoints in
``workdir/checkpoints``) and ``experiments.configuration`` (config checks, the config stored
in the workdir).

Metrics stay on the device and reach the host once per ``train.log_every`` steps, before each
checkpoint and at the end of each epoch; the ``train`` lines of ``metrics.jsonl`` (one every
``train.log_every`` steps and one at each epoch end) are means over the steps since the
previous line.

Resuming: rerunning the same command with the same workdir restores the latest checkpoint and
continues from it; batches and random keys are functions of ``(seed, epoch, step)`` only, so a
resumed run ends with the same parameters as an uninterrupted one. Metric lines written after
the restored checkpoint (by the interrupted run) are dropped and written again.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import checkpoints as ckpt_lib
from experiments import data as data_lib
from experiments import metrics as metrics_lib
from experiments import models, steps
from experiments.configuration import check_stored_config, store_config, validate_config
from experiments.errors import CheckpointError, ConfigError, WorkdirInUseError
from experiments.metrics import (
    EpochLog,
    EpochStats,
    MetricsWriter,
    NonFiniteError,
    convergence_report,
    machine_description,
    read_metrics,
)
from experiments.runfiles import write_json

try:
    import fcntl
except ImportError:  # not POSIX: runs on one workdir are not kept apart
    fcntl = None

logger = logging.getLogger(__name__)


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
      NonFiniteError: a non-finite loss or gradient with ``train.on_nonfinite='stop'``; it is
        raised at the end of the logging interval of the bad step and names that step (whose
        update, like those of the steps after it, was not applied).
      WorkdirInUseError: another run holds ``workdir`` (its ``.lock``).
      KeyboardInterrupt: as raised, with ``step`` set to the training steps done by then
        (None before the first checkpoint is restored).
    """
    validate_config(config)
    workdir = Path(workdir).expanduser()
    check_stored_config(config, workdir)
    train, test, info = load_data(config)
    devices = Devices(config)
    built = build(config, info, train, devices)

    workdir.mkdir(parents=True, exist_ok=True)  # the run starts: from here on it has a workdir
    at = Position()
    metrics_lib.reset_unconverged_watch()
    try:
        with hold_workdir(workdir), at.deferring_interrupts():
            return _run(config, workdir, stop_after, (train, test), devices, built, at)
    except KeyboardInterrupt as e:
        e.step, e.checkpoint = at.step, at.checkpoint
        raise


class Position:
    """The global step the run has reached (None before its checkpoint is restored), and
    Ctrl-C held back while a compiled step runs.

    A KeyboardInterrupt raised inside a host callback (Python code run during the step: the
    library's own solve watchers are off in the compiled step, but a cell may have one) would
    reach the caller as a JaxRuntimeError with JAX's tracebacks, not as an interruption. So
    while ``call`` runs a step, Ctrl-C is noted and raised when the step returns; a second
    Ctrl-C during the same step raises at once.
    """

    step: int | None = None
    checkpoint: int | None = None  # the step of the latest checkpoint, None before the first
    in_step: bool = False
    pending: bool = False

    def _on_sigint(self, signum, frame):
        if self.in_step and not self.pending:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferring_interrupts(self):
        """Install the handler for the block (main thread, default SIGINT handling only)."""
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            yield
            return
        signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def call(self, fn, *args):
        """``fn(*args)``, with a Ctrl-C that arrives meanwhile raised when it returns."""
        self.in_step = True
        try:
            out = fn(*args)
        finally:
            self.in_step = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt
        return out


def _run(config, workdir: Path, stop_after, splits, devices, built, at: Position):
    train, test = splits
    task, params, opt_state, rest, eval_rest = built
    # Checked again under the lock: a run started at the same time may have stored its config.
    check_stored_config(config, workdir)
    store_config(config, workdir)
    ckpt = Checkpoints(workdir, config.train.keep_checkpoints, devices)
    step, params, opt_state, progress = ckpt.restore(params, opt_state)
    total = data_lib.steps_per_epoch(train, config.train.batch_size) * config.train.num_epochs
    if step > total:
        raise CheckpointError(
            f"the latest checkpoint in {ckpt.dir} is of step {step}, beyond this config's "
            f"{total} training steps: it belongs to another run. Use a new --workdir, or "
            "delete the checkpoints.")
    at.step = step
    at.checkpoint = step or None
    writer = MetricsWriter(workdir / "metrics.jsonl", step)
    train_step, run_info = compile_train_step(config, task, params, opt_state, rest, train,
                                              devices, workdir)
    jitted_eval_step = jax.jit(steps.make_eval_step(task, devices.mesh))
    eval_step = lambda *args: at.call(jitted_eval_step, *args)  # noqa: E731

    start_step, per_epoch = step, run_info["steps_per_epoch"]
    base_key = jax.random.PRNGKey(config.seed)
    for epoch in range(start_step // per_epoch, config.train.num_epochs):
        done = step - epoch * per_epoch  # batches of this epoch run before a restart
        log = EpochLog(config, writer, EpochStats(epoch, progress.get("epoch") if done else None),
                       per_epoch, done)
        acc = devices.new_metrics()
        batches = data_lib.train_batches(train, config.train.batch_size, seed=config.seed,
                                         epoch=epoch)
        for images, labels in itertools.islice(batches, done, None):
            params, opt_state, acc = at.call(train_step, params, opt_state, acc, rest,
                                             *devices.put(images, labels), base_key,
                                             np.int32(step))
            step += 1
            at.step = step
            if stop_after is not None and step - start_step >= stop_after:
                writer.close()
                return None
            log.step()
            checkpoint = step % config.train.checkpoint_every == 0 and step % per_epoch
            if step % config.train.log_every == 0 or checkpoint or step % per_epoch == 0:
                # The end of an interval: its metrics come to the host.
                log.end_interval(step, jax.device_get(acc), ckpt.latest)
                acc = devices.new_metrics()
            if checkpoint:
                ckpt.save(step, params, opt_state, log.epoch_state())
                at.checkpoint = step
        ev = steps.evaluate(eval_step, params, eval_rest, test, config.train.eval_batch_size,
                            devices.put)
        log.end_epoch(step, ev)
        ckpt.save(step, params, opt_state, EpochStats(epoch + 1).state(0.0), force=True)
        at.checkpoint = step
    ckpt.close()
    writer.close()
    if jax.process_count() > 1:  # process 0 has written every record: all read them
        multihost_utils.sync_global_devices("deq-train: run records written")
    return metrics_lib.summary(run_info, workdir, step)


@contextlib.contextmanager
def hold_workdir(workdir: Path):
    """Hold ``workdir/.lock`` (an exclusive ``flock``, with this process's pid in the file)
    for the duration of the block: a second run on the same workdir fails at once with
    WorkdirInUseError instead of interleaving its checkpoints and metrics with the first's.
    The kernel releases the lock when the process ends, however it ends. Taken by process 0
    only (the hosts of a multi-host run share the workdir)."""
    if fcntl is None or jax.process_index() != 0:
        yield
        return
    path = workdir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            who = f"another run (pid {holder})" if holder.isdigit() else "another run"
            raise WorkdirInUseError(
                f"workdir {workdir} is in use by {who}, which holds {path}. Two runs on one "
                "workdir would mix their checkpoints and metrics: wait for that run to end "
                "(or stop it), or use another --workdir.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


# ------------------------------------------------------------------------------------------
# Setting up the run


def load_data(config):
    """``(train, test, info)`` of ``config.data``; a batch size larger than the training set
    is a config error."""
    train, test, info = data_lib.load_dataset(
        config.data.name, data_dir=config.data.dir or None, tfds_dir=config.data.tfds_dir or None,
        limit_train=config.data.limit_train or None, limit_test=config.data.limit_test or None,
    )
    if config.train.batch_size > len(train):
        raise ConfigError(f"config.train.batch_size={config.train.batch_size} is larger than "
                          f"the training set ({len(train)}).")
    return train, test, info


class Devices:
    """Data parallelism: batches split over all devices, everything else replicated.

    With more than one device the steps run per device (``steps._per_device``): each device
    solves its own rows and the gradients are averaged once; the core stays
    sharding-agnostic.
    """

    def __init__(self, config):
        n = jax.device_count()
        if config.train.batch_size % n or config.train.eval_batch_size % n:
            raise ConfigError(
                f"config.train.batch_size={config.train.batch_size} and eval_batch_size="
                f"{config.train.eval_batch_size} must be divisible by the number of devices "
                f"({n})."
            )
        mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        self.batch = NamedSharding(mesh, P("data"))
        self.replicated = NamedSharding(mesh, P())
        # The steps run per device (shard_map) where there is more than one.
        self.mesh = mesh if n > 1 else None

    def put(self, *arrays):
        """Global batches (this process's rows of them) as arrays sharded over the devices."""
        return tuple(jax.make_array_from_process_local_data(self.batch, _local_rows(a))
                     for a in arrays)

    def new_metrics(self):
        return self.replicate(steps.new_metrics())

    def replicate(self, tree):
        """``tree`` on every device. Each process passes its own copy, which must be the
        same everywhere (same seed, same checkpoint): ``jax.device_put`` would compare them
        with an all-gather, which fails on the NaN of a layer's stats before its first call."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)

        def put(x):
            if isinstance(x, jax.Array) and x.sharding == self.replicated:
                return x
            if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
                return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                                impl=jax.random.key_impl(x))
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.replicated, lambda i: x[i])

        return jax.tree.map(put, tree)


def _local_rows(a: np.ndarray) -> np.ndarray:
    """This process's share of a global batch (all of it on a single host)."""
    n = jax.process_count()
    if n == 1:
        return a
    per = a.shape[0] // n
    i = jax.process_index()
    return a[i * per:(i + 1) * per]


def build(config, info, train, devices: Devices):
    """The task (graphs, optimiser), initial parameters and optimiser state, and the models'
    other state for training and evaluation (replicated)."""
    image_shape, num_classes = tuple(info["image_shape"]), info["num_classes"]
    rngs = nnx.Rngs(params=config.seed, jac_reg=config.seed + 1)
    model = models.Classifier(config, image_shape, num_classes, rngs=rngs)
    eval_model = models.Classifier(config, image_shape, num_classes, evaluation=True,
                                   rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_graphdef, _, eval_rest = nnx.split(eval_model, nnx.Param, ...)
    total_steps = data_lib.steps_per_epoch(train, config.train.batch_size) \
        * config.train.num_epochs
    tx = steps.make_optimizer(config, total_steps)
    task = steps.Task(graphdef, eval_graphdef, tx,
                      skip_nonfinite=config.train.on_nonfinite == "skip")
    rest, eval_rest = devices.replicate((rest, eval_rest))
    return task, params, tx.init(params), rest, eval_rest


def compile_train_step(config, task, params, opt_state, rest, train, devices, workdir: Path):
    """The train step compiled ahead of time (which also tells its memory), and the run info
    (also written to ``workdir/run_info.json``)."""
    bs = config.train.batch_size
    t0 = time.perf_counter()
    compiled = jax.jit(steps.make_train_step(task, devices.mesh),
                       donate_argnums=(0, 1, 2)).lower(
        params, opt_state, devices.new_metrics(), rest,
        *devices.put(train.images[:bs], train.labels[:bs]), jax.random.PRNGKey(config.seed),
        np.int32(0)).compile()
    num_params = sum(int(np.prod(np.shape(p))) for p in jax.tree_util.tree_leaves(params))
    info = metrics_lib.run_info(config, compiled, time.perf_counter() - t0, num_params,
                                data_lib.steps_per_epoch(train, bs))
    if jax.process_index() == 0:
        write_json(workdir / "run_info.json", info, indent=1)
    logger.debug("%s", info)
    return compiled, info


class Checkpoints:
    """The run's orbax checkpoints: ``{"params", "opt_state"}`` and the epoch sums."""

    def __init__(self, workdir: Path, keep: int, devices: Devices):
        self.dir = (workdir / "checkpoints").absolute()
        self.manager = ckpt_lib.make_manager(self.dir, keep)
        self.devices = devices
        self.sharding = devices.replicated

    def restore(self, params, opt_state):
        """``(step, params, opt_state, progress)`` of the latest checkpoint, or the given
        state at step 0."""
        state = {"params": params, "opt_state": opt_state}
        step, restored, progress = ckpt_lib.restore_latest(self.manager, state, self.sharding,
                                                           self.dir)
        if restored is not None:
            state = restored
            logger.info("resumed from step %d (checkpoint %s)", step, self.dir / str(step))
        state = self.devices.replicate(state)
        return step or 0, state["params"], state["opt_state"], progress or {}

    def save(self, step, params, opt_state, epoch_state: dict, force=False):
        ckpt_lib.save(self.manager, step, {"params": params, "opt_state": opt_state},
                      {"epoch": epoch_state}, force=force)

    def latest(self):
        """``(step, path)`` of the latest checkpoint, or None."""
        step = self.manager.latest_step()
        return None if step is None else (step, self.dir / str(step))

    def close(self):
        self.manager.wait_until_finished()


def load_checkpoint(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
    """The raw ``{"params", "opt_state"}`` arrays of a run's latest (or given) checkpoint,
    verified against its digest."""
    return ckpt_lib.load(Path(workdir) / "checkpoints", step)


__all__ = ["CheckpointError", "NonFiniteError", "WorkdirInUseError", "convergence_report",
           "load_checkpoint", "machine_description", "read_metrics", "train_and_evaluate",
           "validate_config"]

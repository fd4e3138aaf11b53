"""Checkpoints you can trust: orbax checkpoints that carry a content digest.

Each checkpoint step directory holds two orbax items written together (atomically, by one
``CheckpointManager.save``):

* ``state``: the ``{"params", "opt_state"}`` arrays;
* ``meta``: a small JSON with the sha256 of every saved array (computed on the host from the
  very arrays being saved) and the run's ``progress`` (the partial sums of the current epoch's
  training metrics, so that an epoch resumed mid-way reports averages over the whole epoch).

:func:`restore_latest` verifies the digest and that every restored array is finite. On any
failure it raises :class:`CheckpointError`: one paragraph naming the step and the directory,
saying the checkpoint was left untouched and how to fall back to the previous checkpoint (move
the bad step directory out of ``checkpoints/`` and rerun: the run resumes from the previous one).
It never falls back by itself: a corrupt checkpoint is worth a look before work is redone.
Errors from orbax/TensorStore are summarised to their first line; their logs are silenced.

State-only checkpoints (a single ``default`` item, no ``meta``) restore with a warning that
they cannot be verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = 1




# ------------------------------------------------------------------------------------------
# Digest


def _host(x) -> np.ndarray:
    """A host copy of a (replicated) array; works when other hosts hold other shards too."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def _leaves(tree) -> list[tuple[str, np.ndarray]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), _host(x))
            for path, x in flat]


def digest(tree) -> dict[str, Any]:
    """sha256 per array (over dtype, shape and bytes) and of all of them, in tree order."""
    total = hashlib.sha256()
    leaves = {}
    for name, x in _leaves(tree):
        h = hashlib.sha256()
        h.update(f"{x.dtype.str}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
        leaves[name] = h.hexdigest()
        total.update(name.encode() + b"\0" + h.digest())
    return {"sha256": total.hexdigest(), "leaves": leaves}


def nonfinite_leaves(tree) -> list[str]:
    """Names of the floating-point arrays of ``tree`` that hold a NaN or an infinity."""
    return [name for name, x in _leaves(tree)
            if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x))]


# ------------------------------------------------------------------------------------------
# Save and restore


def make_manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    with quiet_orbax():
        return ocp.CheckpointManager(
            directory.absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
        )


def save(manager: ocp.CheckpointManager, step: int, state, progress: dict | None = None,
         *, force: bool = False) -> None:
    """Save ``state`` at ``step`` with its digest and ``progress`` (JSON-able) beside it."""
    meta = {"format": FORMAT, "step": step, **digest(state), "progress": progress or {}}
    with quiet_orbax():
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)), force=force)


def _abstract(tree, sharding):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree
    )


def restore_latest(manager: ocp.CheckpointManager, target, sharding, directory: Path):
    """``(step, state, progress)`` of the latest checkpoint, verified; ``(None,) * 3`` if none."""
    step = manager.latest_step()
    if step is None:
        return None, None, None
    state, meta = _restore(manager, step, directory, _abstract(target, sharding))
    return step, state, (meta or {}).get("progress", {})


def load(directory: Path, step: int | None = None) -> tuple[int, Any]:
    """The raw arrays of the latest (or given) checkpoint in ``directory``, verified."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory}.")
    with quiet_orbax():
        manager = ocp.CheckpointManager(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}.")
    return step, _restore(manager, step, directory, None)[0]


def _restore(manager, step, directory: Path, abstract):
    step_dir = directory / str(step)
    # A checkpoint of the state alone (item "default"), without the meta item and its digest.
    state_only = (step_dir / "default").is_dir() and not (step_dir / "state").is_dir()
    restore = ocp.args.StandardRestore(abstract) if abstract is not None else \
        ocp.args.StandardRestore()
    try:
        with quiet_orbax():
            if state_only:
                state, meta = manager.restore(step, args=restore), None
            else:
                out = manager.restore(step, args=ocp.args.Composite(
                    state=restore, meta=ocp.args.JsonRestore()))
                state, meta = out["state"], out["meta"]
    except Exception as e:  # orbax raises many types: the user needs one clear paragraph
        raise CheckpointError(_paragraph(
            manager, step, step_dir,
            f"cannot restore the checkpoint of step {step} in {step_dir}: {_first_line(e)}. "
            "It is damaged (a truncated or missing file) or was written by a different model "
            "or config.")) from None
    if state_only:
        logger.warning("checkpoint %s has no content digest (a state-only checkpoint): "
                       "restored without verification.", step_dir)
    else:
        if not isinstance(meta, dict) or "leaves" not in meta:
            raise CheckpointError(_paragraph(
                manager, step, step_dir,
                f"the checkpoint of step {step} in {step_dir} has no readable digest "
                f"({step_dir / 'meta'})."))
        found = digest(state)
        if found["sha256"] != meta.get("sha256"):
            bad = [k for k, v in found["leaves"].items() if meta["leaves"].get(k) != v]
            raise CheckpointError(_paragraph(
                manager, step, step_dir,
                f"the checkpoint of step {step} in {step_dir} is corrupt: the content of "
                f"{', '.join(bad[:3]) or 'its arrays'}{' ...' if len(bad) > 3 else ''} does "
                "not match the sha256 digest saved with it (the files in "
                f"{step_dir / 'state'} changed after they were written)."))
    bad = nonfinite_leaves(state)
    if bad:
        raise CheckpointError(_paragraph(
            manager, step, step_dir,
            f"the checkpoint of step {step} in {step_dir} holds non-finite values (NaN or "
            f"inf) in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}."))
    return state, meta


def _paragraph(manager, step, step_dir: Path, what: str) -> str:
    earlier = [s for s in manager.all_steps() if s < step]
    if earlier:
        prev = max(earlier)
        aside = step_dir.parent.parent / f"bad-checkpoint-{step}"
        fallback = (f"To resume from the previous checkpoint (step {prev}), move this one out "
                    f"of the way (mv {step_dir} {aside}) and rerun the same command; or start "
                    "afresh with a new --workdir.")
    else:
        fallback = ("There is no earlier checkpoint to fall back to: start afresh with a new "
                    "--workdir (or delete this one).")
    return f"{what} The checkpoint was left untouched. {fallback}"


def _first_line(e: BaseException) -> str:
    """``<type>: <first line of the message>``, without TensorStore's spec dumps, cut at 300
    characters (``[...]``) and without a final full stop, for the caller's sentence to add."""
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    for noise in (" See full TensorStore details", " [tensorstore_spec"):
        line = line.split(noise)[0]
    if len(line) > 300:
        line = line[:300].rstrip(" .") + " [...]"
    line = line.rstrip(" .")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _unraisable_hook(hook):
    def ignore_closed_loop(unraisable):
        # After a failed restore, TensorStore's callbacks into orbax's closed asyncio loop
        # raise this dozens of times; it says nothing the CheckpointError does not.
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
            return
        hook(unraisable)

    ignore_closed_loop.deq_quiet = True
    return ignore_closed_loop


@contextlib.contextmanager
def quiet_orbax():
    """Silence orbax/TensorStore/absl logging (INFO chatter, error dumps on a failed restore)
    for the duration of the block, and (from then on) the "Event loop is closed" reports that
    TensorStore threads leave behind a failed restore."""
    if not getattr(sys.unraisablehook, "deq_quiet", False):
        sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
    names = ("absl", "orbax", "asyncio", "jax._src.distributed")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

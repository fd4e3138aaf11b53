"""What a run writes and prints: ``metrics.jsonl``, per-epoch sums, the console lines,
``run_info.json`` and ``summary.json``, and the non-finite-step policy."""

from __future__ import annotations

import inspect
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np

import deq.nnx
from experiments.errors import NonFiniteError
from experiments.provenance import machine, machine_name
from experiments.runfiles import write_json
from experiments.steps import BAD_VALUES, METRICS

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# metrics.jsonl


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


def read_metrics(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return _parse_metrics(path) if path.exists() else []


class MetricsWriter:
    """JSON lines in ``workdir/metrics.jsonl``; on resume, drops lines past the checkpoint
    and lines that do not parse (a truncated last line from a crash mid-write)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self._f = None
        if jax.process_index() != 0:  # a multi-process run's records are written once
            return
        if path.exists():
            kept = [r for r in _parse_metrics(path) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self._f = open(path, "a")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


# ------------------------------------------------------------------------------------------
# Sums of training metrics on the host


class Sums:
    """Host sums of the device accumulators (``steps.new_metrics``) of some intervals."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.sums: dict[str, float] = dict(state.get("sums", {}))
        self.maxima: dict[str, float] = dict(state.get("maxima", {}))
        self.counts: dict[str, int] = {"steps": 0, "skipped": 0, "fwd_unconverged": 0,
                                       "bwd_unconverged": 0, **state.get("counts", {})}

    def add(self, acc: dict, seconds: float) -> None:
        """Add an accumulator brought to the host, and the wall time of its interval."""
        for k in self.counts:
            self.counts[k] += int(acc[k])
        for k in METRICS:
            self.sums[k] = self.sums.get(k, 0.0) + float(acc["sums"][k])
        self.sums["step_time"] = self.sums.get("step_time", 0.0) + seconds
        for k in ("fwd_steps", "bwd_steps"):
            self.maxima[k] = max(self.maxima.get(k, 0.0), float(acc[f"{k}_max"]))

    def means(self, prefix: str = "") -> dict:
        """Means over the finite steps; ``step_time`` over all steps."""
        n, steps = self.counts["steps"] - self.counts["skipped"], self.counts["steps"]
        out = {f"{prefix}{k}": v / n for k, v in self.sums.items() if k != "step_time" and n}
        if steps and "step_time" in self.sums:
            out[f"{prefix}step_time"] = self.sums["step_time"] / steps
        return out


class EpochStats(Sums):
    """One epoch's sums. Saved with every checkpoint (``progress``), so an epoch resumed
    mid-way averages over all of its steps."""

    def __init__(self, epoch: int, state: dict | None = None):
        state = state if state and state.get("epoch") == epoch else {}
        super().__init__(state)
        self.epoch = epoch
        self.seconds = float(state.get("seconds", 0.0))
        self.restored = bool(state)

    def state(self, seconds: float) -> dict:
        return {"epoch": self.epoch, "sums": self.sums, "maxima": self.maxima,
                "counts": self.counts, "seconds": self.seconds + seconds}

    def record(self) -> dict:
        return {
            **self.means("train_"),
            "train_fwd_steps_max": self.maxima.get("fwd_steps"),
            "train_bwd_steps_max": self.maxima.get("bwd_steps"),
            "train_steps": self.counts["steps"],
            "train_skipped_steps": self.counts["skipped"],
            "train_fwd_unconverged": self.counts["fwd_unconverged"],
            "train_bwd_unconverged": self.counts["bwd_unconverged"],
        }


# Unconverged training solves (forward and backward) so far in this run: the layers' own
# warnings are off in the compiled step (no host callback), so the loop warns.
_unconverged = {"solves": 0, "warned": False}
# The layers' default warn_unconverged_after, read from their signature.
WARN_UNCONVERGED_AFTER = inspect.signature(deq.nnx.DEQ.__init__).parameters[
    "warn_unconverged_after"].default


def reset_unconverged_watch() -> None:
    """A new run: its own count, and its own warning."""
    _unconverged.update(solves=0, warned=False)


def _watch_unconverged(count: int) -> None:
    _unconverged["solves"] += count
    if _unconverged["warned"] or _unconverged["solves"] < WARN_UNCONVERGED_AFTER:
        return
    _unconverged["warned"] = True
    logger.warning(
        "%d training solves (forward or backward) so far did not converge: the model trains "
        "on points that are not equilibria, with inexact gradients. The counts are in "
        "metrics.jsonl (train_fwd_unconverged, train_bwd_unconverged) and in the run's "
        "summary. Things to try: a larger --config.solver.max_steps or "
        "--config.adjoint.max_steps, a stronger stabiliser (--config.reg.jac_weight=10.0), "
        "a smaller learning rate. Shown once per run.", _unconverged["solves"])


class EpochLog:
    """The host side of one epoch's training metrics: the intervals' sums, the ``train``
    lines (means since the previous line), the progress bar, the epoch record."""

    def __init__(self, config, writer: MetricsWriter, stats: EpochStats, per_epoch: int,
                 done: int):
        self.config, self.writer, self.stats, self.per_epoch = config, writer, stats, per_epoch
        self.window, self.partial = Sums(), bool(done) and not stats.restored
        self.bar = _progress(config, per_epoch, done, stats.epoch)
        self.t0 = self.interval_t0 = time.perf_counter()
        self.seconds = 0.0  # training time of this call, up to the latest interval's end

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def end_interval(self, step: int, acc: dict, last_checkpoint) -> None:
        """Add an interval's metrics (brought to the host); apply ``train.on_nonfinite``
        (``last_checkpoint()`` is ``(step, path)`` or None); write a ``train`` line every
        ``train.log_every`` steps and at the end of the epoch (over the steps since the
        previous line, ``steps`` of them), so that every step is in one line."""
        now = time.perf_counter()
        seconds, self.seconds = now - self.interval_t0, now - self.t0
        check_finite(self.config, acc, self.stats.counts["skipped"], self.writer,
                     last_checkpoint)
        self.stats.add(acc, seconds)
        self.window.add(acc, seconds)
        if self.config.mode != "unrolled":
            _watch_unconverged(int(acc["fwd_unconverged"]) + int(acc["bwd_unconverged"]))
        if step % self.config.train.log_every == 0 or step % self.per_epoch == 0:
            means = self.window.means()
            self.writer.write({"kind": "train", "step": step, "epoch": self.stats.epoch,
                               **means, "steps": self.window.counts["steps"],
                               "skipped": self.window.counts["skipped"]})
            if self.bar is not None:
                self.bar.set_postfix({k: f"{means[k]:.3g}" for k in
                                      ("loss", "accuracy", "fwd_steps", "bwd_steps")
                                      if k in means})
            self.window = Sums()
        self.interval_t0 = time.perf_counter()

    def epoch_state(self) -> dict:
        """The epoch's sums so far, saved with a checkpoint."""
        return self.stats.state(self.seconds)

    def end_epoch(self, step: int, evaluation: dict) -> dict:
        """Write the epoch record and its console line."""
        if self.bar is not None:
            self.bar.close()
        record = {"kind": "epoch", "step": step, "epoch": self.stats.epoch + 1,
                  "epoch_time": self.stats.seconds + self.seconds,
                  **self.stats.record(), **{f"test_{k}": v for k, v in evaluation.items()},
                  "peak_memory_bytes": peak_memory(),
                  **({"partial": True} if self.partial else {})}
        self.writer.write(record)
        logger.info("%s", epoch_line(record, self.config.train.num_epochs))
        return record


def _progress(config, total, initial, epoch):
    if not config.train.progress_bar or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"{config.name} epoch {epoch + 1}",
                leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------
# Non-finite steps


def check_finite(config, acc: dict, skipped_before: int, writer, last_checkpoint) -> None:
    """Apply ``train.on_nonfinite`` to an interval brought to the host (``last_checkpoint()``
    is ``(step, path)`` or None).

    The train step never applies a non-finite update (and, with 'stop', no update after it
    in the same interval), so stopping at the end of the interval leaves the state as it
    was before the bad step, which ``acc["first_bad"]`` names. With 'skip', warn about the
    first few per epoch (``skipped_before`` were skipped earlier in the epoch) and go on.
    """
    if int(acc["skipped"]) == 0:
        return
    step = int(acc["first_bad"])
    values = {name: float(acc["bad"][k]) for name, k in
              zip(("loss", "Jacobian penalty", "gradient norm"), BAD_VALUES)}
    bad = [k for k, v in values.items() if not np.isfinite(v)]
    what = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
    what = f"{' and '.join(bad)} ({what})"
    if config.train.on_nonfinite == "skip":
        if skipped_before < 5:
            n = int(acc["skipped"])
            logger.warning("step %d: non-finite %s; skipped (its update was not applied)%s%s.",
                           step, what, f", and {n - 1} more step(s) since" if n > 1 else "",
                           "; further skipped steps of this epoch are only counted"
                           if skipped_before + n >= 5 else "")
        return
    writer.write({"kind": "nonfinite", "step": step,
                  **{k: float(acc["bad"][k]) for k in BAD_VALUES}})
    writer.close()
    last = last_checkpoint()
    where = (f"the last good checkpoint is step {last[0]} ({last[1]})" if last
             else "there is no checkpoint yet")
    raise NonFiniteError(
        f"training stopped at step {step}: non-finite {what}. The update of this step (and "
        f"of any step after it) was not applied and nothing after it was saved; {where}. "
        "Rerunning the same command resumes from there and will likely meet the same step: "
        "add --config.train.on_nonfinite=skip to skip such steps (allowed in this workdir), "
        "or lower optim.learning_rate / enable optim.grad_clip in a new --workdir."
    )


# ------------------------------------------------------------------------------------------
# Console lines, run info and summary


def epoch_line(r: dict, num_epochs: int) -> str:
    """The console line of one epoch record."""
    f = lambda key, spec: "n/a" if r.get(key) is None else format(r[key], spec)  # noqa: E731
    skipped = f", {r['train_skipped_steps']} skipped" if r.get("train_skipped_steps") else ""
    return (
        f"epoch {r['epoch']}/{num_epochs}: train loss {f('train_loss', '.4f')} "
        f"acc {f('train_accuracy', '.4f')}{skipped} | test acc {f('test_accuracy', '.4f')} | "
        f"fwd steps {f('train_fwd_steps', '.1f')} res {f('train_fwd_rel_residual', '.1e')} | "
        f"bwd steps {f('train_bwd_steps', '.1f')} res {f('train_bwd_rel_residual', '.1e')} | "
        f"{r['epoch_time']:.1f}s" + (" (partial: resumed without epoch sums)"
                                     if r.get("partial") else "")
    )


def machine_description() -> str:
    """The machine in one line, as the result sets name it (``provenance.machine_name``), with
    the number of JAX devices."""
    return f"{machine_name(machine())}, {jax.device_count()} JAX device(s)"


def run_info(config, compiled, compile_seconds: float, num_params: int,
             steps_per_epoch: int) -> dict:
    """What ``run_info.json`` says about the run: machine, sizes, compiled step memory."""
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else None
    return {
        "name": config.name, "mode": config.mode, "machine": machine_description(),
        "jax": jax.__version__, "num_params": num_params, "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * config.train.num_epochs,
        "train_step_temp_bytes": temp, "compile_seconds": compile_seconds,
    }


def peak_memory():
    """Peak bytes in use on this process's first device (None where the backend reports none)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return None  # the CPU backend reports none; see train_step_temp_bytes
    return int(stats.get("peak_bytes_in_use", 0))


def summary(info: dict, workdir: Path, final_step: int) -> dict:
    """``summary.json``: the run info and totals over every epoch record of the run."""
    records = read_metrics(workdir)
    epochs = [r for r in records if r.get("kind") == "epoch"]
    step_times = [r["step_time"] for r in records if r.get("kind") == "train"
                  and r["step"] > 1 and r.get("step_time") is not None]
    last = epochs[-1] if epochs else {}

    def count(key):  # None where an epoch record lacks the count
        if not epochs or any(key not in r for r in epochs):
            return None
        return int(sum(r[key] for r in epochs))

    out = {
        **info,
        "final_step": final_step,
        "epochs": len(epochs),
        "test_accuracy": last.get("test_accuracy"),
        "best_test_accuracy": max((r["test_accuracy"] for r in epochs), default=None),
        "test_loss": last.get("test_loss"),
        "median_step_time": float(np.median(step_times)) if step_times else None,
        "mean_epoch_time": float(np.mean([r["epoch_time"] for r in epochs]))
        if epochs else None,
        **{k: last.get(k) for k in ("train_fwd_steps", "train_bwd_steps",
                                    "train_fwd_rel_residual", "test_fwd_steps",
                                    "test_fwd_rel_residual", "peak_memory_bytes",
                                    "test_samples", "test_at_equilibrium",
                                    "test_worst_residual")},
        # Every solve of the run (all epochs, resumed ones included), counted per batch.
        "train_steps": count("train_steps"),
        "skipped_steps": count("train_skipped_steps"),
        "train_fwd_unconverged": count("train_fwd_unconverged"),
        "train_bwd_unconverged": count("train_bwd_unconverged"),
        "eval_batches": count("test_batches"),
        "eval_fwd_unconverged": count("test_fwd_unconverged"),
        "partial_epochs": sum(bool(r.get("partial")) for r in epochs),
    }
    unconverged = [out[k] for k in ("train_fwd_unconverged", "train_bwd_unconverged",
                                    "eval_fwd_unconverged")]
    out["all_solves_converged"] = None if None in unconverged else not any(unconverged)
    if jax.process_index() == 0:
        write_json(workdir / "summary.json", out, indent=1)
    return out


def convergence_report(summary: dict) -> str:
    """One line: did every forward and backward solve converge, and how many did not."""
    def part(label, bad, total):
        return f"{label} all {total} converged" if not bad else \
            f"{label} {bad} of {total} did NOT converge"

    if summary.get("all_solves_converged") is None:
        return ("solver convergence was not counted for every epoch (an epoch record without "
                "the counts): see train_fwd_rel_residual in metrics.jsonl.")
    n = summary["train_steps"] - summary["skipped_steps"]
    line = "; ".join([
        part("forward solves (train batches):", summary["train_fwd_unconverged"], n),
        part("backward solves:", summary["train_bwd_unconverged"], n),
    ])
    if summary.get("test_samples"):
        line += (f"; final evaluation: {summary['test_at_equilibrium']} of "
                 f"{summary['test_samples']} test samples at equilibrium (relative residual "
                 f"<= 1e-3; worst {summary['test_worst_residual']:.1e})")
    if summary.get("skipped_steps"):
        line += f"; {summary['skipped_steps']} training steps skipped (non-finite)"
    if summary.get("mode") == "unrolled":
        line += " (unrolled mode: a fixed number of steps, convergence is not required)"
    return line

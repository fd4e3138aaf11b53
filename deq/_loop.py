"""The two solve loops shared by every forward solver, on ``(batch, dim)`` matrices.

Both evaluate ``f``, ask the solver for the next iterate (``solver.update``), keep each
sample's best iterate, and freeze a sample that turns non-finite at its best finite iterate:

* :func:`solve` runs a ``lax.while_loop`` that stops by the solver's stopping rule; it is not
  reverse-differentiable and is used under the implicit, phantom and Jacobian-free adjoints
  (and, through ``_linear_solve.py``, for the adjoint linear system itself);
* :func:`unroll` runs a fixed number of steps with ``lax.scan``; it is differentiable and is
  the unrolled-backprop baseline.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deq._solution import RESULTS, SolverStats, trace_size, trace_stride
from deq._solvers import ForwardSolver


def residual_dtype(z):
    """Residual norms and tolerances are real, in at least float32 (bf16 states included)."""
    return jnp.promote_types(jnp.finfo(z.dtype).dtype, jnp.float32)


def _norms(x):
    """Per-sample Euclidean norms of a ``(B, D)`` matrix, from ``|x|`` (complex entries
    included: ``x * x`` would let ``1`` and ``1j`` cancel), in the residual dtype."""
    dt = residual_dtype(x)
    a = jnp.abs(x).astype(dt)
    return jnp.sqrt(jnp.sum(a * a, axis=1))


def _residual_norms(z, fz):
    """Per-sample |f(z) - z| and |f(z)|, in the residual dtype."""
    return _norms(fz - z), _norms(fz)


def _worst(x, axis=None):
    """Max of non-negative residuals; 0 for an empty batch (the same max otherwise)."""
    return jnp.max(x, axis=axis, initial=0.0)


class _LoopState(NamedTuple):
    """The carry of :func:`solve`'s while loop; ``(B,)`` fields are per sample."""

    step: Any  # evaluations of f so far
    z: Any  # current iterate (B, D)
    fz: Any  # f(z)
    solver_state: Any
    best_z: Any
    best_abs: Any  # (B,)
    best_rel: Any  # (B,)
    best_tol: Any  # (B,) atol + rtol |f(z_best)|
    failed: Any  # (B,) the sample produced a non-finite value: it is frozen at best_z
    abs_trace: Any
    rel_trace: Any
    best_progress: Any  # worst best_abs/best_tol when progress was last counted
    steps_without_progress: Any
    result: Any
    result_per_sample: Any  # (B,)
    done: Any


def _trace_entry(values, live):
    """Worst value over the samples still alive; inf when none is (all turned non-finite)."""
    return jnp.where(jnp.any(live), _worst(jnp.where(live, values, 0.0)), jnp.inf)


def _record_evaluation(solver: ForwardSolver, s: _LoopState, max_steps: int,
                       stride: int) -> _LoopState:
    """After the evaluation ``s.fz = f(s.z)``: its residuals, each sample's best iterate, which
    samples are done or non-finite, and whether (and why) the solve stops. The traces keep
    one entry per ``stride`` steps (the window's last step overwrites its entry)."""
    res, nf = _residual_norms(s.z, s.fz)
    rel = res / jnp.maximum(nf, jnp.finfo(nf.dtype).tiny)
    tol = solver.tolerance(nf)
    finite = jnp.isfinite(res) & jnp.all(jnp.isfinite(s.fz), axis=1)
    better = finite & (res < s.best_abs) & ~s.failed
    best_z = jnp.where(better[:, None], s.z, s.best_z)
    best_abs = jnp.where(better, res, s.best_abs)
    best_rel = jnp.where(better, rel, s.best_rel)
    best_tol = jnp.where(better, tol, s.best_tol)
    sample_done = best_abs <= best_tol
    # A sample whose iterate went non-finite will stay so (f(NaN) is NaN): freeze it at its
    # best finite iterate, as a converged sample is frozen, and let the others go on.
    failed = s.failed | (~finite & ~sample_done)
    i = (s.step - 1) // stride
    abs_trace = s.abs_trace.at[i].set(_trace_entry(res, ~failed))
    rel_trace = s.rel_trace.at[i].set(_trace_entry(rel, ~failed))

    settled = sample_done | failed
    all_settled = jnp.all(settled)
    progress = _worst(jnp.where(settled, 0.0, best_abs / best_tol))
    best_progress, steps_without_progress, stagnated = solver.track_stall(
        progress, s.best_progress, s.steps_without_progress)
    # A failure of one sample outranks why the others stopped: the batch is not a success.
    result = jnp.select(
        [jnp.all(sample_done), jnp.any(failed), stagnated, s.step >= max_steps],
        [RESULTS.SUCCESSFUL, RESULTS.NONFINITE, RESULTS.STAGNATED, RESULTS.MAX_STEPS],
        RESULTS.MAX_STEPS,
    ).astype(jnp.int32)
    # Each sample's own code: a sample still running shares the reason the solve stopped.
    reason = jnp.where(stagnated, RESULTS.STAGNATED, RESULTS.MAX_STEPS)
    result_per_sample = jnp.where(
        sample_done, RESULTS.SUCCESSFUL, jnp.where(failed, RESULTS.NONFINITE, reason)
    ).astype(jnp.int32)
    done = all_settled | stagnated | (s.step >= max_steps)
    return s._replace(
        best_z=best_z, best_abs=best_abs, best_rel=best_rel, best_tol=best_tol, failed=failed,
        abs_trace=abs_trace, rel_trace=rel_trace, best_progress=best_progress,
        steps_without_progress=steps_without_progress, result=result,
        result_per_sample=result_per_sample, done=done,
    )


def solve(f, solver: ForwardSolver, z0, max_steps: int):
    """Solve ``z = f(z)`` for a ``(B, D)`` matrix ``z``, stopping by the solver's rule.

    At most ``max_steps`` (>= 1, checked by the caller) evaluations of ``f``, and as many
    again for ``solver.fallback`` if the solver left samples unconverged. Samples are
    independent: one that converges, or turns non-finite, is frozen at its best iterate while
    the others go on. Returns ``(z_best, SolverStats)``; the traces have length
    ``trace_size(solver.budget(max_steps))``.
    """
    res_dtype = residual_dtype(z0)
    bsz = z0.shape[0]
    fz0 = f(z0)
    budget = solver.budget(max_steps)
    stride = trace_stride(budget)
    nan_trace = jnp.full((trace_size(budget),), jnp.nan, res_dtype)
    primary = solver.without_fallback()
    s = _LoopState(
        step=jnp.ones((), jnp.int32), z=z0, fz=fz0, solver_state=primary.init(z0, fz0),
        best_z=z0, best_abs=jnp.full((bsz,), jnp.inf, res_dtype),
        best_rel=jnp.full((bsz,), jnp.inf, res_dtype),
        best_tol=jnp.zeros((bsz,), res_dtype), failed=jnp.zeros((bsz,), jnp.bool_),
        abs_trace=nan_trace, rel_trace=nan_trace,
        best_progress=jnp.asarray(jnp.inf, res_dtype),
        steps_without_progress=jnp.zeros((), jnp.int32), result=jnp.zeros((), jnp.int32),
        result_per_sample=jnp.zeros((bsz,), jnp.int32), done=jnp.zeros((), jnp.bool_),
    )
    s = _run(f, primary, primary, _record_evaluation(primary, s, max_steps, stride), max_steps,
             stride)
    if solver.fallback is not None:
        s = _fall_back(f, primary, solver.fallback, s, max_steps, stride)
    stats = _stats(s.step, s.best_abs, s.best_rel, s.abs_trace, s.rel_trace, s.result,
                   s.result_per_sample)
    return s.best_z, stats


def _run(f, rule: ForwardSolver, stepper: ForwardSolver, s: _LoopState, max_steps: int,
         stride: int):
    """The while loop: ``stepper`` proposes iterates, ``rule`` decides when to stop."""

    def body(s):
        frozen = (s.best_abs <= s.best_tol) | s.failed
        z_next, solver_state = stepper.update(s.z, s.fz, s.solver_state)
        # Settled samples stay where they are: the batch runs on for the slowest sample
        # only, and a finished sample must not drift away from its fixed point meanwhile.
        z_next = jnp.where(frozen[:, None], s.best_z, z_next)
        fz_next = f(z_next)
        s = s._replace(step=s.step + 1, z=z_next, fz=fz_next, solver_state=solver_state)
        return _record_evaluation(rule, s, max_steps, stride)

    return jax.lax.while_loop(lambda s: ~s.done, body, s)


def _fall_back(f, primary: ForwardSolver, fallback: ForwardSolver, s: _LoopState,
               max_steps: int, stride: int):
    """Second phase: ``fallback`` restarts the unsettled samples from their best iterates, for
    up to ``max_steps`` more evaluations, with the primary's tolerances and the fallback's
    stall rule. Skipped (no evaluation) when every sample has settled."""
    rule = dataclasses.replace(primary, stall_patience=fallback.stall_patience,
                               stall_factor=fallback.stall_factor)
    budget = primary.budget(max_steps) + max_steps

    def second_phase(s):
        fz = f(s.best_z)
        s = s._replace(
            step=s.step + 1, z=s.best_z, fz=fz, solver_state=fallback.init(s.best_z, fz),
            best_progress=jnp.full_like(s.best_progress, jnp.inf),
            steps_without_progress=jnp.zeros_like(s.steps_without_progress),
            done=jnp.zeros_like(s.done),
        )
        return _run(f, rule, fallback, _record_evaluation(rule, s, budget, stride), budget,
                    stride)

    unsettled = jnp.any((s.best_abs > s.best_tol) & ~s.failed)
    # The state's solver_state changes type with the solver: carry the primary's out of the
    # branch unchanged and drop the fallback's.
    return jax.lax.cond(
        unsettled,
        lambda s: second_phase(s)._replace(solver_state=s.solver_state),
        lambda s: s,
        s,
    )


def _stats(step, abs_res, rel_res, abs_trace, rel_trace, result, result_per_sample):
    # A sample that never produced a finite residual keeps inf: report it, never hide it.
    return SolverStats(
        num_steps=step,
        abs_residual=_worst(abs_res),
        rel_residual=_worst(rel_res),
        abs_residual_per_sample=abs_res,
        rel_residual_per_sample=rel_res,
        abs_trace=abs_trace,
        rel_trace=rel_trace,
        converged=result == RESULTS.SUCCESSFUL,
        result=result,
        result_per_sample=result_per_sample,
    )


@jax.checkpoint
def _select_rows(mask, on_true, on_false):
    """``jnp.where(mask[:, None], on_true, on_false)`` for a ``(B,)`` mask and ``(B, D)`` rows.

    Rematerialised, so that reverse mode keeps the ``(B,)`` mask for the backward pass rather
    than its ``(B, D)`` broadcast (the unrolled loop makes three such selections per step).
    """
    return jnp.where(mask[:, None], on_true, on_false)


def unroll(f, solver: ForwardSolver, z0, num_steps: int, checkpoint: bool = False):
    """Differentiable fixed-length run: ``num_steps`` evaluations of ``f``, no early stop.

    ``num_steps`` >= 1 (checked by the caller). Returns ``(z, SolverStats)`` where ``z`` is
    the solver's next iterate after the last evaluation (for plain iteration, exactly ``f``
    applied ``num_steps`` times to ``z0``) and the stats describe the last evaluated iterate.
    A sample that turns non-finite is frozen at its best finite iterate (smallest residual
    among those whose ``f`` was finite), which is then its returned value, differentiable
    like the others; its result is NONFINITE.
    """
    fz0 = f(z0)
    state0 = solver.init(z0, fz0)
    sg = jax.lax.stop_gradient

    def rows_finite(x):
        return jnp.all(jnp.isfinite(x), axis=1)

    def record_evaluation(z, fz, best_z, best_res, best_rel, failed):
        res, nf = _residual_norms(sg(z), sg(fz))
        rel = res / jnp.maximum(nf, jnp.finfo(nf.dtype).tiny)
        failed = failed | ~(jnp.isfinite(res) & rows_finite(fz))
        better = ~failed & (res < best_res)
        best_z = _select_rows(better, z, best_z)
        best_res = jnp.where(better, res, best_res)
        best_rel = jnp.where(better, rel, best_rel)
        # A failed sample looks like a fixed point at best_z to the solver: its history stays
        # finite, and no inf/NaN reaches the backward pass through the solver's update.
        fz = _select_rows(failed, best_z, fz)
        return fz, best_z, best_res, best_rel, failed, (res, nf, failed)

    inf = jnp.full((z0.shape[0],), jnp.inf, residual_dtype(z0))
    no_failure = jnp.zeros((z0.shape[0],), jnp.bool_)
    fz0, *best0, ys0 = record_evaluation(z0, fz0, z0, inf, inf, no_failure)

    def body(carry, _):
        z, fz, st, best_z, best_res, best_rel, failed = carry
        z_next, st = solver.update(z, fz, st)
        failed = failed | ~rows_finite(sg(z_next))
        # Never evaluate f at a non-finite point: its VJP there would be NaN even with a
        # zero cotangent, and would poison the gradient of the shared parameters.
        z_next = _select_rows(failed, best_z, z_next)
        fz_next = f(z_next)
        fz_next, best_z, best_res, best_rel, failed, ys = record_evaluation(
            z_next, fz_next, best_z, best_res, best_rel, failed)
        return (z_next, fz_next, st, best_z, best_res, best_rel, failed), ys

    if checkpoint:
        body = jax.checkpoint(body)
    carry, ys = jax.lax.scan(body, (z0, fz0, state0, *best0), None, length=num_steps - 1)
    z, fz, st, best_z, best_res, best_rel, failed = carry
    # (steps, B): the first evaluation, then the scanned ones.
    res, nf, failed_at = (jnp.concatenate([a[None], b], axis=0) for a, b in zip(ys0, ys))
    rel = res / jnp.maximum(nf, jnp.finfo(nf.dtype).tiny)
    z_out, _ = solver.update(z, fz, st)
    failed = failed | ~rows_finite(sg(z_out))
    z_out = _select_rows(failed, best_z, z_out)
    tol = solver.tolerance(nf[-1])
    conv = ~failed & (res[-1] <= tol)
    result_per_sample = jnp.where(
        conv, RESULTS.SUCCESSFUL, jnp.where(failed, RESULTS.NONFINITE, RESULTS.MAX_STEPS)
    ).astype(jnp.int32)
    result = jnp.where(
        jnp.any(failed), RESULTS.NONFINITE,
        jnp.where(jnp.all(conv), RESULTS.SUCCESSFUL, RESULTS.MAX_STEPS),
    ).astype(jnp.int32)
    # The traces keep the last step of each window of trace_stride steps.
    stride = trace_stride(num_steps)
    keep = jnp.minimum(jnp.arange(1, trace_size(num_steps) + 1) * stride, num_steps) - 1
    trace = jax.vmap(_trace_entry)
    stats = _stats(
        jnp.asarray(num_steps, jnp.int32),
        jnp.where(failed, best_res, res[-1]), jnp.where(failed, best_rel, rel[-1]),
        trace(res[keep], ~failed_at[keep]), trace(rel[keep], ~failed_at[keep]), result,
        result_per_sample,
    )
    return z_out, stats

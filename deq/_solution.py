"""Result objects returned by the fixed-point solve: values plus fixed-shape, jit-safe stats."""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class RESULTS(enum.IntEnum):
    """Why a solve stopped. Stored as an int32 in :class:`SolverStats` (``result``)."""

    SUCCESSFUL = 0  #: every sample met ``atol + rtol * |f(z)|``
    MAX_STEPS = 1  #: the step limit was reached first
    STAGNATED = 2  #: the residual stopped improving (e.g. the precision floor of TF32 matmuls)
    NONFINITE = 3  #: f produced inf/NaN; the best finite iterate seen is returned

    @classmethod
    def describe(cls, code) -> str:
        """Human-readable name of a (concrete) result code."""
        return cls(int(code)).name.lower()


TRACE_CAP = 256  # the longest residual trace kept by a solve's stats


def trace_stride(budget: int) -> int:
    """Steps per trace entry for a solve of ``budget`` steps: 1 up to ``TRACE_CAP``."""
    return max(1, -(-int(budget) // TRACE_CAP))


def trace_size(budget: int) -> int:
    """Entries of the residual traces of a solve of ``budget`` steps (<= ``TRACE_CAP``)."""
    return -(-int(budget) // trace_stride(budget))


class SolverStats(NamedTuple):
    """Statistics of one solve. Every field has a fixed shape, so this is safe under jit/vmap.

    For a batched solve (``batched=True``) the scalar fields describe the worst sample and the
    ``*_per_sample`` fields hold one entry per sample. Samples are solved independently: one
    that turns non-finite is frozen at its best finite iterate and flagged NONFINITE in
    ``result_per_sample``, while the others run on to their own convergence (the solve's
    ``result`` is then NONFINITE, but the healthy samples' values and residuals are theirs).

    Attributes:
      num_steps: int32, evaluations of ``f`` made (the first one is at ``z0``).
      abs_residual: ``max_i |f(z_i) - z_i|`` for the returned (best) iterate, worst sample.
      rel_residual: ``|f(z) - z| / |f(z)|`` of the returned iterate, worst sample.
      abs_residual_per_sample: shape ``(batch,)`` (``(1,)`` when unbatched).
      rel_residual_per_sample: shape ``(batch,)``.
      abs_trace: the worst absolute residual over the samples that have not turned
        non-finite (inf once none is left), step by step: shape ``(n,)`` with
        ``n = trace_size(budget)``, where ``budget`` is ``max_steps`` (twice that with a
        fallback solver). Up to ``TRACE_CAP`` steps each step has its entry; a longer budget
        keeps every ``trace_stride(budget)``-th step (entry ``j`` is step
        ``(j + 1) * stride``, or the last step), so the stats' size never grows with the
        budget. Entries after the last step are NaN (padding, not a failure).
      rel_trace: likewise for the relative residual.
      converged: bool, every sample met its tolerance.
      result: int32 code from :class:`RESULTS`: SUCCESSFUL if every sample converged, else
        NONFINITE if any sample turned non-finite, else why the solve stopped.
      result_per_sample: int32, shape ``(batch,)``: each sample's own code (SUCCESSFUL,
        NONFINITE, or for a sample still running when the solve stopped MAX_STEPS or
        STAGNATED).
    """

    num_steps: Any
    abs_residual: Any
    rel_residual: Any
    abs_residual_per_sample: Any
    rel_residual_per_sample: Any
    abs_trace: Any
    rel_trace: Any
    converged: Any
    result: Any
    result_per_sample: Any

    def summary(self) -> str:
        """One line for logs (needs concrete values, i.e. call it outside jit)."""
        line = (
            f"steps={int(self.num_steps)} abs={float(self.abs_residual):.3e} "
            f"rel={float(self.rel_residual):.3e} result={RESULTS.describe(self.result)}"
        )
        bad = int(jnp.sum(jnp.asarray(self.result_per_sample) == RESULTS.NONFINITE))
        return line + (f" nonfinite_samples={bad}" if bad else "")


class BackwardStats(NamedTuple):
    """Statistics of the backward (adjoint) solves of :class:`deq.ImplicitAdjoint`.

    Read them with :func:`deq.backward_stats` from the cotangent of a probe (see there). A
    probe may be shared by several solves (two DEQ layers, a ``vmap`` over an unbatched
    probe, ...): the cotangents of a probe add up, so every field is defined from sums and
    means the same for one solve as for many.

    Attributes:
      num_steps: total iterations (or Krylov matrix-vector products) of all the adjoint solves.
      abs_residual: ``|u - g - J^T u|`` at the returned ``u``, as a 2-norm over the whole batch
        and over all solves (the residual of the joint adjoint system: the square root of the
        sum of the solves' squared residuals).
      rel_residual: ``abs_residual / |u|``, both over all solves (what the parameter gradient
        sees).
      converged: whether every adjoint solve met its tolerance. For GMRES the test is on the
        whole batch; for the iterative solvers it is per sample (``atol + rtol |u_i|``), so
        ``converged`` can be False next to a small whole-batch ``rel_residual`` when one
        sample with a tiny cotangent is left behind.
      result: :class:`RESULTS` code: NONFINITE if any solve turned non-finite, else
        STAGNATED if every failed solve stagnated, else MAX_STEPS if any did not converge,
        else SUCCESSFUL (for one solve: its own code).
      num_solves: how many adjoint solves wrote to the probe (0: it reached none).
      num_failed: how many of them did not converge.
      num_nonfinite: how many of them turned non-finite.
      mean_steps: ``num_steps / num_solves`` (0 when there was no solve).
    """

    num_steps: Any
    abs_residual: Any
    rel_residual: Any
    converged: Any
    result: Any
    num_solves: Any
    num_failed: Any
    num_nonfinite: Any
    mean_steps: Any


# Layout of the probe's cotangent: additive quantities only, so that several solves sharing
# a probe add up to a meaningful total.
_SOLVES, _STEPS, _ABS_SQ, _U_SQ, _FAILED, _NONFINITE, _STAGNATED = range(7)
BACKWARD_STATS_SIZE = 7


def backward_stats_cotangent(steps, abs_residual, u_norm, result, dtype):
    """The probe cotangent written by one adjoint solve (see :func:`backward_stats`)."""
    # Squares in at least float32, then cast: residuals below ~1e-19 read as 0 in a float32
    # probe, which only ever means "converged".
    dt = jnp.promote_types(dtype, jnp.float32)
    cotangent = jnp.zeros((BACKWARD_STATS_SIZE,), dt)
    cotangent = cotangent.at[_SOLVES].set(1.0).at[_STEPS].set(jnp.asarray(steps, dt))
    cotangent = cotangent.at[_ABS_SQ].set(jnp.square(jnp.asarray(abs_residual, dt)))
    cotangent = cotangent.at[_U_SQ].set(jnp.square(jnp.asarray(u_norm, dt)))
    for i, failed in ((_FAILED, result != RESULTS.SUCCESSFUL),
                      (_NONFINITE, result == RESULTS.NONFINITE),
                      (_STAGNATED, result == RESULTS.STAGNATED)):
        cotangent = cotangent.at[i].set(failed.astype(dt))
    return cotangent.astype(dtype)


def backward_stats_probe(dtype=jnp.float32) -> jax.Array:
    """A zero vector to pass as ``probe=`` to :func:`deq.fixed_point`.

    A JAX derivative rule cannot return auxiliary data from the backward pass, so the adjoint
    solve writes its statistics into the cotangent of this probe. Differentiate with respect
    to the probe as well as the parameters, then decode with :func:`backward_stats`. The
    probe does not change the forward value. One probe may serve several solves (e.g. every
    DEQ layer of a model); :class:`BackwardStats` then describes them all together. Use one
    probe per layer to tell them apart.

    Example::

      probe = deq.backward_stats_probe()
      def loss(params, probe):
          return deq.fixed_point(f, z0, (params, x), probe=probe).value.sum()
      grads, probe_grad = jax.grad(loss, argnums=(0, 1))(params, probe)
      print(deq.backward_stats(probe_grad))
    """
    return jnp.zeros((BACKWARD_STATS_SIZE,), dtype)


def backward_stats(probe_cotangent) -> BackwardStats:
    """Decode the cotangent of :func:`backward_stats_probe` into :class:`BackwardStats`.

    Each implicit backward solve adds its count, steps, squared residual, squared ``|u|`` and
    failure flags to the cotangent; the totals are decoded here (see :class:`BackwardStats`).
    A probe that reached no implicit solve reads as zero solves and zero steps, converged.
    Works on a stack of cotangents too (leading axes are kept).
    """
    p = jnp.asarray(probe_cotangent)
    if p.shape[-1:] != (BACKWARD_STATS_SIZE,):
        raise ValueError(
            f"backward_stats needs the cotangent of deq.backward_stats_probe() (last axis "
            f"{BACKWARD_STATS_SIZE}); got shape {p.shape}."
        )
    # Counts are sums of exact small integers, rounded against float error all the same.
    count = lambda i: jnp.round(p[..., i]).astype(jnp.int32)
    solves, failed, nonfinite = count(_SOLVES), count(_FAILED), count(_NONFINITE)
    steps, stagnated = count(_STEPS), count(_STAGNATED)
    abs_res = jnp.sqrt(p[..., _ABS_SQ])
    u_norm = jnp.sqrt(p[..., _U_SQ])
    result = jnp.select(
        [nonfinite > 0, failed == 0, failed == stagnated],
        [RESULTS.NONFINITE, RESULTS.SUCCESSFUL, RESULTS.STAGNATED], RESULTS.MAX_STEPS,
    )
    return BackwardStats(
        num_steps=steps,
        abs_residual=abs_res,
        rel_residual=abs_res / jnp.maximum(u_norm, 1e-30),
        converged=failed == 0,
        result=result.astype(jnp.int32),
        num_solves=solves,
        num_failed=failed,
        num_nonfinite=nonfinite,
        mean_steps=steps / jnp.maximum(solves, 1),
    )


class Solution(NamedTuple):
    """What :func:`deq.fixed_point` returns.

    Attributes:
      value: the fixed point ``z*``, same pytree structure as ``z0``.
      stats: :class:`SolverStats` of the forward solve.
    """

    value: Any
    stats: SolverStats

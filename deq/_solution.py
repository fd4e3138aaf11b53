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


class SolverStats(NamedTuple):
    """Statistics of one solve. Every field has a fixed shape, so this is safe under jit/vmap.

    For a batched solve (``batched=True``) the scalar fields describe the worst sample and the
    ``*_per_sample`` fields hold one entry per sample.

    Attributes:
      num_steps: int32, evaluations of ``f`` made (the first one is at ``z0``).
      abs_residual: ``max_i |f(z_i) - z_i|`` for the returned (best) iterate, worst sample.
      rel_residual: ``|f(z) - z| / |f(z)|`` of the returned iterate, worst sample.
      abs_residual_per_sample: shape ``(batch,)`` (``(1,)`` when unbatched).
      rel_residual_per_sample: shape ``(batch,)``.
      abs_trace: shape ``(max_steps,)``, the worst-sample absolute residual at each step;
        entries after ``num_steps`` are NaN (padding, not a failure).
      rel_trace: shape ``(max_steps,)``, likewise for the relative residual.
      converged: bool, every sample met its tolerance.
      result: int32 code from :class:`RESULTS`.
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

    def summary(self) -> str:
        """One line for logs (needs concrete values, i.e. call it outside jit)."""
        return (
            f"steps={int(self.num_steps)} abs={float(self.abs_residual):.3e} "
            f"rel={float(self.rel_residual):.3e} result={RESULTS.describe(self.result)}"
        )


class BackwardStats(NamedTuple):
    """Statistics of the backward (adjoint) solve of :class:`deq.ImplicitAdjoint`.

    Read them with :func:`deq.backward_stats` from the cotangent of a probe (see there).

    Attributes:
      num_steps: iterations (or Krylov matrix-vector products) of the adjoint solve.
      abs_residual: ``|u - g - J^T u|`` at the returned ``u`` (2-norm over the whole batch).
      rel_residual: ``abs_residual / |u|`` (whole batch: what the parameter gradient sees).
      converged: whether the adjoint solve met its tolerance. For GMRES the test is on the
        whole batch; for the iterative solvers it is per sample (``atol + rtol |u_i|``), so
        ``converged`` can be False next to a small whole-batch ``rel_residual`` when one
        sample with a tiny cotangent is left behind.
      result: :class:`RESULTS` code.
    """

    num_steps: Any
    abs_residual: Any
    rel_residual: Any
    converged: Any
    result: Any


BACKWARD_STATS_SIZE = 5


def backward_stats_probe(dtype=jnp.float32) -> jax.Array:
    """A zero vector to pass as ``probe=`` to :func:`deq.fixed_point`.

    JAX's custom VJPs cannot return auxiliary data from the backward pass, so the adjoint
    solve writes its statistics into the cotangent of this probe. Differentiate with respect
    to the probe as well as the parameters, then decode with :func:`backward_stats`. The
    probe does not change the forward value.

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

    Cotangents add up: if one probe goes through several solves (e.g. two DEQ layers, or a
    ``vmap`` over an unbatched probe), steps and residuals are summed and ``converged`` is
    True only if every solve converged. Use one probe per layer to tell them apart. A probe
    that reached no implicit solve reads as zero steps, converged.
    """
    p = jnp.asarray(probe_cotangent)
    return BackwardStats(
        num_steps=p[..., 0].astype(jnp.int32),
        abs_residual=p[..., 1],
        rel_residual=p[..., 2],
        converged=p[..., 3] < 0.5,  # stored as the number of failed solves
        result=p[..., 4].astype(jnp.int32),
    )


class Solution(NamedTuple):
    """What :func:`deq.fixed_point` returns.

    Attributes:
      value: the fixed point ``z*``, same pytree structure as ``z0``.
      stats: :class:`SolverStats` of the forward solve.
    """

    value: Any
    stats: SolverStats

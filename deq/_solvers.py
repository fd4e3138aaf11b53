"""Forward fixed-point solvers: small frozen objects of hyperparameters.

Every solver works on a flattened state of shape ``(batch, dim)`` (``batch == 1`` for an
unbatched solve; see ``_flatten.py``), so that per-sample quantities (Anderson mixing
weights, Broyden updates, residual norms) are computed for each sample independently.
``init`` builds the solver's state (a NamedTuple of arrays) from the first evaluation,
``update`` proposes the next iterate from ``z`` and ``f(z)``. The stopping rule is the
solver's too (:meth:`ForwardSolver.tolerance`, :meth:`ForwardSolver.track_stall`). The loops
that evaluate ``f``, keep the best iterate and apply the stopping rule are in ``_loop.py``
(:func:`deq._loop.solve` with early stopping, :func:`deq._loop.unroll` for a fixed number of
steps), shared by all solvers; no solver mixes samples, so a non-finite sample cannot leak
into the others.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deq._validate import check_float, check_int, check_tolerances, set_field


def _bdot(a, b):
    """Per-sample inner product ``a^H b`` of (B, D) arrays -> (B,) (conjugated for complex)."""
    return jnp.einsum("bd,bd->b", jnp.conj(a), b)


_sg = jax.lax.stop_gradient


# Up to this history length Anderson's weights come from _spd_solve (unrolled, ~m^2/2 fused
# ops); beyond it, from a batched LAPACK solve.
_UNROLLED_SOLVE_MAX = 16


def _spd_solve(a, b):
    """``a^{-1} b`` for a batch ``(B, m, m)`` of Hermitian positive definite matrices, by
    Gaussian elimination without pivoting unrolled over the (static, small) ``m``: a handful of
    fused elementwise ops instead of a batched LAPACK call."""
    m = a.shape[-1]
    for k in range(m - 1):
        f = a[:, k + 1:, k] / a[:, k, k][:, None]
        a = a.at[:, k + 1:, :].add(-f[:, :, None] * a[:, k, None, :])
        b = b.at[:, k + 1:].add(-f * b[:, k, None])
    x = [None] * m
    for k in reversed(range(m)):
        acc = b[:, k]
        for j in range(k + 1, m):
            acc = acc - a[:, k, j] * x[j]
        x[k] = acc / a[:, k, k]
    return jnp.stack(x, axis=1)


class AndersonState(NamedTuple):
    """:class:`Anderson`'s memory: the last ``history`` evaluations, in a ring buffer."""

    f_history: Any  # (B, m, D): f(z_i)
    residual_history: Any  # (B, m, D): f(z_i) - z_i
    # (B, m, m): their Gram matrix, in at least float32 (tiny residuals squared underflow in
    # bf16); one row is updated per step, m dot products instead of m^2.
    residual_gram: Any
    num_stored: Any  # int32: pairs stored so far (the next slot is num_stored % m)


class BroydenState(NamedTuple):
    """:class:`Broyden`'s inverse-Jacobian approximation ``-I + sum_i u_i v_i^T`` and the
    previous point, whose differences give the next secant update."""

    us: Any  # (B, m, D)
    vs: Any  # (B, m, D)
    prev_z: Any  # (B, D)
    prev_residual: Any  # (B, D): f(prev_z) - prev_z
    # (B,): per sample, so that a sample's memory restarts when its own updates fill it and
    # its iterates never depend on the other samples of the batch.
    num_updates: Any
    has_prev: Any  # bool: whether prev_z is a real previous point (False at the start)


@dataclasses.dataclass(frozen=True)
class ForwardSolver(abc.ABC):
    """Base class of the forward solvers; holds the common hyperparameters.

    A sample has converged when ``|f(z) - z| <= atol + rtol * |f(z)|`` (Euclidean norms over
    the sample). A sample that produces inf/NaN is frozen at its best finite iterate. The
    solve stops as soon as every sample has converged or been frozen so, when ``max_steps``
    evaluations of ``f`` are spent, or when the worst running sample's residual (relative to
    its tolerance) has not improved by ``stall_factor`` within ``stall_patience`` steps.
    :meth:`tolerance` and :meth:`track_stall` are that rule; both loops of ``_loop.py`` apply
    it.

    ``fallback``: another solver that takes over the samples this one leaves unconverged
    (stagnated or out of steps), each from its best iterate, for up to ``max_steps`` further
    evaluations (so a solve may take up to twice ``max_steps``); converged samples stay
    frozen. The tolerances stay this solver's; the stall rule of the second phase is the
    fallback's. Used by the early-stopping solve (implicit, phantom and Jacobian-free
    adjoints); a fixed-length unrolled solve runs this solver only.
    """

    rtol: float = 1e-4
    atol: float = 1e-6
    stall_patience: int | None = 20
    stall_factor: float = 0.999
    fallback: ForwardSolver | None = None

    def __post_init__(self):
        rtol, atol = check_tolerances(self, self.rtol, self.atol)
        set_field(self, "rtol", rtol)
        set_field(self, "atol", atol)
        set_field(self, "stall_patience", check_int(
            self, "stall_patience", self.stall_patience, minimum=1, allow_none=True))
        set_field(self, "stall_factor", check_float(
            self, "stall_factor", self.stall_factor, minimum=0.0, maximum=1.0, open_min=True))
        fb = self.fallback
        if fb is not None and (not isinstance(fb, ForwardSolver) or fb.fallback is not None):
            raise TypeError(
                f"{type(self).__name__}: fallback must be deq.FixedPointIteration, deq.Anderson "
                f"or deq.Broyden without a fallback of its own (or None), got {fb!r}."
            )

    def budget(self, max_steps: int) -> int:
        """Most evaluations of ``f`` an early-stopping solve with ``max_steps`` can make."""
        return max_steps * (1 if self.fallback is None else 2)

    def without_fallback(self) -> ForwardSolver:
        return self if self.fallback is None else dataclasses.replace(self, fallback=None)

    def tolerance(self, f_norm):
        """Per-sample tolerance of the stopping rule, ``atol + rtol * |f(z)|``."""
        return self.atol + self.rtol * f_norm

    def track_stall(self, progress, best_progress, steps_without_progress):
        """One step of the stall test of the stopping rule.

        ``progress`` is the worst running sample's residual relative to its tolerance. Returns
        ``(best_progress, steps_without_progress, stalled)``: progress counts when it falls
        below ``stall_factor`` times the best so far, and the solve has stalled when none was
        counted for ``stall_patience`` steps (never, with ``stall_patience=None``).
        """
        improved = progress < self.stall_factor * best_progress
        best_progress = jnp.where(improved, progress, best_progress)
        steps_without_progress = jnp.where(improved, 0, steps_without_progress + 1)
        stalled = (
            jnp.asarray(False)
            if self.stall_patience is None
            else steps_without_progress >= self.stall_patience
        )
        return best_progress, steps_without_progress, stalled

    def init(self, z, fz) -> Any:
        """The solver's state after the first evaluation ``fz = f(z)``; none by default."""
        return ()

    @abc.abstractmethod
    def update(self, z, fz, state):
        """Return ``(z_next, state)`` from the iterate ``z`` and ``fz = f(z)``, both (B, D)."""


@dataclasses.dataclass(frozen=True)
class FixedPointIteration(ForwardSolver):
    r"""Plain (Picard) iteration with optional damping.

    .. math:: z_{k+1} = \delta\, z_k + (1 - \delta)\, f(z_k)

    Args:
      damping: :math:`\delta \in [0, 1)`; 0 is plain iteration. Damping helps cells whose
        Jacobian has eigenvalues near -1 (oscillation), at the price of slower convergence.
      rtol, atol, stall_patience, stall_factor: the stopping rule, see :class:`ForwardSolver`.
    """

    damping: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        set_field(self, "damping", check_float(self, "damping", self.damping, minimum=0.0,
                                               maximum=1.0, open_max=True))

    def update(self, z, fz, state):
        if self.damping == 0:
            return fz, state
        return self.damping * z + (1 - self.damping) * fz, state


@dataclasses.dataclass(frozen=True)
class Anderson(ForwardSolver):
    r"""Anderson acceleration (type II), per sample.

    Keeps the last ``history`` pairs :math:`(z_i, f(z_i))`, finds weights :math:`\alpha`
    with :math:`\sum_i \alpha_i = 1` minimising :math:`\|\sum_i \alpha_i (f(z_i) - z_i)\|^2
    + \lambda \|\alpha\|^2`, and moves to

    .. math:: z_{k+1} = \beta \sum_i \alpha_i f(z_i) + (1 - \beta) \sum_i \alpha_i z_i.

    The ridge :math:`\lambda` is relative to the scale of the residual Gram matrix, so the
    small linear system stays solvable when residuals are tiny or collinear; if it still
    yields non-finite weights, that sample falls back to a plain iteration step.

    Args:
      history: number of past iterates kept (``m``), >= 1.
      mixing: :math:`\beta \in (0, 1]`.
      ridge: relative ridge regularisation :math:`\lambda`.
      rtol, atol, stall_patience, stall_factor: the stopping rule, see :class:`ForwardSolver`.
    """

    history: int = 5
    mixing: float = 1.0
    ridge: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        set_field(self, "history", check_int(self, "history", self.history, minimum=1))
        set_field(self, "mixing", check_float(self, "mixing", self.mixing, minimum=0.0,
                                              maximum=1.0, open_min=True))
        set_field(self, "ridge", check_float(self, "ridge", self.ridge, minimum=0.0))

    def init(self, z, fz):
        b, d = z.shape
        m = self.history
        gram_dtype = jnp.promote_types(z.dtype, jnp.float32)
        return AndersonState(
            f_history=jnp.zeros((b, m, d), z.dtype),
            residual_history=jnp.zeros((b, m, d), z.dtype),
            residual_gram=jnp.zeros((b, m, m), gram_dtype),
            num_stored=jnp.zeros((), jnp.int32),
        )

    def update(self, z, fz, state):
        m = self.history
        gram_dtype = state.residual_gram.dtype
        slot = state.num_stored % m
        residual = fz - z
        f_history = state.f_history.at[:, slot].set(fz)
        residual_history = state.residual_history.at[:, slot].set(residual)
        # The weights are coefficients of the method, not functions of the problem to
        # differentiate: under UnrolledAdjoint the iterates are differentiated with the weights
        # held fixed, a linear iteration whose limit is the implicit derivative (through the
        # small least-squares solve, derivatives blow up as the residuals vanish).
        row = jnp.einsum("bd,bjd->bj", jnp.conj(_sg(residual)), _sg(residual_history),
                         preferred_element_type=gram_dtype)  # (B, m): <r_new, r_j>
        # Hermitian: G[slot, j] = <r_slot, r_j>, G[j, slot] its conjugate.
        gram = state.residual_gram.at[:, slot, :].set(row).at[:, :, slot].set(jnp.conj(row))
        num_stored = state.num_stored + 1
        # Slots fill in order and unused ones hold zeros, so their rows and columns of the
        # Gram matrix are zero: no masking needed.
        valid = (jnp.arange(m) < num_stored).astype(gram_dtype)  # (m,)
        scale = jnp.sum(jnp.real(jnp.diagonal(gram, axis1=1, axis2=2)), axis=1) / jnp.sum(valid)
        eye = jnp.eye(m, dtype=gram_dtype)
        # Unused slots get a unit diagonal and no constraint weight, so their alpha is 0.
        # A floor of eps relative to the scale keeps A positive definite with ridge=0 and
        # collinear residuals; tiny, when every stored residual is exactly 0.
        finfo = jnp.finfo(gram_dtype)
        floor = (self.ridge + finfo.eps) * scale + finfo.tiny
        a = gram + eye * floor[:, None, None] + jnp.diag(1 - valid)
        # min alpha^H G alpha s.t. sum(alpha) = 1: alpha = A^{-1} v / (v^T A^{-1} v), with A
        # Hermitian positive definite; unused slots have v = 0, so their alpha is 0.
        v = jnp.broadcast_to(valid, a.shape[:2])
        x = _spd_solve(a, v) if m <= _UNROLLED_SOLVE_MAX else jnp.linalg.solve(
            a, v[..., None])[..., 0]
        # Normalised before the sum, which would overflow when A is tiny (zero residuals).
        x = x / jnp.max(jnp.abs(x), axis=1, keepdims=True)
        total = jnp.sum(x, axis=1, keepdims=True)
        alpha = x / total
        ok = jnp.all(jnp.isfinite(alpha), axis=1) & (jnp.abs(total[:, 0]) > 0)
        alpha = jnp.where(ok[:, None], alpha, 0.0).astype(z.dtype)
        mixed_f = jnp.einsum("bi,bid->bd", alpha, f_history)
        if self.mixing == 1:
            z_next = mixed_f
        else:
            # sum_i alpha_i z_i = sum_i alpha_i (f(z_i) - residual_i)
            mixed_z = mixed_f - jnp.einsum("bi,bid->bd", alpha, residual_history)
            z_next = self.mixing * mixed_f + (1 - self.mixing) * mixed_z
        z_next = jnp.where(ok[:, None], z_next, fz)
        return z_next, AndersonState(f_history, residual_history, gram, num_stored)


@dataclasses.dataclass(frozen=True)
class Broyden(ForwardSolver):
    r"""Limited-memory ("good") Broyden's method on :math:`g(z) = f(z) - z`, per sample.

    Keeps a low-rank approximation :math:`B^{-1} \approx -I + \sum_i u_i v_i^\top` of the
    inverse Jacobian of :math:`g` and steps :math:`z_{k+1} = z_k - B^{-1} g(z_k)`. The first
    step is a plain iteration step. Updates whose denominator is too small to be trusted are
    skipped; when ``memory`` updates are stored the approximation restarts from
    :math:`-I` (a restarted limited-memory Broyden).

    Args:
      memory: number of rank-one updates kept, >= 1.
      rtol, atol, stall_patience, stall_factor: the stopping rule, see :class:`ForwardSolver`.
    """

    memory: int = 20

    def __post_init__(self):
        super().__post_init__()
        set_field(self, "memory", check_int(self, "memory", self.memory, minimum=1))

    def init(self, z, fz):
        b, d = z.shape
        m = self.memory
        return BroydenState(
            us=jnp.zeros((b, m, d), z.dtype),
            vs=jnp.zeros((b, m, d), z.dtype),
            prev_z=z,
            prev_residual=fz - z,
            num_updates=jnp.zeros((b,), jnp.int32),
            has_prev=jnp.zeros((), jnp.bool_),
        )

    @staticmethod
    def _matvec(us, vs, x):  # (-I + U V^H) x
        return -x + jnp.einsum("bid,bi->bd", us, jnp.einsum("bid,bd->bi", jnp.conj(vs), x))

    @staticmethod
    def _rmatvec(us, vs, x):  # (-I + U V^H)^H x
        return -x + jnp.einsum("bid,bi->bd", vs, jnp.einsum("bid,bd->bi", jnp.conj(us), x))

    def update(self, z, fz, state):
        us, vs, count = state.us, state.vs, state.num_updates
        # Memory full: restart from B^{-1} = -I. Overwriting the oldest update instead would
        # break the secant conditions that every later update was built on (seen to stall).
        full = count >= self.memory
        us = jnp.where(full[:, None, None], 0.0, us)
        vs = jnp.where(full[:, None, None], 0.0, vs)
        count = jnp.where(full, 0, count)
        residual = fz - z
        # The inverse-Jacobian estimate is a coefficient of the method: under UnrolledAdjoint
        # the step z - B^{-1} g(z) is differentiated with B^{-1} held fixed (a quasi-Newton
        # iteration on the tangent system, whose limit is the implicit derivative).
        dz = _sg(z - state.prev_z)
        dr = _sg(residual - state.prev_residual)
        vt = self._rmatvec(us, vs, dz)
        denom = _bdot(vt, dr)
        u = (dz - self._matvec(us, vs, dr)) / jnp.where(denom == 0, 1.0, denom)[:, None]
        scale = jnp.sqrt(jnp.real(_bdot(vt, vt)) * jnp.real(_bdot(dr, dr)))
        ok = (
            state.has_prev
            & (jnp.abs(denom) > 1e-6 * scale)
            & jnp.all(jnp.isfinite(u), axis=1)
            & jnp.all(jnp.isfinite(vt), axis=1)
        )
        # Only a real update takes a slot; a sample without one keeps its memory as it is.
        slot = count % self.memory
        rows = jnp.arange(z.shape[0])
        us = us.at[rows, slot].set(jnp.where(ok[:, None], u, us[rows, slot]))
        vs = vs.at[rows, slot].set(jnp.where(ok[:, None], vt, vs[rows, slot]))
        count = count + ok.astype(jnp.int32)
        z_next = z - self._matvec(us, vs, residual)
        bad = ~jnp.all(jnp.isfinite(z_next), axis=1)
        z_next = jnp.where(bad[:, None], fz, z_next)
        return z_next, BroydenState(us, vs, z, residual, count, jnp.ones((), jnp.bool_))


__all__ = ["Anderson", "AndersonState", "Broyden", "BroydenState", "FixedPointIteration",
           "ForwardSolver"]

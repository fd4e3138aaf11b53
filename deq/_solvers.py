"""Forward fixed-point solvers: small frozen objects of hyperparameters.

Every solver works on a flattened state of shape ``(batch, dim)`` (``batch == 1`` for an
unbatched solve), so that per-sample quantities (Anderson mixing weights, Broyden updates,
residual norms) are computed for each sample independently. ``init`` builds the solver's
state from the first evaluation, ``update`` proposes the next iterate from ``z`` and ``f(z)``.
The loop that evaluates ``f``, tracks the best iterate and decides when to stop lives in
``_loop.py`` and is shared by all solvers; no solver mixes samples, so a non-finite sample
cannot leak into the others.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax.numpy as jnp

from deq._validate import check_float, check_int, check_tolerances, set_field


def _bdot(a, b):
    """Per-sample inner product of (B, D) arrays -> (B,)."""
    return jnp.einsum("bd,bd->b", a, b)


@dataclasses.dataclass(frozen=True)
class ForwardSolver(abc.ABC):
    """Base class of the forward solvers; holds the common hyperparameters.

    A sample has converged when ``|f(z) - z| <= atol + rtol * |f(z)|`` (Euclidean norms over
    the sample). A sample that produces inf/NaN is frozen at its best finite iterate. The
    solve stops as soon as every sample has converged or been frozen so, when ``max_steps``
    evaluations of ``f`` are spent, or when the worst running sample's residual (relative to
    its tolerance) has not improved by ``stall_factor`` within ``stall_patience`` steps.
    """

    rtol: float = 1e-4
    atol: float = 1e-6
    stall_patience: int | None = 20
    stall_factor: float = 0.999

    def __post_init__(self):
        rtol, atol = check_tolerances(self, self.rtol, self.atol)
        set_field(self, "rtol", rtol)
        set_field(self, "atol", atol)
        set_field(self, "stall_patience", check_int(
            self, "stall_patience", self.stall_patience, minimum=1, allow_none=True))
        set_field(self, "stall_factor", check_float(
            self, "stall_factor", self.stall_factor, minimum=0.0, maximum=1.0, open_min=True))

    def init(self, z, fz) -> Any:
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
      rtol, atol, stall_patience, stall_factor: see the stopping rule in the module docs.
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
      rtol, atol, stall_patience, stall_factor: see the stopping rule in the module docs.
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
        return (
            jnp.zeros((b, m, d), z.dtype),  # past evaluations f(z_i)
            jnp.zeros((b, m, d), z.dtype),  # past residuals f(z_i) - z_i
            # Their Gram matrix, in at least float32 (tiny residuals squared underflow in
            # bf16). Kept up to date one row per step: m dot products instead of m^2.
            jnp.zeros((b, m, m), gram_dtype),
            jnp.zeros((), jnp.int32),  # number of pairs stored so far
        )

    def update(self, z, fz, state):
        fs, gs, gg, count = state
        m = self.history
        gram_dtype = gg.dtype
        slot = count % m
        g_new = fz - z
        fs = fs.at[:, slot].set(fz)
        gs = gs.at[:, slot].set(g_new)
        row = jnp.einsum("bd,bjd->bj", g_new, gs, preferred_element_type=gram_dtype)  # (B, m)
        gg = gg.at[:, slot, :].set(row).at[:, :, slot].set(row)
        count = count + 1
        # Slots fill in order and unused ones hold zeros, so their rows and columns of gg are
        # zero: no masking needed.
        valid = (jnp.arange(m) < count).astype(gram_dtype)  # (m,)
        scale = jnp.sum(jnp.diagonal(gg, axis1=1, axis2=2), axis=1) / jnp.sum(valid)
        eye = jnp.eye(m, dtype=gram_dtype)
        # Unused slots get a unit diagonal and no constraint weight, so their alpha is 0.
        a = gg + eye * (self.ridge * scale + jnp.finfo(gram_dtype).tiny)[:, None, None]
        a = a + jnp.diag(1 - valid)
        bsz = z.shape[0]
        top = jnp.concatenate([jnp.zeros((bsz, 1, 1), gram_dtype),
                               jnp.broadcast_to(valid, (bsz, 1, m))], axis=2)
        bottom = jnp.concatenate([jnp.broadcast_to(valid[:, None], (bsz, m, 1)), a], axis=2)
        h = jnp.concatenate([top, bottom], axis=1)  # (B, m+1, m+1) bordered system
        rhs = jnp.zeros((bsz, m + 1), gram_dtype).at[:, 0].set(1.0)
        alpha = jnp.linalg.solve(h, rhs[..., None])[..., 0][:, 1:]  # (B, m)
        ok = jnp.all(jnp.isfinite(alpha), axis=1)
        alpha = jnp.where(ok[:, None], alpha, 0.0).astype(z.dtype)
        mixed_f = jnp.einsum("bi,bid->bd", alpha, fs)
        if self.mixing == 1:
            z_next = mixed_f
        else:
            # sum_i alpha_i z_i = sum_i alpha_i (f_i - g_i)
            mixed_x = mixed_f - jnp.einsum("bi,bid->bd", alpha, gs)
            z_next = self.mixing * mixed_f + (1 - self.mixing) * mixed_x
        z_next = jnp.where(ok[:, None], z_next, fz)
        return z_next, (fs, gs, gg, count)


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
      rtol, atol, stall_patience, stall_factor: see the stopping rule in the module docs.
    """

    memory: int = 20

    def __post_init__(self):
        super().__post_init__()
        set_field(self, "memory", check_int(self, "memory", self.memory, minimum=1))

    def init(self, z, fz):
        b, d = z.shape
        m = self.memory
        return (
            jnp.zeros((b, m, d), z.dtype),  # u_i
            jnp.zeros((b, m, d), z.dtype),  # v_i
            z,  # previous iterate
            fz - z,  # previous g
            # Per sample: a sample's memory restarts when its own updates fill it, so its
            # iterates never depend on the other samples of the batch.
            jnp.zeros((b,), jnp.int32),  # number of updates made
            jnp.zeros((), jnp.bool_),  # whether a previous point exists
        )

    @staticmethod
    def _matvec(us, vs, x):  # (-I + U V^T) x
        return -x + jnp.einsum("bid,bi->bd", us, jnp.einsum("bid,bd->bi", vs, x))

    @staticmethod
    def _rmatvec(us, vs, x):  # x^T (-I + U V^T)
        return -x + jnp.einsum("bid,bi->bd", vs, jnp.einsum("bid,bd->bi", us, x))

    def update(self, z, fz, state):
        us, vs, z_prev, g_prev, count, started = state
        # Memory full: restart from B^{-1} = -I. Overwriting the oldest update instead would
        # break the secant conditions that every later update was built on (seen to stall).
        full = count >= self.memory
        us = jnp.where(full[:, None, None], 0.0, us)
        vs = jnp.where(full[:, None, None], 0.0, vs)
        count = jnp.where(full, 0, count)
        g = fz - z
        dx = z - z_prev
        dg = g - g_prev
        vt = self._rmatvec(us, vs, dx)
        denom = _bdot(vt, dg)
        u = (dx - self._matvec(us, vs, dg)) / jnp.where(denom == 0, 1.0, denom)[:, None]
        scale = jnp.sqrt(_bdot(vt, vt) * _bdot(dg, dg))
        ok = (
            started
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
        z_next = z - self._matvec(us, vs, g)
        bad = ~jnp.all(jnp.isfinite(z_next), axis=1)
        z_next = jnp.where(bad[:, None], fz, z_next)
        return z_next, (us, vs, z, g, count, jnp.ones((), jnp.bool_))


__all__ = ["Anderson", "Broyden", "FixedPointIteration", "ForwardSolver"]

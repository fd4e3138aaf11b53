"""The shared solver loop: flattening of pytree states, stopping rule, best-iterate tracking.

Two drivers share the solvers' ``update`` rule:

* :func:`solve` runs a ``lax.while_loop`` that stops early; it is not reverse-differentiable
  and is used under the implicit, phantom and Jacobian-free adjoints (and for the adjoint
  linear system itself);
* :func:`unroll` runs a fixed number of steps with ``lax.scan``; it is differentiable and is
  the unrolled-backprop baseline.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deq._solution import RESULTS, SolverStats
from deq._solvers import ForwardSolver


class Flattener:
    """Maps a pytree state to a ``(batch, dim)`` matrix and back.

    With ``batched=True`` every leaf must share its leading axis, which becomes ``batch``;
    otherwise ``batch == 1``.
    """

    def __init__(self, tree, batched: bool, what: str = "z0"):
        leaves, self.treedef = jax.tree_util.tree_flatten(tree)
        if not leaves:
            raise ValueError(f"{what} has no array leaves; there is nothing to solve for.")
        for leaf in leaves:
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                raise TypeError(
                    f"every leaf of {what} must be a floating-point array; got dtype "
                    f"{jnp.result_type(leaf)} with shape {jnp.shape(leaf)}."
                )
        self.shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
        self.dtypes = [jnp.result_type(leaf) for leaf in leaves]
        if batched:
            if any(len(s) == 0 for s in self.shapes):
                raise ValueError(
                    f"batched=True needs a leading batch axis on every leaf of {what}; "
                    f"got shapes {self.shapes}."
                )
            sizes = {s[0] for s in self.shapes}
            if len(sizes) != 1:
                raise ValueError(
                    f"batched=True needs the same leading (batch) size on every leaf of "
                    f"{what}; got shapes {self.shapes}."
                )
            self.batch = self.shapes[0][0]
            self.sizes = [math.prod(s[1:]) for s in self.shapes]
        else:
            self.batch = 1
            self.sizes = [math.prod(s) for s in self.shapes]
        self.dtype = jnp.result_type(*self.dtypes)
        self.dim = sum(self.sizes)

    def flatten(self, tree):
        leaves = jax.tree_util.tree_leaves(tree)
        # Explicit sizes: a -1 cannot be inferred for an empty batch.
        mats = [jnp.reshape(leaf, (self.batch, size)).astype(self.dtype)
                for leaf, size in zip(leaves, self.sizes)]
        return mats[0] if len(mats) == 1 else jnp.concatenate(mats, axis=1)

    def unflatten(self, mat):
        if len(self.sizes) == 1:
            parts = [mat]
        else:
            parts = jnp.split(mat, np.cumsum(self.sizes)[:-1].tolist(), axis=1)
        leaves = [
            jnp.reshape(p, s).astype(dt) for p, s, dt in zip(parts, self.shapes, self.dtypes)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _norms(z, fz):
    """Per-sample |f(z) - z| and |f(z)|, in at least float32."""
    dt = jnp.promote_types(z.dtype, jnp.float32)
    r = (fz - z).astype(dt)
    f = fz.astype(dt)
    return jnp.sqrt(jnp.sum(r * r, axis=1)), jnp.sqrt(jnp.sum(f * f, axis=1))


def _worst(x, axis=None):
    """Max of non-negative residuals; 0 for an empty batch (the same max otherwise)."""
    return jnp.max(x, axis=axis, initial=0.0)


class _State(NamedTuple):
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
    stall_ref: Any  # worst best_abs/best_tol when progress was last counted
    stall_count: Any
    result: Any
    result_per_sample: Any  # (B,)
    done: Any


def _trace_entry(values, live):
    """Worst value over the samples still alive; inf when none is (all turned non-finite)."""
    return jnp.where(jnp.any(live), _worst(jnp.where(live, values, 0.0)), jnp.inf)


def _observe(solver: ForwardSolver, s: _State, max_steps: int):
    """Record the residual of (s.z, s.fz), update best iterate and the stopping decision."""
    res, nf = _norms(s.z, s.fz)
    rel = res / jnp.maximum(nf, jnp.finfo(nf.dtype).tiny)
    tol = solver.atol + solver.rtol * nf
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
    i = s.step - 1
    abs_trace = s.abs_trace.at[i].set(_trace_entry(res, ~failed))
    rel_trace = s.rel_trace.at[i].set(_trace_entry(rel, ~failed))

    settled = sample_done | failed
    all_settled = jnp.all(settled)
    progress = _worst(jnp.where(settled, 0.0, best_abs / best_tol))
    improved = progress < solver.stall_factor * s.stall_ref
    stall_ref = jnp.where(improved, progress, s.stall_ref)
    stall_count = jnp.where(improved, 0, s.stall_count + 1)
    stagnated = (
        jnp.asarray(False)
        if solver.stall_patience is None
        else stall_count >= solver.stall_patience
    )
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
        abs_trace=abs_trace, rel_trace=rel_trace, stall_ref=stall_ref,
        stall_count=stall_count, result=result, result_per_sample=result_per_sample,
        done=done,
    )


def solve(g, solver: ForwardSolver, z0, max_steps: int):
    """Solve ``z = g(z)`` for a ``(B, D)`` matrix ``z`` with early stopping.

    Samples are independent: one that converges, or turns non-finite, is frozen at its best
    iterate while the others go on. Returns ``(z_best, SolverStats)``.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
    rdt = jnp.promote_types(z0.dtype, jnp.float32)
    bsz = z0.shape[0]
    fz0 = g(z0)
    nan_trace = jnp.full((max_steps,), jnp.nan, rdt)
    s = _State(
        step=jnp.ones((), jnp.int32), z=z0, fz=fz0, solver_state=solver.init(z0, fz0),
        best_z=z0, best_abs=jnp.full((bsz,), jnp.inf, rdt),
        best_rel=jnp.full((bsz,), jnp.inf, rdt), best_tol=jnp.zeros((bsz,), rdt),
        failed=jnp.zeros((bsz,), jnp.bool_),
        abs_trace=nan_trace, rel_trace=nan_trace, stall_ref=jnp.asarray(jnp.inf, rdt),
        stall_count=jnp.zeros((), jnp.int32), result=jnp.zeros((), jnp.int32),
        result_per_sample=jnp.zeros((bsz,), jnp.int32), done=jnp.zeros((), jnp.bool_),
    )
    s = _observe(solver, s, max_steps)

    def body(s):
        frozen = (s.best_abs <= s.best_tol) | s.failed
        z_next, solver_state = solver.update(s.z, s.fz, s.solver_state)
        # Settled samples stay where they are: the batch runs on for the slowest sample
        # only, and a finished sample must not drift away from its fixed point meanwhile.
        z_next = jnp.where(frozen[:, None], s.best_z, z_next)
        fz_next = g(z_next)
        s = s._replace(step=s.step + 1, z=z_next, fz=fz_next, solver_state=solver_state)
        return _observe(solver, s, max_steps)

    s = jax.lax.while_loop(lambda s: ~s.done, body, s)
    stats = _stats(s.step, s.best_abs, s.best_rel, s.abs_trace, s.rel_trace, s.result,
                   s.result_per_sample)
    return s.best_z, stats


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


def unroll(g, solver: ForwardSolver, z0, num_steps: int, checkpoint: bool = False):
    """Differentiable fixed-length run: ``num_steps`` evaluations of ``g``, no early stop.

    Returns ``(z, SolverStats)`` where ``z`` is the solver's next iterate after the last
    evaluation (for plain iteration, exactly ``g`` applied ``num_steps`` times to ``z0``) and
    the stats describe the last evaluated iterate. A sample that turns non-finite is frozen
    at its best finite iterate (smallest residual among those whose ``g`` was finite), which
    is then its returned value, differentiable like the others; its result is NONFINITE.
    """
    if num_steps < 1:
        raise ValueError(f"unrolled steps must be >= 1, got {num_steps}.")
    fz0 = g(z0)
    state0 = solver.init(z0, fz0)
    sg = jax.lax.stop_gradient

    def rows_finite(x):
        return jnp.all(jnp.isfinite(x), axis=1)

    def observe(z, fz, best_z, best_res, best_rel, dead):
        res, nf = _norms(sg(z), sg(fz))
        rel = res / jnp.maximum(nf, jnp.finfo(nf.dtype).tiny)
        dead = dead | ~(jnp.isfinite(res) & rows_finite(fz))
        better = ~dead & (res < best_res)
        best_z = jnp.where(better[:, None], z, best_z)
        best_res = jnp.where(better, res, best_res)
        best_rel = jnp.where(better, rel, best_rel)
        # A dead sample looks like a fixed point at best_z to the solver: its history stays
        # finite, and no inf/NaN reaches the backward pass through the solver's update.
        fz = jnp.where(dead[:, None], best_z, fz)
        return fz, best_z, best_res, best_rel, dead, (res, nf, dead)

    rdt = jnp.promote_types(z0.dtype, jnp.float32)
    inf = jnp.full((z0.shape[0],), jnp.inf, rdt)
    fz0, *best0, ys0 = observe(z0, fz0, z0, inf, inf, jnp.zeros((z0.shape[0],), jnp.bool_))

    def body(carry, _):
        z, fz, st, best_z, best_res, best_rel, dead = carry
        z_next, st = solver.update(z, fz, st)
        dead = dead | ~rows_finite(sg(z_next))
        # Never evaluate g at a non-finite point: its VJP there would be NaN even with a
        # zero cotangent, and would poison the gradient of the shared parameters.
        z_next = jnp.where(dead[:, None], best_z, z_next)
        fz_next = g(z_next)
        fz_next, best_z, best_res, best_rel, dead, ys = observe(
            z_next, fz_next, best_z, best_res, best_rel, dead)
        return (z_next, fz_next, st, best_z, best_res, best_rel, dead), ys

    if checkpoint:
        body = jax.checkpoint(body)
    carry, ys = jax.lax.scan(body, (z0, fz0, state0, *best0), None, length=num_steps - 1)
    z, fz, st, best_z, best_res, best_rel, dead = carry
    # (steps, B): the first evaluation, then the scanned ones.
    res, nf, dead_at = (jnp.concatenate([a[None], b], axis=0) for a, b in zip(ys0, ys))
    rel = res / jnp.maximum(nf, jnp.finfo(nf.dtype).tiny)
    z_out, _ = solver.update(z, fz, st)
    dead = dead | ~rows_finite(sg(z_out))
    z_out = jnp.where(dead[:, None], best_z, z_out)
    tol = solver.atol + solver.rtol * nf[-1]
    conv = ~dead & (res[-1] <= tol)
    result_per_sample = jnp.where(
        conv, RESULTS.SUCCESSFUL, jnp.where(dead, RESULTS.NONFINITE, RESULTS.MAX_STEPS)
    ).astype(jnp.int32)
    result = jnp.where(
        jnp.any(dead), RESULTS.NONFINITE,
        jnp.where(jnp.all(conv), RESULTS.SUCCESSFUL, RESULTS.MAX_STEPS),
    ).astype(jnp.int32)
    trace = jax.vmap(_trace_entry)
    stats = _stats(
        jnp.asarray(num_steps, jnp.int32),
        jnp.where(dead, best_res, res[-1]), jnp.where(dead, best_rel, rel[-1]),
        trace(res, ~dead_at), trace(rel, ~dead_at), result, result_per_sample,
    )
    return z_out, stats


def gmres(matvec, b, x0, *, restart: int, max_steps: int, rtol: float, atol: float):
    """Restarted GMRES for ``A x = b`` on a flat vector, counting matrix-vector products.

    Each cycle grows a Krylov basis (classical Gram-Schmidt, applied twice for stability) by
    one vector per product, up to ``restart`` vectors, and leaves the cycle as soon as the
    small least-squares problem says the residual is within tolerance (or the basis broke
    down, or the product budget is spent); the true residual ``b - A x`` is then computed
    and a new cycle starts from it if needed. Returns
    ``(x, num_matvecs, residual_norm, converged, finite)``: ``x`` is the best iterate seen and
    its residual norm; ``finite`` is False if a non-finite value stopped the solve.
    """
    n = b.shape[0]
    dt = b.dtype
    bnorm = jnp.linalg.norm(b)
    tol = atol + rtol * bnorm
    k = restart

    def cycle(x, r, beta, budget):
        """Up to min(k, budget) Arnoldi steps from residual r; returns (x_new, products)."""
        v = jnp.zeros((k + 1, n), dt).at[0].set(r / jnp.where(beta > 0, beta, 1.0))
        h = jnp.zeros((k + 1, k), dt)
        e1 = jnp.zeros((k + 1,), dt).at[0].set(beta)
        limit = jnp.minimum(k, budget)

        def arnoldi(c):
            j, v, h, _, _, _ = c
            w = matvec(v[j])
            mask = (jnp.arange(k + 1) <= j).astype(dt)
            c1 = (v @ w) * mask
            w = w - c1 @ v
            c2 = (v @ w) * mask
            w = w - c2 @ v
            hn = jnp.linalg.norm(w)
            h = h.at[:, j].set((c1 + c2).at[j + 1].set(hn))
            v = v.at[j + 1].set(w / jnp.where(hn > 0, hn, 1.0))
            # The (k+1) x k least-squares problem with the unused columns zero: tiny next to
            # a product with A, and it gives the residual of the best x in this basis.
            y = jnp.linalg.lstsq(h, e1)[0]
            est = jnp.linalg.norm(e1 - h @ y)
            # w lies (to rounding) in the basis: the Krylov space is invariant.
            eps = jnp.finfo(dt).eps
            breakdown = hn <= 10 * eps * jnp.sqrt(jnp.sum((c1 + c2) ** 2) + hn**2)
            return j + 1, v, h, y, est, breakdown

        def more(c):
            j, _, _, _, est, breakdown = c
            return (j < limit) & (est > tol) & ~breakdown & jnp.isfinite(est)

        # The outer loop only starts a cycle with beta > tol and budget >= 1, so at least one
        # Arnoldi step runs and y is that of the last basis.
        init = (jnp.zeros((), jnp.int32), v, h, jnp.zeros((k,), dt), beta,
                jnp.zeros((), jnp.bool_))
        j, v, h, y, est, _ = jax.lax.while_loop(more, arnoldi, init)
        finite = jnp.isfinite(est) & jnp.all(jnp.isfinite(y))
        y = jnp.where(finite, y, 0.0)
        return x + y @ v[:k], j, finite

    def cond(c):
        x, r, beta, steps, best_x, best_beta, finite = c
        # A cycle needs one Arnoldi product and one for its true residual.
        return (beta > tol) & (steps + 2 <= max_steps) & finite

    def body(c):
        x, r, beta, steps, best_x, best_beta, _ = c
        x, used, finite = cycle(x, r, beta, max_steps - steps - 1)
        r = b - matvec(x)
        beta = jnp.linalg.norm(r)
        finite = finite & jnp.isfinite(beta)
        better = beta < best_beta
        best_x = jnp.where(better, x, best_x)
        best_beta = jnp.where(better, beta, best_beta)
        return x, r, beta, steps + used + 1, best_x, best_beta, finite

    r0 = b - matvec(x0)
    beta0 = jnp.linalg.norm(r0)
    init = (x0, r0, beta0, jnp.ones((), jnp.int32), x0, beta0, jnp.isfinite(beta0))
    _, _, _, steps, x, beta, finite = jax.lax.while_loop(cond, body, init)
    return x, steps, beta, (beta <= tol) & finite, finite

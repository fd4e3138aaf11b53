"""Linear solvers for the adjoint system of :class:`deq.ImplicitAdjoint`.

The implicit gradient needs ``u`` with ``u = g + J^T u`` (``J`` the Jacobian of ``f`` at the
fixed point, ``g`` the cotangent of ``z*``), i.e. ``(I - J^T) u = g``, matrix-free: only
vector-Jacobian products ``v -> J^T v`` are available. Every solver here is an
:class:`AdjointLinearSolver` with one method, ``solve(vjp, rhs, max_steps)``, on
``(batch, dim)`` matrices:

* :class:`GMRES` (public), a Krylov method on the whole batch as one system;
* :class:`IterativeAdjointSolver`, which runs a forward solver (fixed-point iteration,
  Anderson, Broyden) on the map ``u -> g + J^T u`` with the early-stopping loop.

:func:`adjoint_linear_solver` turns what a user passes as ``ImplicitAdjoint(solver=...)``
into one of them.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deq import _loop
from deq._solution import RESULTS
from deq._solvers import ForwardSolver
from deq._validate import check_int, check_tolerances, set_field


class LinearSolveStats(NamedTuple):
    """What an adjoint solve reports, written to the probe by :class:`deq.ImplicitAdjoint`."""

    num_steps: Any  # int32: iterations, or matrix-vector products for GMRES
    abs_residual: Any  # |g - (I - J^T) u| over the whole batch
    u_norm: Any  # |u| over the whole batch
    converged: Any  # bool
    result: Any  # int32 RESULTS code


class AdjointLinearSolver(abc.ABC):
    """Solves ``(I - J^T) u = rhs`` from vector-Jacobian products."""

    @abc.abstractmethod
    def solve(self, vjp, rhs, max_steps: int) -> tuple[Any, LinearSolveStats]:
        """``(u, stats)`` for ``rhs`` of shape ``(B, D)``; ``vjp(v) = J^T v`` on such matrices.

        ``max_steps`` (>= 1) is the budget of iterations (GMRES: of products with ``vjp``).
        """


class GMRESResult(NamedTuple):
    """What :func:`gmres` returns."""

    x: Any  # the best iterate seen
    num_matvecs: Any  # int32: products with A used
    residual_norm: Any  # |b - A x|
    converged: Any  # residual_norm <= atol + rtol |b|, all finite
    finite: Any  # False if a non-finite value stopped the solve


@dataclasses.dataclass(frozen=True)
class GMRES(AdjointLinearSolver):
    """Restarted GMRES for the adjoint linear system :math:`(I - J^\\top) u = g`.

    A Krylov method: it needs no contraction, only a nonsingular :math:`I - J`, so it still
    converges where plain adjoint iteration diverges (spectral radius of :math:`J` >= 1).
    It treats the whole batch as one linear system.

    Args:
      restart: Krylov basis size per cycle.
      rtol, atol: stop when ``|g - (I - J^T) u| <= atol + rtol |g|``.
    """

    restart: int = 20
    rtol: float = 1e-5
    atol: float = 1e-8

    def __post_init__(self):
        set_field(self, "restart", check_int(self, "restart", self.restart, minimum=1))
        rtol, atol = check_tolerances(self, self.rtol, self.atol)
        set_field(self, "rtol", rtol)
        set_field(self, "atol", atol)

    def solve(self, vjp, rhs, max_steps):
        shape = rhs.shape
        # In at least float32: the small least-squares solves have no bf16 kernels, and
        # Krylov bases lose orthogonality fast in low precision.
        work_dtype = jnp.promote_types(rhs.dtype, jnp.float32)
        b = rhs.astype(work_dtype).reshape(-1)

        def matvec(v):  # (I - J^T) v on a flat vector
            vm = v.reshape(shape).astype(rhs.dtype)
            return (vm - vjp(vm)).astype(work_dtype).reshape(-1)

        out = gmres(matvec, b, b, restart=self.restart, max_steps=max_steps,
                    rtol=self.rtol, atol=self.atol)
        result = jnp.where(out.converged, RESULTS.SUCCESSFUL,
                           jnp.where(out.finite, RESULTS.MAX_STEPS, RESULTS.NONFINITE))
        stats = LinearSolveStats(num_steps=out.num_matvecs, abs_residual=out.residual_norm,
                                 u_norm=jnp.linalg.norm(out.x), converged=out.converged,
                                 result=result)
        return out.x.reshape(shape).astype(rhs.dtype), stats


@dataclasses.dataclass(frozen=True)
class IterativeAdjointSolver(AdjointLinearSolver):
    """A forward solver used on the adjoint fixed-point problem ``u = rhs + J^T u``.

    Converges when the spectral radius of ``J`` is below 1 (the forward map contracts); its
    stopping rule is the forward solver's, per sample.
    """

    solver: ForwardSolver

    def solve(self, vjp, rhs, max_steps):
        work_dtype = _loop.residual_dtype(rhs)

        def adjoint_map(u):
            return rhs + vjp(u)

        u, st = _loop.solve(adjoint_map, self.solver, rhs, max_steps)
        # Whole-batch residual, as for GMRES: the parameter gradient sums every sample's
        # VJP, and per-sample ratios are dominated by samples whose cotangent is ~0 (a
        # confidently classified example), which meet the absolute tolerance at once.
        stats = LinearSolveStats(
            num_steps=st.num_steps,
            abs_residual=jnp.linalg.norm(st.abs_residual_per_sample.astype(work_dtype)),
            u_norm=jnp.linalg.norm(jnp.abs(u).astype(work_dtype)), converged=st.converged,
            result=st.result)
        return u, stats


def adjoint_linear_solver(owner, solver) -> AdjointLinearSolver:
    """The adjoint solver for ``ImplicitAdjoint(solver=...)``: GMRES as it is, a forward
    solver wrapped in :class:`IterativeAdjointSolver`; anything else is a ``TypeError``."""
    if isinstance(solver, AdjointLinearSolver):
        return solver
    if isinstance(solver, ForwardSolver):
        return IterativeAdjointSolver(solver)
    raise TypeError(
        f"{owner}: solver must be FixedPointIteration, Anderson, Broyden or GMRES, got "
        f"{type(solver).__name__}."
    )


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
        """Up to min(k, budget) Arnoldi steps from the residual r (norm beta); returns
        (x_new, products, finite)."""
        # v: the orthonormal Krylov basis (rows); h: the Hessenberg matrix of A in it.
        v = jnp.zeros((k + 1, n), dt).at[0].set(r / jnp.where(beta > 0, beta, 1.0))
        h = jnp.zeros((k + 1, k), dt)
        e1 = jnp.zeros((k + 1,), dt).at[0].set(beta)
        limit = jnp.minimum(k, budget)

        def arnoldi(c):
            j, v, h, _, _, _ = c
            w = matvec(v[j])
            mask = (jnp.arange(k + 1) <= j).astype(dt)
            c1 = (jnp.conj(v) @ w) * mask  # <v_i, w>, conjugated for complex systems
            w = w - c1 @ v
            c2 = (jnp.conj(v) @ w) * mask
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
            breakdown = hn <= 10 * eps * jnp.sqrt(jnp.sum(jnp.abs(c1 + c2) ** 2) + hn**2)
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
    return GMRESResult(x, steps, beta, (beta <= tol) & finite, finite)

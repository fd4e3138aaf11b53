"""Backward modes ("adjoints"): how the gradient of a fixed point is computed.

Each adjoint is a small frozen object of hyperparameters with one method, ``solve``, called
by :func:`deq.fixed_point` with the (closure-converted) function, the forward solver and the
problem. It returns ``(z, SolverStats)`` and decides how JAX differentiates ``z``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from deq import _loop
from deq._solution import RESULTS, backward_stats_vector
from deq._solvers import Anderson, ForwardSolver
from deq._validate import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_tolerances,
    set_field,
)


@dataclasses.dataclass(frozen=True)
class GMRES:
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


class Adjoint(abc.ABC):
    """Base class of the backward modes."""

    @abc.abstractmethod
    def solve(self, fn, solver, z0, args, probe, *, max_steps, batched, precision):
        """Return ``(z, SolverStats)``, differentiable in ``args`` as this mode defines."""


def _precision(precision):
    if precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


def forward_solve(fn, solver: ForwardSolver, z0, args, max_steps: int, batched: bool):
    """Solve z = fn(z, args) on pytrees with the early-stopping loop (not differentiable)."""
    flat = _loop.Flattener(z0, batched)

    def g(zf):
        return flat.flatten(fn(flat.unflatten(zf), args))

    zf, stats = _loop.solve(g, solver, flat.flatten(z0), max_steps)
    return flat.unflatten(zf), stats


def _is_diff(x):
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _split(args):
    leaves, treedef = jax.tree_util.tree_flatten(args)
    diff = [x if _is_diff(x) else None for x in leaves]
    nondiff = [None if _is_diff(x) else x for x in leaves]
    return diff, nondiff, treedef


def _merge(diff, nondiff, treedef):
    return jax.tree_util.tree_unflatten(
        treedef, [d if d is not None else n for d, n in zip(diff, nondiff)]
    )


@dataclasses.dataclass(frozen=True)
class ImplicitAdjoint(Adjoint):
    r"""Exact implicit-function-theorem gradient, in constant memory.

    At the fixed point :math:`z^* = f(z^*, \theta)` the vector-Jacobian product of a
    cotangent :math:`g` is :math:`u^\top \partial_\theta f(z^*, \theta)` where :math:`u`
    solves the adjoint system

    .. math:: u = g + \left(\partial_z f(z^*, \theta)\right)^\top u .

    ``u`` is found matrix-free (only VJPs of ``f`` at :math:`z^*`, never the Jacobian): by
    fixed-point iteration, Anderson, Broyden (any forward solver object), or :class:`GMRES`.
    The forward iterations are not stored; memory does not grow with the number of steps.

    A backward solve that does not converge is never silent: its statistics are written to
    the cotangent of the ``probe`` of :func:`deq.fixed_point` (see
    :func:`deq.backward_stats_probe`), and with ``on_failure="warn"`` (default) a
    ``RuntimeWarning`` is issued from the backward pass. The best iterate found is used.

    Args:
      solver: solver for the adjoint system; a forward solver or :class:`GMRES`.
      max_steps: iteration (or matrix-vector product) budget of the adjoint solve.
      on_failure: ``"warn"`` or ``"ignore"``.
    """

    solver: ForwardSolver | GMRES = dataclasses.field(default_factory=Anderson)
    max_steps: int = 50
    on_failure: str = "warn"

    def __post_init__(self):
        check_choice(self, "on_failure", self.on_failure, ("warn", "ignore"))
        set_field(self, "max_steps", check_int(self, "max_steps", self.max_steps, minimum=1))
        if not isinstance(self.solver, (ForwardSolver, GMRES)):
            raise TypeError(
                "ImplicitAdjoint: solver must be FixedPointIteration, Anderson, Broyden or "
                f"GMRES, got {type(self.solver).__name__}."
            )

    def solve(self, fn, solver, z0, args, probe, *, max_steps, batched, precision):
        diff, nondiff, treedef = _split(args)
        static = (self, solver, max_steps, batched, precision, treedef)
        return _implicit(fn, static, z0, diff, nondiff, probe)

    def adjoint_solve(self, vjp_z, gz, batched):
        """Solve ``u = gz + vjp_z(u)``; returns ``(u, stats_vector)``."""
        flat = _loop.Flattener(gz, batched, what="the cotangent of z")
        gf = flat.flatten(gz)
        rdt = jnp.promote_types(gf.dtype, jnp.float32)
        if isinstance(self.solver, GMRES):
            shape = gf.shape
            # In at least float32: the small least-squares solves have no bf16 kernels, and
            # Krylov bases lose orthogonality fast in low precision.
            gk = gf.astype(rdt)

            def matvec(v):
                vm = v.reshape(shape).astype(gf.dtype)
                out = vm - flat.flatten(vjp_z(flat.unflatten(vm)))
                return out.astype(rdt).reshape(-1)

            u, steps, abs_res, conv, finite = _loop.gmres(
                matvec, gk.reshape(-1), gk.reshape(-1), restart=self.solver.restart,
                max_steps=self.max_steps, rtol=self.solver.rtol, atol=self.solver.atol,
            )
            unorm = jnp.linalg.norm(u)
            result = jnp.where(conv, RESULTS.SUCCESSFUL,
                               jnp.where(finite, RESULTS.MAX_STEPS, RESULTS.NONFINITE))
            uf = u.reshape(shape).astype(gf.dtype)
        else:
            def h(uf):
                return gf + flat.flatten(vjp_z(flat.unflatten(uf)))

            uf, st = _loop.solve(h, self.solver, gf, self.max_steps)
            steps, conv, result = st.num_steps, st.converged, st.result
            # Whole-batch residual, as for GMRES: the parameter gradient sums every sample's
            # VJP, and per-sample ratios are dominated by samples whose cotangent is ~0 (a
            # confidently classified example), which meet the absolute tolerance at once.
            abs_res = jnp.linalg.norm(st.abs_residual_per_sample.astype(rdt))
            unorm = jnp.linalg.norm(uf.astype(rdt))
        vec = backward_stats_vector(steps, abs_res, unorm, result, rdt)
        if self.on_failure == "warn":
            # Only a failed solve reaches the host: no callback on the common path.
            jax.lax.cond(jnp.all(conv), lambda: None,
                         lambda: jax.debug.callback(_warn_backward, conv))
        return flat.unflatten(uf), vec


def _warn_backward(converged):
    if not np.all(converged):
        # A constant message: Python's default warning filter then shows it once per call
        # site instead of on every training step. The numbers are in deq.backward_stats.
        warnings.warn(
            "deq: the implicit backward (adjoint) solve did not converge within its step "
            "budget; the gradient is approximate. Read the residuals with "
            "deq.backward_stats (probe=...), raise ImplicitAdjoint(max_steps=...), use "
            "ImplicitAdjoint(solver=deq.GMRES()), or make the cell more contractive (Jacobian "
            "regularisation, weight normalisation). ImplicitAdjoint(on_failure='ignore') "
            "silences this warning.",
            RuntimeWarning,
            stacklevel=2,
        )


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _implicit(fn, static, z0, diff, nondiff, probe):
    adjoint, solver, max_steps, batched, precision, treedef = static
    args = _merge(diff, nondiff, treedef)
    with _precision(precision):
        return forward_solve(fn, solver, z0, args, max_steps, batched)


def _implicit_fwd(fn, static, z0, diff, nondiff, probe):
    z, stats = _implicit(fn, static, z0, diff, nondiff, probe)
    return (z, stats), (z, diff, nondiff, probe)


def _implicit_bwd(fn, static, res, cts):
    adjoint, solver, max_steps, batched, precision, treedef = static
    z, diff, nondiff, probe = res
    gz, _ = cts
    gz = jax.tree_util.tree_map(
        lambda g, zz: jnp.zeros_like(zz) if g is None else g, gz, z,
        is_leaf=lambda x: x is None,
    )
    with _precision(precision):
        _, vjp_z = jax.vjp(lambda zz: fn(zz, _merge(diff, nondiff, treedef)), z)
        u, vec = adjoint.adjoint_solve(lambda v: vjp_z(v)[0], gz, batched)
        _, vjp_args = jax.vjp(lambda d: fn(z, _merge(d, nondiff, treedef)), diff)
        (gdiff,) = vjp_args(u)
    gz0 = jax.tree_util.tree_map(jnp.zeros_like, z)
    gnondiff = jax.tree_util.tree_map(
        lambda x: np.zeros(np.shape(x), dtype=jax.dtypes.float0), nondiff
    )
    return gz0, gdiff, gnondiff, vec.astype(probe.dtype).reshape(probe.shape)


_implicit.defvjp(_implicit_fwd, _implicit_bwd)


@dataclasses.dataclass(frozen=True)
class PhantomAdjoint(Adjoint):
    r"""Phantom gradient: backprop through ``steps`` damped iterations started at ``z*``.

    The forward solve runs without gradient; then

    .. math:: z_{i+1} = \delta z_i + (1 - \delta) f(z_i, \theta), \quad z_0 = \mathrm{sg}(z^*)

    is unrolled ``steps`` times and differentiated. As ``steps`` grows (and with
    :math:`\delta \to 0` for a contractive ``f``) this approaches the exact implicit gradient;
    with few steps it is a cheaper, often better-conditioned, descent direction
    (Geng et al., 2021). The returned value is :math:`z_{steps}`, which equals ``z*`` up to
    the solver's tolerance.

    Args:
      steps: number of unrolled steps, >= 1.
      damping: :math:`\delta \in [0, 1)`.
    """

    steps: int = 5
    damping: float = 0.5

    def __post_init__(self):
        set_field(self, "steps", check_int(self, "steps", self.steps, minimum=1))
        set_field(self, "damping", check_float(self, "damping", self.damping, minimum=0.0,
                                               maximum=1.0, open_max=True))

    def solve(self, fn, solver, z0, args, probe, *, max_steps, batched, precision):
        with _precision(precision):
            z, stats = forward_solve(
                fn, solver, jax.lax.stop_gradient(z0), jax.lax.stop_gradient(args),
                max_steps, batched,
            )
            z = jax.lax.stop_gradient(z)
            for _ in range(self.steps):
                fz = fn(z, args)
                if self.damping == 0:
                    z = fz
                else:
                    z = jax.tree_util.tree_map(
                        lambda a, b: self.damping * a + (1 - self.damping) * b, z, fz
                    )
        return z, stats


@dataclasses.dataclass(frozen=True)
class JacobianFreeAdjoint(PhantomAdjoint):
    r"""Jacobian-free backprop (JFB, Fung et al., 2022): one step :math:`f(\mathrm{sg}(z^*))`.

    Replaces :math:`(I - J)^{-1}` by the identity: the gradient is that of one application
    of ``f`` at the fixed point. Cheapest backward; a descent direction when ``f`` is
    contractive enough.
    """

    steps: int = 1
    damping: float = 0.0


@dataclasses.dataclass(frozen=True)
class UnrolledAdjoint(Adjoint):
    """Backprop through the solver's iterations: the baseline DEQs are compared against.

    Runs exactly ``max_steps`` evaluations of ``f`` (no early stopping, so the step budget is
    fixed and known) inside ``lax.scan`` and differentiates through all of them. Memory grows
    linearly with the number of steps; ``checkpoint=True`` recomputes each step in the
    backward pass instead of storing its intermediates.

    A sample whose iterate or ``f`` turns non-finite is frozen at its best finite iterate,
    which is its returned value (differentiable like any other), and the stats say NONFINITE
    for it; ``f`` is never evaluated at a non-finite point afterwards. The gradient can still
    be NaN if ``f``'s derivative overflows at the step where its value does (e.g. ``exp``).

    Args:
      checkpoint: rematerialise each step (``jax.checkpoint``).
    """

    checkpoint: bool = False

    def __post_init__(self):
        set_field(self, "checkpoint", check_bool(self, "checkpoint", self.checkpoint))

    def solve(self, fn, solver, z0, args, probe, *, max_steps, batched, precision):
        flat = _loop.Flattener(z0, batched)

        def g(zf):
            return flat.flatten(fn(flat.unflatten(zf), args))

        with _precision(precision):
            zf, stats = _loop.unroll(g, solver, flat.flatten(z0), max_steps, self.checkpoint)
        return flat.unflatten(zf), stats


"""Backward modes ("adjoints"): how the gradient of a fixed point is computed.

Each adjoint is a small frozen object of hyperparameters with one method, ``solve``, called
by :func:`deq.fixed_point` with the (closure-converted) function, the forward solver and the
problem. It returns ``(z, SolverStats)`` and decides how JAX differentiates ``z``. The
implicit adjoint's linear system is solved by the objects of ``_linear_solve.py``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import warnings
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from deq import _loop
from deq._flatten import Flattener
from deq._host import report_unless
from deq._linear_solve import GMRES, adjoint_linear_solver
from deq._solution import RESULTS, backward_stats_cotangent
from deq._solvers import Anderson, ForwardSolver
from deq._validate import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_max_steps,
    set_field,
)


class Adjoint(abc.ABC):
    """Base class of the backward modes."""

    @abc.abstractmethod
    def solve(self, fn, solver, z0, args, stats_probe, *, max_steps, batched, precision):
        """Return ``(z, SolverStats)``, differentiable in ``args`` as this mode defines.

        ``stats_probe`` is the ``probe=`` of :func:`deq.fixed_point`: the array whose
        cotangent receives the statistics of a backward solve (a zero vector if none).
        """


def _precision(precision):
    if precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


def forward_solve(fn, solver: ForwardSolver, z0, args, max_steps: int, batched: bool):
    """Solve z = fn(z, args) on pytrees with the early-stopping loop (not differentiable)."""
    flat = Flattener(z0, batched)
    f = flat.on_matrices(lambda z: fn(z, args))
    zf, stats = _loop.solve(f, solver, flat.flatten(z0), max_steps)
    return flat.unflatten(zf), stats


def _is_diff(x):
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _split(args):
    """The differentiable (floating-point) leaves of ``args`` apart from the others."""
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
    r"""Exact implicit-function-theorem derivatives, in every mode, in constant memory.

    At the fixed point :math:`z^* = f(z^*, \theta)` the tangent of :math:`z^*` along
    :math:`\dot\theta` solves the linear system

    .. math:: (I - \partial_z f)\, \dot z = \partial_\theta f\, \dot\theta ,

    and a cotangent :math:`g` of :math:`z^*` is pulled back as
    :math:`u^\top \partial_\theta f` where :math:`u` solves the transposed (adjoint) system
    :math:`u = g + (\partial_z f)^\top u`. Both are solved matrix-free (JVPs or VJPs of ``f``
    at :math:`z^*`, never the Jacobian), by fixed-point iteration, Anderson, Broyden (any
    forward solver object, run on :math:`u \mapsto g + J^\top u`) or :class:`GMRES`.

    The solution's derivative is a custom JVP whose linear solve JAX transposes for reverse
    mode (``jax.lax.custom_linear_solve``), so every transform composes: ``jax.grad``,
    ``jax.vjp``, ``jax.jacrev``, ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``, gradients of
    gradients, and ``vmap``/``jit`` of all of them. Higher derivatives are implicit too: the
    forward iterations are never stored or unrolled, so memory does not grow with the number
    of solver steps at any order.

    A linear solve that does not converge is never silent: the statistics of the reverse-mode
    (adjoint) solve are written to the cotangent of the ``probe`` of :func:`deq.fixed_point`
    (see :func:`deq.backward_stats_probe`), and with ``on_failure="warn"`` (default) a
    ``RuntimeWarning`` is issued from whichever solve (adjoint or forward-mode tangent) failed.
    The best iterate found is used.

    Args:
      solver: solver for the linear systems; a forward solver or :class:`GMRES`.
      max_steps: iteration (or matrix-vector product) budget of each linear solve.
      on_failure: ``"warn"`` or ``"ignore"``.
    """

    solver: ForwardSolver | GMRES = dataclasses.field(default_factory=Anderson)
    max_steps: int = 50
    on_failure: str = "warn"

    def __post_init__(self):
        check_choice(self, "on_failure", self.on_failure, ("warn", "ignore"))
        set_field(self, "max_steps", check_max_steps(self, self.max_steps))
        # Not a field: equality and hashing stay those of the options.
        set_field(self, "_linear_solver", adjoint_linear_solver(self, self.solver))

    def solve(self, fn, solver, z0, args, stats_probe, *, max_steps, batched, precision):
        diff, nondiff, treedef = _split(args)
        config = _ImplicitConfig(self, solver, max_steps, batched, precision, treedef)
        return _implicit(fn, config, z0, diff, nondiff, stats_probe)

    def _solve_linear(self, op, rhs, warn):
        """``u = rhs + op(u)`` on ``(batch, dim)`` matrices; ``(u, LinearSolveStats)``."""
        u, stats = self._linear_solver.solve(op, rhs, self.max_steps)
        if self.on_failure == "warn":
            # Only a failed solve reaches the host: no callback on the common path. Effect
            # free (deq._host): a jitted step that differentiates a solve keeps JAX's fast
            # dispatch path.
            u = report_unless(jnp.all(stats.converged), warn,
                              (jax.lax.stop_gradient(stats.converged),), u)
        return u, stats

    def solve_adjoint_system(self, vjp_z, g):
        """Solve ``u = g + vjp_z(u)`` (reverse mode) on ``(batch, dim)`` matrices.

        Returns ``u`` and the probe cotangent holding the solve's statistics."""
        u, stats = self._solve_linear(vjp_z, g, _warn_backward)
        probe_cotangent = backward_stats_cotangent(
            stats.num_steps, stats.abs_residual, stats.u_norm, stats.result,
            _loop.residual_dtype(g))
        return u, probe_cotangent

    def solve_tangent_system(self, jvp_z, rhs):
        """Solve ``v = rhs + jvp_z(v)`` (forward mode) on ``(batch, dim)`` matrices."""
        return self._solve_linear(jvp_z, rhs, _warn_tangent)[0]


_FAILED_SOLVE_ADVICE = (
    "raise ImplicitAdjoint(max_steps=...), use ImplicitAdjoint(solver=deq.GMRES()), or make "
    "the cell more contractive (Jacobian regularisation, weight normalisation). "
    "ImplicitAdjoint(on_failure='ignore') silences this warning."
)


def _warn_backward(converged):
    if not np.all(converged):
        # A constant message: Python's default warning filter then shows it once per call
        # site instead of on every training step. The numbers are in deq.backward_stats.
        warnings.warn(
            "deq: the implicit backward (adjoint) solve did not converge within its step "
            "budget; the gradient is approximate. Read the residuals with "
            "deq.backward_stats (probe=...), " + _FAILED_SOLVE_ADVICE,
            RuntimeWarning,
            stacklevel=2,
        )


def _warn_tangent(converged):
    if not np.all(converged):
        warnings.warn(
            "deq: the implicit forward-mode (tangent) solve did not converge within its step "
            "budget; the JVP is approximate. " + _FAILED_SOLVE_ADVICE,
            RuntimeWarning,
            stacklevel=2,
        )


class _ImplicitConfig(NamedTuple):
    """The static (hashable) part of an implicit solve: a non-differentiable argument of its
    custom JVP."""

    adjoint: ImplicitAdjoint
    solver: ForwardSolver
    max_steps: int
    batched: bool
    precision: Any
    args_treedef: Any  # of args, whose leaves are split into diff and nondiff


@partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _implicit(fn, config: _ImplicitConfig, z0, diff, nondiff, stats_probe):
    args = _merge(diff, nondiff, config.args_treedef)
    with _precision(config.precision):
        return forward_solve(fn, config.solver, z0, args, config.max_steps, config.batched)


def _is_zero(t):
    return t is None or isinstance(t, SymbolicZero)


def _zero_tangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


@partial(_implicit.defjvp, symbolic_zeros=True)
def _implicit_jvp(fn, config, primals, tangents):
    """The tangent of ``z*`` solves ``(I - J) dz = (df/dargs) dargs`` (``J = df/dz`` at
    ``z*``); ``z0`` has no influence on ``z*``.

    The linear solve is a ``custom_linear_solve``: JAX transposes it for reverse mode (the
    transposed solve is the adjoint system) and differentiates it again for higher orders,
    each time at ``z*``, never through the forward iterations. When the probe is perturbed
    (differentiated), the system is augmented with the probe's tangent through an identity
    block; the transposed solve writes its statistics into that block's cotangent, which is
    the probe's cotangent.
    """
    z0, diff, nondiff, probe = primals
    _, ddiff, _, dprobe = tangents
    z, stats = _implicit(fn, config, z0, diff, nondiff, probe)
    stats_dot = jax.tree_util.tree_map(_zero_tangent, stats)
    live = [not _is_zero(t) for t in ddiff]
    with_probe = not _is_zero(dprobe)
    if not any(live) and not with_probe:
        return (z, stats), (jax.tree_util.tree_map(jnp.zeros_like, z), stats_dot)
    treedef = config.args_treedef
    adjoint = config.adjoint
    # The systems are solved on (batch, dim) matrices. One matrix right-hand side also keeps
    # the linear solve's input linear as a whole, as its transposition requires, when some
    # leaves of z do not depend on the perturbed arguments.
    flat = Flattener(z, config.batched)
    with _precision(config.precision):
        args = _merge(diff, nondiff, treedef)
        _, jvp_z = jax.linearize(lambda zz: fn(zz, args), z)
        vjp_z = jax.linear_transpose(jvp_z, z)
        jvp_mat = flat.on_matrices(jvp_z)
        vjp_mat = flat.on_matrices(lambda v: vjp_z(v)[0])
        if any(live):
            ddiff = [None if d is None else (jnp.zeros(t.aval.shape, t.aval.dtype)
                                             if isinstance(t, SymbolicZero) else t)
                     for d, t in zip(diff, ddiff)]
            _, rhs = jax.jvp(lambda d: fn(z, _merge(d, nondiff, treedef)), (diff,), (ddiff,))
            rhs = flat.flatten(rhs)
        else:
            rhs = jnp.zeros((flat.batch, flat.dim), flat.dtype)
        # A zero that depends linearly on every perturbed input: the right-hand side is then
        # linear even where f does not depend on them (or only the probe is perturbed).
        link = [t for t, ok in zip(ddiff, live) if ok] + ([dprobe] if with_probe else [])
        rhs = rhs + 0 * sum(jnp.ravel(t)[:1].sum() for t in link).astype(rhs.dtype)

        def matvec(x):
            xz = x[0] if with_probe else x
            out = xz - jvp_mat(xz)
            return (out, x[1]) if with_probe else out

        def solve(_, b):
            u = adjoint.solve_tangent_system(jvp_mat, b[0] if with_probe else b)
            return (u, b[1]) if with_probe else u

        def transpose_solve(_, g):
            u, probe_ct = adjoint.solve_adjoint_system(vjp_mat, g[0] if with_probe else g)
            if not with_probe:
                return u
            return u, probe_ct.astype(dprobe.dtype).reshape(dprobe.shape)

        b = (rhs, dprobe) if with_probe else rhs
        dz = jax.lax.custom_linear_solve(matvec, b, solve, transpose_solve)
    dz = flat.unflatten(dz[0] if with_probe else dz)
    return (z, stats), (dz, stats_dot)


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

    Derivatives, in every mode and at every order (``jax.jvp``, ``jax.jacfwd``,
    ``jax.hessian``, ...), are JAX's own derivatives of that ``steps``-step map with
    :math:`z_0` held fixed: the phantom gradient and its higher-order analogues, not the
    implicit derivatives (they approach them as ``steps`` grows, for a contractive ``f``).
    Use :class:`ImplicitAdjoint` for exact derivatives of the fixed point.

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

    def solve(self, fn, solver, z0, args, stats_probe, *, max_steps, batched, precision):
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
        # A differentiated step that overflowed is reported, never left as a success.
        rows = Flattener(z, batched).flatten(jax.lax.stop_gradient(z))
        return z, _flag_nonfinite(stats, jnp.all(jnp.isfinite(rows), axis=1))


def _flag_nonfinite(stats, finite):
    """``stats`` with the samples whose returned value is not ``finite`` marked NONFINITE."""
    per_sample = jnp.where(finite, stats.result_per_sample, RESULTS.NONFINITE).astype(jnp.int32)
    result = jnp.where(jnp.all(finite), stats.result, RESULTS.NONFINITE).astype(jnp.int32)
    return stats._replace(result=result, result_per_sample=per_sample,
                          converged=result == RESULTS.SUCCESSFUL)


@dataclasses.dataclass(frozen=True)
class JacobianFreeAdjoint(PhantomAdjoint):
    r"""Jacobian-free backprop (JFB, Fung et al., 2022): one step :math:`f(\mathrm{sg}(z^*))`.

    Replaces :math:`(I - J)^{-1}` by the identity: the gradient is that of one application
    of ``f`` at the fixed point. Cheapest backward; a descent direction when ``f`` is
    contractive enough. Every transform (``jax.jvp``, ``jax.hessian``, ...) gives the
    derivatives of that one step, :math:`\partial_\theta f(z^*, \theta)`, not those of the
    fixed point: use :class:`ImplicitAdjoint` for those.
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

    Every transform (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``, gradients of gradients)
    differentiates the iterates. The solver's own coefficients (Anderson's mixing weights,
    Broyden's inverse-Jacobian estimate) are held fixed, as constants of the method: the
    derivatives are then iterates of a linear method on the tangent system, which converge to
    the implicit derivatives as the forward solve converges. (Through the weights'
    least-squares solve they would blow up as the residuals vanish.)

    Args:
      checkpoint: rematerialise each step (``jax.checkpoint``).
    """

    checkpoint: bool = False

    def __post_init__(self):
        set_field(self, "checkpoint", check_bool(self, "checkpoint", self.checkpoint))

    def solve(self, fn, solver, z0, args, stats_probe, *, max_steps, batched, precision):
        flat = Flattener(z0, batched)
        f = flat.on_matrices(lambda z: fn(z, args))
        with _precision(precision):
            zf, stats = _loop.unroll(f, solver, flat.flatten(z0), max_steps, self.checkpoint)
        return flat.unflatten(zf), stats


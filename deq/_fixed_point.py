"""The one entry point: ``deq.fixed_point``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deq._adjoint import Adjoint, ImplicitAdjoint
from deq._solution import BACKWARD_STATS_SIZE, Solution
from deq._solvers import Anderson, ForwardSolver
from deq._validate import check_bool, check_max_steps, check_precision


def _is_array_like(x) -> bool:
    """Arrays are traced; Python scalars and every other leaf are static (equinox's rule)."""
    return isinstance(x, (jax.Array, jax.core.Tracer, np.ndarray, np.generic)) or (
        hasattr(x, "__array__") and not isinstance(x, (bool, int, float, complex))
    )


def _check_structure(fn, z0, args):
    try:
        out = jax.eval_shape(fn, z0, args)
    except Exception as e:
        # Keep the original exception (its type may need constructor arguments, e.g. JAX's
        # tracer errors) and add the context a user needs where Python supports notes.
        if hasattr(e, "add_note"):
            e.add_note("deq.fixed_point: raised while calling fn(z0, args) to check its output.")
        raise
    zs, zt = jax.tree_util.tree_flatten(z0)
    os_, ot = jax.tree_util.tree_flatten(out)
    if zt != ot:
        raise ValueError(
            "fn(z, args) must return a pytree with the same structure as z0; "
            f"z0 is {zt}, fn returned {ot}."
        )
    for i, (a, b) in enumerate(zip(zs, os_)):
        if jnp.shape(a) != b.shape or jnp.result_type(a) != b.dtype:
            raise ValueError(
                "fn(z, args) must return leaves with the shapes and dtypes of z0; leaf "
                f"{i}: z0 has {jnp.shape(a)} {jnp.result_type(a)}, fn returned "
                f"{b.shape} {b.dtype}."
            )


def fixed_point(
    fn: Callable[[Any, Any], Any],
    z0: Any,
    args: Any = None,
    *,
    solver: ForwardSolver | None = None,
    adjoint: Adjoint | None = None,
    max_steps: int = 50,
    batched: bool = False,
    precision: str | jax.lax.Precision | None = None,
    probe: jax.Array | None = None,
) -> Solution:
    r"""Solve :math:`z^* = f(z^*, \text{args})` and make :math:`z^*` differentiable.

    ``fn`` maps a pytree ``z`` and a pytree ``args`` to a pytree shaped like ``z``. The
    forward pass is run by ``solver``; how gradients flow to ``args`` is decided by
    ``adjoint`` (exact implicit differentiation by default: constant memory in the number of
    solver steps). Gradients flow to every floating-point array in ``args`` and to arrays that
    ``fn`` closes over (they are converted to explicit arguments with
    ``jax.closure_convert``); ``z0`` receives a zero gradient, as the fixed point does not
    depend on where the solve starts. Works under ``jit`` and ``vmap`` and, with the default
    :class:`deq.ImplicitAdjoint`, every differentiation transform (``grad``, ``jvp``,
    ``jacfwd``, ``jacrev``, ``hessian``, ...), implicitly at every order.

    Args:
      fn: the map ``f(z, args) -> z``.
      z0: initial guess, a pytree of floating-point arrays.
      args: parameters and inputs, any pytree. Array leaves (``jax.Array`` and numpy arrays
        and scalars such as ``np.float32(1)``) are traced: they may change between calls
        without recompiling, and floating-point ones receive gradients. Every other leaf --
        Python ``int``/``float``/``bool``/``str``, callables, ... -- reaches ``fn`` unchanged
        as a static value (the convention of ``equinox.is_array``), so ``range(n)`` or a
        shape built from a Python ``int`` works. Wrap a Python float in ``jnp.asarray`` to
        trace it.
      solver: forward solver; default :class:`deq.Anderson`.
      adjoint: backward mode; default :class:`deq.ImplicitAdjoint`.
      max_steps: budget of evaluations of ``fn`` in the forward solve (for
        :class:`deq.UnrolledAdjoint`: the exact number of evaluations), an integer >= 1.
        Default 50, as for :class:`deq.ImplicitAdjoint`'s backward solve; the Flax layers
        default to 30, as their solve runs on every training step.
      batched: if True, the leading axis of every leaf of ``z0`` is a batch of independent
        problems: residuals, tolerances and solver updates are per sample, the solve stops when
        every sample has converged, and the scalar stats report the worst sample. A sample
        that turns non-finite is frozen at its best finite iterate and flagged in
        ``stats.result_per_sample``; the others still converge. An empty batch (leading size
        0) returns ``z0`` at once, converged. Only valid if ``fn`` treats samples
        independently (no batch statistics across samples).
      precision: matmul precision used inside the solve and the adjoint solve (e.g.
        ``"highest"``); ``None`` keeps JAX's default. On GPUs the default TF32 precision can
        make tolerances below ~1e-4 unreachable (the solver then reports ``STAGNATED``).
      probe: optional :func:`deq.backward_stats_probe` whose cotangent receives the
        statistics of the implicit backward solve.

    Returns:
      A :class:`deq.Solution` with ``value`` (the fixed point, or for the unrolled/phantom
      modes the last iterate) and ``stats`` (:class:`deq.SolverStats`).

    Raises:
      ValueError: if ``fn``'s output structure, shapes or dtypes differ from ``z0``, or if
        an option is out of range.
      TypeError: if an option has the wrong type (e.g. ``max_steps=2.5``).

    Example::

      >>> import jax, jax.numpy as jnp, deq
      >>> def f(z, args):
      ...     w, x = args
      ...     return jnp.tanh(w @ z + x)
      >>> w = 0.5 * jnp.eye(3); x = jnp.ones(3)
      >>> sol = deq.fixed_point(f, jnp.zeros(3), (w, x))
      >>> bool(sol.stats.converged)
      True
      >>> grad_w = jax.grad(lambda w: deq.fixed_point(f, jnp.zeros(3), (w, x)).value.sum())(w)
      >>> grad_w.shape
      (3, 3)
    """
    solver = Anderson() if solver is None else solver
    adjoint = ImplicitAdjoint() if adjoint is None else adjoint
    if not isinstance(solver, ForwardSolver):
        raise TypeError(
            "solver must be deq.FixedPointIteration, deq.Anderson or deq.Broyden; "
            f"got {solver!r}."
        )
    if not isinstance(adjoint, Adjoint):
        raise TypeError(
            "adjoint must be deq.ImplicitAdjoint, deq.PhantomAdjoint, deq.JacobianFreeAdjoint "
            f"or deq.UnrolledAdjoint; got {adjoint!r}."
        )
    max_steps = check_max_steps("deq.fixed_point", max_steps)
    batched = check_bool("deq.fixed_point", "batched", batched)
    precision = check_precision("deq.fixed_point", precision)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}.")

    # Non-array leaves of args (strings, callables, ...) are static: fold them into fn.
    leaves, treedef = jax.tree_util.tree_flatten(args)
    is_arr = [_is_array_like(x) for x in leaves]
    arr_leaves = [jnp.asarray(x) for x, a in zip(leaves, is_arr) if a]
    static_leaves = [x for x, a in zip(leaves, is_arr) if not a]

    def merge(arrs):
        it_a, it_s = iter(arrs), iter(static_leaves)
        return jax.tree_util.tree_unflatten(
            treedef, [next(it_a) if a else next(it_s) for a in is_arr]
        )

    z0 = jax.tree_util.tree_map(jnp.asarray, z0)
    _check_structure(lambda z, a: fn(z, merge(a)), z0, arr_leaves)

    # Arrays that fn closes over become explicit inputs of the custom JVP: without this,
    # gradients w.r.t. closed-over parameters would be silently wrong.
    converted, consts = jax.closure_convert(lambda z, a: fn(z, merge(a)), z0, arr_leaves)

    def fn_explicit(z, a):
        arrs, cs = a
        return converted(z, arrs, *cs)

    if probe is None:
        probe = jnp.zeros((BACKWARD_STATS_SIZE,), jnp.float32)
    elif jnp.shape(probe) != (BACKWARD_STATS_SIZE,):
        raise ValueError(
            f"probe must come from deq.backward_stats_probe() (shape ({BACKWARD_STATS_SIZE},)); "
            f"got shape {jnp.shape(probe)}."
        )
    value, stats = adjoint.solve(
        fn_explicit, solver, z0, (arr_leaves, list(consts)), probe,
        max_steps=max_steps, batched=batched, precision=precision,
    )
    return Solution(value=value, stats=stats)

"""What the NNX and Linen DEQ layers share: option checks, the starting point, the solve and
the Jacobian penalty, and the messages that reject stateful layers inside a cell.

Both layers reduce a call to ``solve(fn, z0, (cell_state, x), ...)`` with
``fn(z, (cell_state, x)) = cell(z, x)``: the cell's parameters are an explicit argument of
:func:`deq.fixed_point`, so they receive gradients through its custom VJP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deq._adjoint import Adjoint
from deq._fixed_point import fixed_point
from deq._solution import RESULTS, SolverStats
from deq._solvers import ForwardSolver
from deq.regularization import jacobian_regularization

DEFAULT_MAX_STEPS = 30

# Why each kind of stateful layer cannot live inside a fixed-point map, and what to use instead.
_BATCHNORM = (
    "it normalises with statistics of the current batch and updates running statistics on "
    "every call, i.e. on every solver iteration; it also couples the samples of a batch, "
    "while the batched solve treats them as independent. Use GroupNorm or LayerNorm inside "
    "the cell (and weight normalisation on its linear maps/convolutions), or put BatchNorm "
    "outside the DEQ layer."
)
_DROPOUT = (
    "it would draw a new mask on every solver iteration, so the map changes from step to step "
    "and has no fixed point. Apply dropout outside the DEQ layer (to its input or output)."
)
_SPECTRALNORM = (
    "it runs and stores a power iteration on every call, i.e. on every solver iteration. Use "
    "weight normalisation instead (deq.cells: weight_norm=True), or normalise the weights "
    "once outside the solve."
)
_RNG = (
    "it draws random numbers on every call, so the map changes from step to step and has no "
    "fixed point. Keep randomness outside the DEQ layer."
)
_MUTABLE = (
    "a variable that the cell updates would be updated on every solver iteration (and the "
    "updates are dropped by the solve). Keep only parameters in the cell: use GroupNorm or "
    "LayerNorm instead of BatchNorm and weight normalisation instead of spectral norm."
)
REASONS = {
    "BatchNorm": _BATCHNORM,
    "Dropout": _DROPOUT,
    "SpectralNorm": _SPECTRALNORM,
    "rng": _RNG,
    "mutable": _MUTABLE,
}


class LayerStats(NamedTuple):
    """Statistics of a DEQ layer's forward solve, in shapes that do not depend on the input.

    :class:`deq.SolverStats` has per-sample fields whose shape is the batch size. A layer
    keeps its stats between calls (NNX) or returns them with every call (Linen), so they have
    fixed shapes and dtypes here -- otherwise a jitted train step would recompile after an
    evaluation call with another batch size. Residuals are stored in float32.

    Attributes:
      num_steps: int32, evaluations of the cell (0 before the first call).
      abs_residual: ``|f(z) - z|`` of the returned point, worst sample.
      rel_residual: ``|f(z) - z| / |f(z)|``, worst sample.
      mean_abs_residual: ``|f(z) - z|`` averaged over the samples.
      mean_rel_residual: ``|f(z) - z| / |f(z)|`` averaged over the samples.
      abs_trace: shape ``(max_steps,)``, worst-sample absolute residual per step (NaN after
        ``num_steps``).
      rel_trace: shape ``(max_steps,)``, likewise relative.
      converged: bool, every sample met the solver's tolerance.
      result: int32 :class:`deq.RESULTS` code.
    """

    num_steps: Any
    abs_residual: Any
    rel_residual: Any
    mean_abs_residual: Any
    mean_rel_residual: Any
    abs_trace: Any
    rel_trace: Any
    converged: Any
    result: Any

    @classmethod
    def from_solver_stats(cls, stats: SolverStats) -> LayerStats:
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        return cls(
            num_steps=jnp.asarray(stats.num_steps, jnp.int32),
            abs_residual=f32(stats.abs_residual),
            rel_residual=f32(stats.rel_residual),
            mean_abs_residual=f32(jnp.mean(stats.abs_residual_per_sample)),
            mean_rel_residual=f32(jnp.mean(stats.rel_residual_per_sample)),
            abs_trace=f32(stats.abs_trace),
            rel_trace=f32(stats.rel_trace),
            converged=jnp.asarray(stats.converged, jnp.bool_),
            result=jnp.asarray(stats.result, jnp.int32),
        )

    @classmethod
    def before_first_call(cls, max_steps: int) -> LayerStats:
        """Placeholder with the final shapes: zero steps, NaN residuals, not converged."""
        nan = jnp.full((), jnp.nan, jnp.float32)
        trace = jnp.full((max_steps,), jnp.nan, jnp.float32)
        return cls(
            num_steps=jnp.zeros((), jnp.int32), abs_residual=nan, rel_residual=nan,
            mean_abs_residual=nan, mean_rel_residual=nan, abs_trace=trace, rel_trace=trace,
            converged=jnp.zeros((), jnp.bool_),
            result=jnp.asarray(RESULTS.MAX_STEPS, jnp.int32),
        )

    def summary(self) -> str:
        """One line for logs (needs concrete values, i.e. call it outside jit)."""
        return (
            f"steps={int(self.num_steps)} abs={float(self.abs_residual):.3e} "
            f"rel={float(self.rel_residual):.3e} result={RESULTS.describe(self.result)}"
        )


def stateful_error(layer: str, what: str, where: str, reason: str) -> ValueError:
    """The error raised when a cell holds a layer with state that changes on each call."""
    return ValueError(
        f"{layer}: the cell contains {what} at {where!r}, which cannot be used inside a "
        f"fixed-point solve: {REASONS[reason]}"
    )


def validate(layer: str, *, solver, adjoint, max_steps, z_init, jac_reg_samples,
             jac_reg_batch=None, batched=True) -> None:
    """Check the layer options up front, so mistakes surface at construction."""
    if solver is not None and not isinstance(solver, ForwardSolver):
        raise TypeError(
            f"{layer}: solver must be deq.FixedPointIteration, deq.Anderson or deq.Broyden, "
            f"got {solver!r}."
        )
    if adjoint is not None and not isinstance(adjoint, Adjoint):
        raise TypeError(
            f"{layer}: adjoint must be deq.ImplicitAdjoint, deq.PhantomAdjoint, "
            f"deq.JacobianFreeAdjoint or deq.UnrolledAdjoint, got {adjoint!r}."
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"{layer}: max_steps must be a positive int, got {max_steps!r}.")
    if not (isinstance(z_init, str) or callable(z_init)):
        raise TypeError(
            f"{layer}: z_init must be 'zeros', the name of a method of the cell (e.g. "
            f"'inject') or a callable x -> z0, got {z_init!r}."
        )
    if isinstance(jac_reg_samples, bool) or not isinstance(jac_reg_samples, int) or (
        jac_reg_samples < 0
    ):
        raise ValueError(
            f"{layer}: jac_reg_samples must be an int >= 0 (0 disables the Jacobian "
            f"penalty), got {jac_reg_samples!r}."
        )
    if jac_reg_batch is not None:
        if isinstance(jac_reg_batch, bool) or not isinstance(jac_reg_batch, int) or (
            jac_reg_batch < 1
        ):
            raise ValueError(
                f"{layer}: jac_reg_batch must be a positive int or None, got {jac_reg_batch!r}."
            )
        if not batched:
            raise ValueError(f"{layer}: jac_reg_batch needs batched=True (a batch to subsample).")


def initial_state(
    layer: str,
    init: str | Callable,
    x: jax.Array,
    cell: Any,
    call_method: Callable[[str], Any],
    batched: bool,
) -> Any:
    """The starting point ``z0`` of the solve.

    ``"zeros"``: zeros of shape ``cell.state_shape(x.shape)`` if the cell defines
    ``state_shape``, else shaped like ``x``. Another string: ``call_method(name)``, the cell's
    method of that name applied to ``x`` (e.g. ``"inject"``). A callable: ``init(x)``.
    """
    if batched and jnp.ndim(x) == 0:
        raise ValueError(f"{layer}: batched=True needs x with a leading batch axis, got a scalar.")
    if isinstance(init, str):
        if init == "zeros":
            shape = cell.state_shape(jnp.shape(x)) if hasattr(cell, "state_shape") else (
                jnp.shape(x)
            )
            dtype = jnp.result_type(x)
            if not jnp.issubdtype(dtype, jnp.inexact):
                dtype = jnp.result_type(float)
            return jnp.zeros(shape, dtype)
        if not hasattr(cell, init):
            raise AttributeError(
                f"{layer}: z_init={init!r} names no method of the cell "
                f"{type(cell).__name__}; use 'zeros', a method name or a callable x -> z0."
            )
        return call_method(init)
    return init(x)


def match_output_dtype(fn: Callable, z0: Any, args: Any) -> Any:
    """Cast ``z0`` to the dtypes ``fn`` returns (e.g. float32 inputs, float64 parameters)."""
    out = jax.eval_shape(fn, z0, args)
    if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(z0):
        return z0  # let deq.fixed_point report the mismatch with its full message
    return jax.tree_util.tree_map(lambda z, o: jnp.asarray(z, o.dtype), z0, out)


def solve(
    fn: Callable,
    z0: Any,
    args: Any,
    *,
    solver: ForwardSolver | None,
    adjoint: Adjoint | None,
    max_steps: int,
    batched: bool,
    precision,
    probe: jax.Array | None,
) -> tuple[Any, LayerStats]:
    """``deq.fixed_point`` with the layer's options; stats come back without gradient."""
    sol = fixed_point(
        fn, z0, args, solver=solver, adjoint=adjoint, max_steps=max_steps, batched=batched,
        precision=precision, probe=probe,
    )
    return sol.value, LayerStats.from_solver_stats(jax.lax.stop_gradient(sol.stats))


def jacobian_penalty(fn: Callable, z: Any, cell_state: Any, x: jax.Array, key: jax.Array,
                     num_samples: int, sub_batch: int | None = None):
    """Jacobian penalty at the fixed point, which is held constant (as in Bai et al., 2021).

    ``fn(z, (cell_state, x))`` is the cell. With ``sub_batch``, only the first ``sub_batch``
    samples are used: the estimate is a per-sample mean, so this is still unbiased, and its
    second-order backward pass (the costly part) shrinks with the batch. Returned in float32
    whatever the model's dtype, so that the stored value keeps one dtype.
    """
    if sub_batch is not None:
        z = jax.tree_util.tree_map(lambda a: a[:sub_batch], z)
        x = x[:sub_batch]
    penalty = jacobian_regularization(
        fn, jax.lax.stop_gradient(z), (cell_state, x), key, num_samples
    )
    return penalty.astype(jnp.float32)

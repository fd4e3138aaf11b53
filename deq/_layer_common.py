"""What the NNX and Linen DEQ layers share: option checks, the starting point, the solve (compiled
once per static configuration) (the stabiliser is in ``_stabiliser.py``, the warning about
training solves that keep failing in ``_unconverged.py``, the messages that reject stateful
cells in ``_stateful.py``).

Both layers reduce a call to :func:`forward` with a hashable *cell adapter* ``cell`` that
applies the cell functionally, ``cell(state, z, x)``, and a hashable :class:`CallOptions`:
the map of the solve is ``fn(z, (state, x)) = cell(state, z, x)``. The cell's parameters are
thus an explicit argument of :func:`deq.fixed_point` and receive gradients through its custom
VJP, and the whole forward pass sits in one ``jax.jit`` whose static arguments are the adapter
and the options, so that an eager (un-jitted) call compiles once per cell structure, shapes
and options instead of on every call. Under an outer ``jit`` the inner one is inlined.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deq import _stabiliser
from deq._adjoint import Adjoint, UnrolledAdjoint
from deq._fixed_point import fixed_point
from deq._solution import RESULTS, SolverStats, trace_size
from deq._solvers import Anderson, Broyden, ForwardSolver
from deq._stateful import StatefulCellError
from deq._unconverged import watch_unconverged
from deq._validate import (
    check_bool,
    check_float,
    check_int,
    check_max_steps,
    check_precision,
    is_hashable,
)
from deq.regularization import AdaptiveWeight

# The layers' forward budget, below deq.fixed_point's 50: a layer's solve runs on every
# training step, where the implicit gradient needs only an approximate fixed point, and
# eval_max_steps raises the budget for evaluation.
DEFAULT_MAX_STEPS = 30
# In training, with the default solver, the samples Anderson leaves unconverged (a cell still
# far from contractive, early in training) go on from their best iterates by Broyden's method,
# for up to max_steps more steps: the implicit gradient is then taken at an equilibrium. In the
# Flax MNIST example's setting (SGD 0.1, momentum 0.9), damped iteration left 3 of 150 Linen
# training solves unconverged (about one sample each, early in training); Broyden left none, at
# the same step time (it only runs for the samples Anderson leaves).
DEFAULT_TRAIN_FALLBACK = Broyden()
DEFAULT_EVAL_MAX_STEPS = 100
# The stabiliser, on by default: one Hutchinson probe on 32 samples of the batch, weighted by
# how close the training solve came to its budget (deq.regularization.AdaptiveWeight).
DEFAULT_JAC_REG_SAMPLES = 1
DEFAULT_JAC_REG_BATCH = 32
DEFAULT_JAC_REG_WEIGHT = "auto"
DEFAULT_WARN_UNCONVERGED_AFTER = 20

# The options both layers (deq.nnx.DEQ, deq.linen.DEQ) document, at "{layer_options}".
LAYER_OPTIONS_DOC = """\
solver: forward solver in training (default: :class:`deq.Anderson`, whose unconverged
  samples go on from their best iterates by :class:`deq.Broyden`, for up to ``max_steps``
  more steps). A solver you pass is used as given.
adjoint: backward mode (default :class:`deq.ImplicitAdjoint`).
max_steps: budget of cell evaluations of the forward solve; default 30, below
  ``deq.fixed_point``'s 50, as the solve runs on every training step.
z_init: starting point ``z0``: ``"zeros"`` (shape ``cell.state_shape(x.shape)`` if the
  cell defines it, else ``x.shape``), the name of a cell method applied to ``x`` (e.g.
  ``"inject"``), or a callable ``x -> z0`` that does not use the cell's parameters.
batched: the leading axis of ``z`` is a batch of independent samples; each sample stops
  when it has converged. Set False for an unbatched ``x`` (e.g. under ``vmap``).
precision: matmul precision inside the solves (e.g. ``"highest"``), see
  :func:`deq.fixed_point`.
jac_reg_samples: the stabiliser, on by default: Hutchinson probes of the Jacobian penalty
  ``||df/dz||_F^2 / d`` at ``z*`` (default 1; 0 disables it). In training mode the layer
  adds the weighted penalty's gradient to the gradient of any loss computed from its output,
  as if it were a term of that loss: nothing to add by hand. It keeps the cell contractive,
  so that training and evaluation solves keep converging. It acts on reverse-mode gradients
  only: forward-mode transforms (``jvp``, ``jacfwd``) of the call see the layer without it,
  but not through a ``jit`` of your own around a training-mode call (JAX cannot linearise
  its custom VJP there): evaluate (``model.eval()``, ``deterministic=True``) or set
  ``jac_reg_samples=0`` for forward mode inside ``jit``.
jac_reg_batch: the penalty uses only the first ``jac_reg_batch`` samples of a batched call
  (default 32; None: all; still unbiased, and its second-order pass is the costly part).
jac_reg_weight: the penalty's weight: ``"auto"`` (default; a
  :class:`deq.regularization.AdaptiveWeight`: 0, and nothing computed, while the training
  solve takes at most half its budget, rising to 3 as it spends all of it), another
  :class:`~deq.regularization.AdaptiveWeight`, or a fixed number.
eval_solver: forward solver in evaluation mode (default: ``solver`` with a
  :class:`deq.Broyden` fallback of the same tolerances, which takes over the samples the
  solver leaves unconverged, from their best iterates).
eval_max_steps: budget of the forward solve in evaluation mode (default: the larger of 100
  and ``max_steps``; a sample stops when it converges, so evaluation costs the steps it
  needs, not the budget). The stats' traces have the length of the longest budget,
  fallback included.
warn_unconverged_after: issue one :class:`UnconvergedWarning` once this many training
  solves of layers with this cell class have stopped unconverged; None never warns. The
  count runs in an effect-free host callback, reached only by a failed solve: a ``jax.jit``
  step keeps JAX's fast dispatch. An ahead-of-time compiled step (``.lower().compile()``)
  with any host callback does not (about 20 us per argument leaf per call): there, pass
  None and ``ImplicitAdjoint(on_failure="ignore")`` and count ``stats.converged``
  yourself. Under ``jax.checkpoint`` a failed solve may be counted twice.
"""


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
      abs_trace: worst-sample absolute residual per step (NaN after ``num_steps``), long
        enough for the training and the evaluation budgets, at most ``deq.TRACE_CAP``
        entries (see :class:`deq.SolverStats`).
      rel_trace: likewise relative.
      converged: bool, every sample met the solver's tolerance.
      result: int32 :class:`deq.RESULTS` code.
      converged_fraction: float32, the fraction of the samples that met the tolerance (1 for
        an unbatched solve that converged).
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
    converged_fraction: Any

    @classmethod
    def from_solver_stats(cls, stats: SolverStats, trace_length: int) -> LayerStats:
        f32 = lambda a: jnp.asarray(a, jnp.float32)

        def trace(t):  # padded with NaN to the layer's longest budget (train or eval)
            t = f32(t)
            return jnp.pad(t, (0, trace_length - t.shape[0]), constant_values=jnp.nan)

        return cls(
            num_steps=jnp.asarray(stats.num_steps, jnp.int32),
            abs_residual=f32(stats.abs_residual),
            rel_residual=f32(stats.rel_residual),
            mean_abs_residual=f32(jnp.mean(stats.abs_residual_per_sample)),
            mean_rel_residual=f32(jnp.mean(stats.rel_residual_per_sample)),
            abs_trace=trace(stats.abs_trace),
            rel_trace=trace(stats.rel_trace),
            converged=jnp.asarray(stats.converged, jnp.bool_),
            result=jnp.asarray(stats.result, jnp.int32),
            converged_fraction=jnp.mean(
                jnp.asarray(stats.result_per_sample) == RESULTS.SUCCESSFUL, dtype=jnp.float32),
        )

    @classmethod
    def before_first_call(cls, trace_length: int) -> LayerStats:
        """Placeholder with the final shapes: zero steps, NaN residuals, not converged."""
        nan = jnp.full((), jnp.nan, jnp.float32)
        trace = jnp.full((trace_length,), jnp.nan, jnp.float32)
        return cls(
            num_steps=jnp.zeros((), jnp.int32), abs_residual=nan, rel_residual=nan,
            mean_abs_residual=nan, mean_rel_residual=nan, abs_trace=trace, rel_trace=trace,
            converged=jnp.zeros((), jnp.bool_),
            result=jnp.asarray(RESULTS.MAX_STEPS, jnp.int32),
            converged_fraction=jnp.zeros((), jnp.float32),
        )

    def summary(self) -> str:
        """One line for logs (needs concrete values, i.e. call it outside jit)."""
        return (
            f"steps={int(self.num_steps)} abs={float(self.abs_residual):.3e} "
            f"rel={float(self.rel_residual):.3e} result={RESULTS.describe(self.result)} "
            f"converged={100 * float(self.converged_fraction):.1f}%"
        )


# ---------------------------------------------------------------------------------------------
# Options: checked when the layer is built, and frozen into a hashable CallOptions per call.

def _check_solver(layer: str, field: str, solver) -> None:
    if solver is not None and not isinstance(solver, ForwardSolver):
        raise TypeError(
            f"{layer}: {field} must be deq.FixedPointIteration, deq.Anderson or deq.Broyden, "
            f"got {solver!r}."
        )


def validate(layer: str, options: Any) -> None:
    """Check a layer's options up front, so that mistakes surface at construction.

    ``options`` is the layer itself (NNX) or its dataclass fields (Linen): both have the
    attributes checked here.
    """
    o = options
    _check_solver(layer, "solver", o.solver)
    _check_solver(layer, "eval_solver", o.eval_solver)
    if o.adjoint is not None and not isinstance(o.adjoint, Adjoint):
        raise TypeError(
            f"{layer}: adjoint must be deq.ImplicitAdjoint, deq.PhantomAdjoint, "
            f"deq.JacobianFreeAdjoint or deq.UnrolledAdjoint, got {o.adjoint!r}."
        )
    check_max_steps(layer, o.max_steps)
    check_max_steps(layer, o.eval_max_steps, "eval_max_steps", allow_none=True)
    check_int(layer, "warn_unconverged_after", o.warn_unconverged_after, minimum=1,
              allow_none=True)
    if not (isinstance(o.z_init, str) or callable(o.z_init)):
        raise TypeError(
            f"{layer}: z_init must be 'zeros', the name of a method of the cell (e.g. "
            f"'inject') or a callable x -> z0, got {o.z_init!r}."
        )
    check_bool(layer, "batched", o.batched)
    check_precision(layer, o.precision)
    if o.deterministic is not None:
        check_bool(layer, "deterministic", o.deterministic)
    check_int(layer, "jac_reg_samples", o.jac_reg_samples, minimum=0)
    w = o.jac_reg_weight
    if isinstance(w, str):
        if w != "auto":
            raise ValueError(f"{layer}: jac_reg_weight must be a number >= 0, 'auto' or a "
                             f"deq.regularization.AdaptiveWeight, got {w!r}.")
    elif not isinstance(w, AdaptiveWeight):
        check_float(layer, "jac_reg_weight", w, minimum=0.0)
    check_int(layer, "jac_reg_batch", o.jac_reg_batch, minimum=1, allow_none=True)


def eval_solver(options: Any) -> ForwardSolver:
    """The forward solver of evaluation mode: ``eval_solver`` if given, else ``solver`` (the
    default Anderson if None) with a Broyden fallback of the same tolerances when it has no
    fallback of its own."""
    if options.eval_solver is not None:
        return options.eval_solver
    solver = options.solver if options.solver is not None else Anderson()
    if solver.fallback is not None:
        return solver
    return dataclasses.replace(solver, fallback=Broyden(rtol=solver.rtol, atol=solver.atol))


def eval_max_steps(options: Any) -> int:
    """The forward budget of evaluation mode: ``eval_max_steps``, else the larger of
    ``DEFAULT_EVAL_MAX_STEPS`` and ``max_steps`` (a solve stops when its samples converge, so
    an unused budget costs nothing)."""
    if options.eval_max_steps:
        return int(options.eval_max_steps)
    return max(DEFAULT_EVAL_MAX_STEPS, int(options.max_steps))


def train_solver(options: Any) -> ForwardSolver:
    """The forward solver of training mode: ``solver`` as given, else the default Anderson
    with ``DEFAULT_TRAIN_FALLBACK`` for the samples it leaves unconverged."""
    if options.solver is not None:
        return options.solver
    if isinstance(options.adjoint, UnrolledAdjoint):  # a fixed number of steps: no fallback
        return Anderson()
    return Anderson(fallback=DEFAULT_TRAIN_FALLBACK)


def trace_length(options: Any) -> int:
    """Length of the stats' residual traces: the longest budget, training or evaluation."""
    return max(trace_size(train_solver(options).budget(int(options.max_steps))),
               trace_size(eval_solver(options).budget(eval_max_steps(options))))


class CallOptions(NamedTuple):
    """Everything static about one call of a layer: hashable, a key of the compiled solve."""

    layer: str
    z_init: Any
    batched: bool
    precision: Any
    solver: ForwardSolver | None
    adjoint: Adjoint | None
    max_steps: int
    trace_length: int
    training: bool
    warn_after: int | None
    # The stabiliser (applied when jac_reg_samples > 0; see _stabiliser.penalty and attach).
    jac_reg_samples: int = 0
    jac_reg_batch: int | None = None
    jac_reg_weight: Any = 0.0
    # Whether the penalty's gradient is needed: False for a call on concrete arrays, whose
    # output nothing can differentiate (the penalty's value is still computed for logging).
    jac_reg_grad: bool = True

    @classmethod
    def make(cls, layer: str, options: Any, deterministic: bool, *,
             watch: bool = True, stabilise: bool = True) -> CallOptions:
        """Options of a call; ``deterministic`` (evaluation) selects the ``eval_*`` settings.

        ``watch=False`` does not count unconverged solves (e.g. Linen's ``init``);
        ``stabilise=False`` leaves the stabiliser out (it is also out in evaluation)."""
        solver, max_steps = train_solver(options), options.max_steps
        if deterministic:
            solver, max_steps = eval_solver(options), eval_max_steps(options)
        warn = options.warn_unconverged_after
        # Unrolled backprop runs a fixed number of steps: convergence is not its contract.
        if isinstance(options.adjoint, UnrolledAdjoint):
            warn = None
        return cls(
            layer=layer, z_init=options.z_init, batched=bool(options.batched),
            precision=options.precision, solver=solver, adjoint=options.adjoint,
            max_steps=int(max_steps), trace_length=trace_length(options),
            training=not deterministic,
            warn_after=None if warn is None or not watch else int(warn),
            **_stabiliser_options(options, stabilise and not deterministic),
        )


def _stabiliser_options(options: Any, on: bool) -> dict:
    """The stabiliser's fields of :class:`CallOptions`: normalised, so that they hash (a
    numpy or concrete JAX weight becomes a float), and neutral when it is off."""
    samples = int(options.jac_reg_samples) if on else 0
    if not samples:
        return dict(jac_reg_samples=0, jac_reg_batch=None, jac_reg_weight=0.0)
    w = options.jac_reg_weight
    if isinstance(w, str):  # "auto", the only string the layer accepts
        w = AdaptiveWeight()
    if isinstance(w, AdaptiveWeight) and isinstance(options.adjoint, UnrolledAdjoint):
        # A fixed number of unrolled steps always "spends its budget": convergence is not
        # its contract, so the adaptive weight has nothing to go by.
        w = 0.0
    return dict(
        jac_reg_samples=samples,
        jac_reg_batch=None if options.jac_reg_batch is None else int(options.jac_reg_batch),
        jac_reg_weight=w if isinstance(w, AdaptiveWeight) else float(w),
    )


# ---------------------------------------------------------------------------------------------
# The starting point, and a clear message when the cell does not accept it.

def _zeros(shape, dtype):
    """Zeros of ``shape``, or a tuple/list of zeros when ``shape`` is a tuple/list of shapes."""
    if isinstance(shape, (tuple, list)) and not all(
        isinstance(d, (int, np.integer)) for d in shape
    ):
        return type(shape)(_zeros(s, dtype) for s in shape)
    return jnp.zeros(tuple(shape), dtype)


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
    ``state_shape`` (a shape, or a tuple/list of shapes for a tuple state), else shaped like
    ``x``. Another string: ``call_method(name)``, the cell's
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
            return _zeros(shape, dtype)
        if not hasattr(cell, init):
            raise AttributeError(
                f"{layer}: z_init={init!r} names no method of the cell "
                f"{type(cell).__name__}; use 'zeros', a method name or a callable x -> z0."
            )
        return call_method(init)
    return init(x)


def _shapes(tree) -> str:
    shapes = [tuple(jnp.shape(a)) for a in jax.tree_util.tree_leaves(tree)]
    return str(shapes[0]) if len(shapes) == 1 else str(shapes)


def _start_error(layer: str, z_init, cell: Any, x, z0, problem: str) -> ValueError:
    if isinstance(z_init, str) and z_init == "zeros":
        origin = ("zeros of shape cell.state_shape(x.shape)" if hasattr(cell, "state_shape")
                  else "zeros shaped like x, as the cell has no state_shape method")
    else:
        origin = f"z_init={z_init!r}"
    return ValueError(
        f"{layer}: the solve starts from z0 of shape {_shapes(z0)} ({origin}; x has shape "
        f"{tuple(jnp.shape(x))}), but {problem}. The state must keep one shape through the "
        f"solve. If the state's shape differs from x's, either pass z_init= (a callable "
        f"x -> z0 such as lambda x: jnp.zeros((*x.shape[:-1], width)), or the name of a "
        f"cell method such as 'inject'), or give the cell a method "
        f"state_shape(x_shape) -> the state's shape."
    )


def checked_start(layer: str, z_init, cell: Any, x, z0, run: Callable[[], Any]) -> Any:
    """``run()`` (the cell applied to ``z0``, concretely or abstractly), with a message that
    names the layer, the shapes and the ways out when the cell does not accept ``z0`` (a
    ``TypeError``/``ValueError``, the cell's message included) or returns another shape.
    JAX's tracer errors and errors of other kinds pass through unchanged."""
    try:
        out = run()
    except (TypeError, ValueError) as e:
        # JAX's tracer errors (a Python `if` on a traced value, ...) say more on their own.
        if isinstance(e, (StatefulCellError, jax.errors.JAXTypeError,
                          jax.errors.ConcretizationTypeError)):
            raise
        reason = (f"the cell failed on it ({str(e).rstrip('.')}; if z0's shape is right, "
                  f"that error is the cell's own)")
        raise _start_error(layer, z_init, cell, x, z0, reason) from e
    z_struct = jax.tree_util.tree_structure(z0)
    if jax.tree_util.tree_structure(out) != z_struct or any(
        tuple(jnp.shape(a)) != tuple(jnp.shape(b))
        for a, b in zip(jax.tree_util.tree_leaves(z0), jax.tree_util.tree_leaves(out))
    ):
        raise _start_error(layer, z_init, cell, x, z0,
                           f"the cell returned a state of shape {_shapes(out)}")
    return out


# ---------------------------------------------------------------------------------------------
# The forward pass, compiled once per (cell adapter, options, shapes, dtypes).

def _forward(cell: Any, options: CallOptions, state: Any, x: Any, probe: Any, key: Any):
    fn = lambda z, args: cell(args[0], z, args[1])
    module = cell.module(state)
    z0 = initial_state(options.layer, options.z_init, x, module,
                       lambda name: cell.method(state, name, x), options.batched)
    out = checked_start(options.layer, options.z_init, module, x, z0,
                        lambda: jax.eval_shape(fn, z0, (state, x)))
    # Cast z0 to the dtypes the cell returns (e.g. float32 inputs, float64 parameters).
    z0 = jax.tree_util.tree_map(lambda z, o: jnp.asarray(z, o.dtype), z0, out)
    sol = fixed_point(
        fn, z0, (state, x), solver=options.solver, adjoint=options.adjoint,
        max_steps=options.max_steps, batched=options.batched, precision=options.precision,
        probe=probe,
    )
    stats = LayerStats.from_solver_stats(jax.lax.stop_gradient(sol.stats), options.trace_length)
    value = sol.value
    if options.training and options.warn_after is not None:
        value = watch_unconverged(options, cell.name, stats, value)
    penalty, grads = jnp.zeros((), jnp.float32), None
    if options.jac_reg_samples:
        penalty, grads = _stabiliser.penalty(
            cell, options, value, state, x,
            _stabiliser.input_key(x) if key is None else key, stats, options.jac_reg_grad)
    return value, stats, penalty, grads


_forward_jit = jax.jit(_forward, static_argnums=(0, 1))


def forward(cell: Any, options: CallOptions, state: Any, x: Any,
            probe: jax.Array | None, key: jax.Array | None = None,
            ) -> tuple[Any, LayerStats, jax.Array]:
    """The layer's fixed point ``z*`` of ``x``, the :class:`LayerStats` of its solve and the
    stabiliser's weighted penalty (float32, no gradient; 0 when ``options`` leave it out).

    The stabiliser's penalty and its gradient (:func:`deq._stabiliser.penalty`) are computed
    in the same pass, its probes drawn from ``key``, or from a key derived from ``x`` when
    ``key`` is None; the gradient is attached to ``z*`` after it (a custom VJP, which a
    forward-mode transform of the whole pass could not go through).

    ``cell`` is a hashable adapter with ``cell(state, z, x)``, ``cell.method(state, name, x)``,
    ``cell.module(state)`` (an object to look ``state_shape``/methods up on) and ``cell.name``.
    When the adapter and options hash (the usual case), the pass runs in a ``jax.jit`` keyed
    on them: eager calls reuse its compilation, traced calls inline it.
    """
    if options.jac_reg_samples and not any(
            isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((state, x))):
        options = options._replace(jac_reg_grad=False)  # an eager call: nothing to attach to
    if is_hashable(cell, options):
        z, stats, penalty, grads = _forward_jit(cell, options, state, x, probe, key)
    else:
        z, stats, penalty, grads = _forward(cell, options, state, x, probe, key)
    if grads is not None:
        z = _stabiliser.attach(z, state, x, grads)
    return z, stats, penalty

"""The deep equilibrium layer for Flax NNX: a thin adapter over :func:`deq.fixed_point`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from deq import _layer_common as common
from deq import _stateful, _unconverged
from deq._adjoint import Adjoint
from deq._docs import with_shared_doc
from deq._solvers import ForwardSolver
from deq.regularization import AdaptiveWeight

_NAME = "deq.nnx.DEQ"


LayerStats = common.LayerStats
UnconvergedWarning = _unconverged.UnconvergedWarning


class DEQStats(nnx.Variable):
    """Holds the :class:`LayerStats` of a DEQ layer's last forward solve.

    Not an ``nnx.Param``: optimisers built with ``wrt=nnx.Param`` ignore it, and it carries no
    gradient. Its shapes are fixed at construction, so calls with other batch sizes do not
    make jitted functions recompile. Checkpoint ``nnx.state(model, nnx.Param)``.
    """


class DEQAuxLoss(nnx.Variable):
    """Holds an auxiliary loss of a DEQ layer's last call (e.g. the Jacobian penalty).

    The value is differentiable within the traced function that made the call, so it can be
    added to the training loss there; outside, it is a concrete number to log.
    """


def _offending(cell: nnx.Module):
    """(what, path, reason) of the first stateful layer or variable inside ``cell``."""
    layers = [(nnx.BatchNorm, "BatchNorm"), (nnx.Dropout, "Dropout"),
              (nnx.SpectralNorm, "SpectralNorm")]
    if hasattr(nnx, "WeightNorm"):
        layers.append((nnx.WeightNorm, "WeightNorm"))
    nodes = [("/".join(map(str, path)) or "<cell>", node) for path, node in nnx.iter_graph(cell)]
    # Layers first, so that the error names e.g. the BatchNorm and not its 'mean' variable.
    for where, node in nodes:
        for cls, reason in layers:
            if isinstance(node, cls):
                return f"nnx.{cls.__name__}", where, reason
    for where, node in nodes:
        if isinstance(node, nnx.BatchStat):
            return "an nnx.BatchStat variable", where, "mutable"
        if isinstance(node, nnx.RngState):
            return f"random state ({type(node).__name__})", where, "rng"
    return None


def _values(state: nnx.State) -> dict:
    return {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def _check_unchanged(cell: nnx.Module, before: dict) -> None:
    """Fail if the call of ``cell`` wrote or created any variable; ``before``: its values.

    A write replaces a variable's value object, so comparing identities finds it also while
    tracing (abstract values cannot be compared)."""
    for path, var in nnx.to_flat_state(nnx.state(cell)):
        where = "/".join(map(str, path))
        kind = type(var).__name__
        if path not in before:
            raise _stateful.stateful_error(_NAME, f"a {kind} variable created by its call",
                                           where, "mutable")
        if var.get_value() is not before[path]:
            raise _stateful.stateful_error(_NAME, f"a {kind} variable that its call updates",
                                           where, "mutable")


@dataclasses.dataclass(frozen=True)
class _Cell:
    """The cell as a pure function of its state: hashable (its graph definition), so that
    the compiled solve is reused by every call with a cell of the same structure."""

    graphdef: Any
    name: str

    def module(self, state):
        return nnx.merge(self.graphdef, state)

    def method(self, state, name, x):
        return getattr(self.module(state), name)(x)

    def __call__(self, state, z, x):
        before = _values(state)  # merge shares the variables: read their values first
        cell = self.module(state)
        out = cell(z, x)
        _check_unchanged(cell, before)
        return out


def _trace_of(leaf):
    # JAX's tracers keep their trace in ``_trace`` (no public accessor); None if concrete.
    return getattr(leaf, "_trace", None) if isinstance(leaf, jax.core.Tracer) else None


def _record(variable: nnx.Variable, value: Any) -> bool:
    """Store ``value`` in ``variable`` where that can be done in the current trace context.

    Not done (and False returned) under a transform that does not own the layer's state:
    a plain JAX transform of a function that closes over the layer (``jax.grad`` inside
    ``nnx.jit``: the variable belongs to the outer trace), or an ``nnx.vmap`` that broadcasts
    the layer (``in_axes=None``) while the value is batched (it would need an output axis
    the broadcast state does not have). The value's trace, gradients aside, must then be
    the variable's own.
    """
    if not variable._can_update:
        return False
    old = jax.tree_util.tree_leaves(variable.get_value())
    new = jax.tree_util.tree_leaves(jax.lax.stop_gradient(value))
    if any(_trace_of(n) is not None and _trace_of(n) is not _trace_of(o)
           for n, o in zip(new, old, strict=True)):
        return False
    variable.set_value(value)
    return True


@with_shared_doc(layer_options=common.LAYER_OPTIONS_DOC)
class DEQ(nnx.Module):
    r"""Deep equilibrium layer: returns :math:`z^* = f(z^*, x)` for a cell ``f(z, x) -> z``.

    The forward pass runs ``solver`` until the residual meets its tolerance (at most
    ``max_steps`` evaluations of the cell); gradients reach the cell's parameters and ``x``
    through ``adjoint`` (exact implicit differentiation by default, in memory independent of
    the number of steps). The cell is split into its graph and state, and the state is an
    explicit argument of :func:`deq.fixed_point`, so no parameter is closed over.

    After each call:

    * ``layer.stats`` (a :class:`DEQStats` variable) holds the :class:`LayerStats` of the
      solve -- ``layer.stats.get_value().num_steps``, ``.rel_residual``, ``.converged``, ... --
      also after ``nnx.jit``, where it is updated like any other NNX state. (Per-sample
      residuals are summarised: stored state must not change shape with the batch size.)
    * ``layer.jac_loss`` (a :class:`DEQAuxLoss` variable) holds the value (for logging, no
      gradient) of ``jac_reg_weight`` times the Jacobian penalty
      :func:`deq.regularization.jacobian_regularization` at :math:`z^*` when
      ``jac_reg_samples > 0`` and the layer is not ``deterministic`` (``model.eval()`` sets
      that), else 0: ``layer.jac_loss[...]``. The penalty itself enters the gradient of any
      loss of the layer's output: nothing to add to the loss.

    Cells must not hold state that changes on each call: ``nnx.BatchNorm``, ``nnx.Dropout``,
    ``nnx.SpectralNorm`` and any ``nnx.BatchStat`` or random state are rejected at
    construction, and a cell whose call writes or creates any variable (a counter, a running
    statistic of its own) at its first call, each with an error naming the layer and the
    variable's path (use GroupNorm/LayerNorm and weight normalisation; put dropout and
    counters outside).

    ``stats`` and ``jac_loss`` are written where the layer's state can be updated: in eager
    calls and under NNX transforms that carry the layer (``nnx.jit``, ``nnx.grad``,
    ``nnx.value_and_grad``, ``nnx.vmap`` with the layer mapped, ...). Under a transform that
    does not own the layer's state -- a plain JAX transform of a function that closes over
    the layer (``jax.grad`` inside ``nnx.jit``), or ``nnx.vmap(..., in_axes=(None, 0))``
    with the layer broadcast (its stats would be per sample) -- the call works and both keep
    their previous values (and the Jacobian penalty is not computed). For a batch, prefer
    ``batched=True`` (per-sample stopping already) to ``vmap``.

    Eager calls are cheap after the first: the forward pass runs in a ``jax.jit`` keyed on
    the cell's graph definition and the layer's options (shapes and dtypes as usual), so a
    second eager call with the same shapes -- also of another layer with a cell of the same
    structure -- reuses the compilation. Under ``nnx.jit`` nothing changes (the inner
    ``jit`` is inlined). A callable ``z_init`` is part of the key: define it once, not as a
    new lambda per call.

    When training solves keep stopping unconverged (``warn_unconverged_after`` of them for
    layers of this cell class; evaluation solves are not counted), one
    :class:`UnconvergedWarning` says so in plain words with what to try. It is counted on
    the host through a callback that runs only when a solve did not converge.

    Args:
      cell: an ``nnx.Module`` called as ``cell(z, x)`` and returning a ``z``-shaped output.
      {layer_options}
      deterministic: evaluation mode: the ``eval_*`` settings, no (random) Jacobian penalty,
        no counting of unconverged solves; ``model.eval()`` and ``model.train()`` set it.
      rngs: optional; its ``jac_reg`` stream (or default stream) draws the stabiliser's
        probes. Without it they come from a key derived from each call's input.

    Example usage::

      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> import deq.nnx
      >>> from deq.cells.nnx import MLPCell
      >>> class Model(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.deq = deq.nnx.DEQ(MLPCell(4, 16, rngs=rngs), jac_reg_samples=1,
      ...                                rngs=rngs)
      ...         self.head = nnx.Linear(16, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.head(self.deq(x))
      >>> model = Model(nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
      >>> @nnx.jit
      ... def train_step(model, optimizer, x, y):
      ...     def loss_fn(model):
      ...         logits = model(x)
      ...         # The stabiliser is already in the gradient: the loss is just the task's.
      ...         return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      ...     loss, grads = nnx.value_and_grad(loss_fn)(model)
      ...     optimizer.update(model, grads)
      ...     return loss
      >>> loss = train_step(model, optimizer, jnp.ones((8, 4)), jnp.zeros(8, jnp.int32))
      >>> int(model.deq.stats.get_value().num_steps) > 0
      True
    """

    def __init__(
        self,
        cell: nnx.Module,
        *,
        solver: ForwardSolver | None = None,
        adjoint: Adjoint | None = None,
        max_steps: int = common.DEFAULT_MAX_STEPS,
        z_init: str | Callable[[jax.Array], Any] = "zeros",
        batched: bool = True,
        precision: str | jax.lax.Precision | None = None,
        jac_reg_samples: int = common.DEFAULT_JAC_REG_SAMPLES,
        jac_reg_batch: int | None = common.DEFAULT_JAC_REG_BATCH,
        jac_reg_weight: float | str | AdaptiveWeight = common.DEFAULT_JAC_REG_WEIGHT,
        deterministic: bool = False,
        eval_solver: ForwardSolver | None = None,
        eval_max_steps: int | None = None,
        warn_unconverged_after: int | None = common.DEFAULT_WARN_UNCONVERGED_AFTER,
        rngs: nnx.Rngs | None = None,
    ):
        if not isinstance(cell, nnx.Module):
            raise TypeError(f"{_NAME}: cell must be an nnx.Module, got {type(cell).__name__}.")
        self.solver = solver
        self.adjoint = adjoint
        self.max_steps = max_steps
        self.z_init = z_init
        self.batched = batched
        self.precision = precision
        self.jac_reg_samples = jac_reg_samples
        self.jac_reg_batch = jac_reg_batch
        self.jac_reg_weight = jac_reg_weight
        self.deterministic = deterministic
        self.eval_solver = eval_solver
        self.eval_max_steps = eval_max_steps
        self.warn_unconverged_after = warn_unconverged_after
        common.validate(_NAME, self)
        if isinstance(z_init, str) and z_init != "zeros" and not callable(
            getattr(cell, z_init, None)
        ):
            raise AttributeError(
                f"{_NAME}: z_init={z_init!r} names no method of {type(cell).__name__}."
            )
        self._check_cell(cell)
        self.cell = cell
        # Fixed shapes and dtypes from the start: a jitted function sees the same input
        # structure before and after the first call, and compiles once.
        self.stats = DEQStats(common.LayerStats.before_first_call(common.trace_length(self)))
        self.jac_loss = DEQAuxLoss(jnp.zeros((), jnp.float32))
        if jac_reg_samples and rngs is not None:
            if not isinstance(rngs, nnx.Rngs):
                raise TypeError(f"{_NAME}: rngs must be an nnx.Rngs, got {type(rngs).__name__}.")
            self.rngs = rngs["jac_reg"].fork()
        else:
            # Without rngs the stabiliser's probes come from a key derived from each call's
            # input: no random state in the layer (nothing to checkpoint or restore).
            self.rngs = nnx.data(None)

    @staticmethod
    def _check_cell(cell: nnx.Module) -> None:
        bad = _offending(cell)
        if bad is not None:
            raise _stateful.stateful_error(_NAME, *bad)

    def __call__(
        self,
        x: jax.Array,
        *,
        probe: jax.Array | None = None,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """Solve for the equilibrium state of ``x``.

        Args:
          x: the input injected into every cell evaluation (batch first if ``batched``).
          probe: optional :func:`deq.backward_stats_probe`, whose cotangent receives the
            statistics of the implicit backward solve.
          rngs: overrides the layer's stream for the Jacobian penalty (``nnx.Rngs`` or a key).

        Returns:
          The fixed point ``z*``.
        """
        # The options and the cell may have been changed since construction.
        common.validate(_NAME, self)
        self._check_cell(self.cell)
        graphdef, state = nnx.split(self.cell)
        cell = _Cell(graphdef, type(self.cell).__name__)
        # The stabiliser only where its value can be stored (see _record): drawing its key
        # updates the layer's random stream, which a foreign trace must not do either.
        options = common.CallOptions.make(_NAME, self, bool(self.deterministic),
                                          stabilise=self.jac_loss._can_update)
        key = self._key(rngs) if options.jac_reg_samples else None
        z, stats, penalty = common.forward(cell, options, state, x, probe, key)
        _record(self.stats, stats)
        _record(self.jac_loss, penalty)
        return z

    def _key(self, rngs) -> jax.Array | None:
        """The penalty's probes: ``rngs``, else the layer's stream, else (None) a key derived
        from the input inside the solve."""
        if rngs is None:
            return None if self.rngs is None else self.rngs()
        if isinstance(rngs, nnx.Rngs):
            return rngs["jac_reg"]()
        return rngs


__all__ = ["DEQ", "DEQAuxLoss", "DEQStats", "LayerStats", "UnconvergedWarning"]

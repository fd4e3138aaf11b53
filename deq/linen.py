"""The deep equilibrium layer for Flax Linen: a thin adapter over :func:`deq.fixed_point`."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax.errors import InvalidRngError

from deq import _layer_common as common
from deq import _stateful, _unconverged
from deq._adjoint import Adjoint
from deq._docs import with_shared_doc
from deq._solvers import ForwardSolver
from deq.regularization import AdaptiveWeight

_NAME = "deq.linen.DEQ"

LayerStats = common.LayerStats
UnconvergedWarning = _unconverged.UnconvergedWarning

_STATEFUL = ((nn.BatchNorm, "BatchNorm"), (nn.Dropout, "Dropout"),
             (nn.SpectralNorm, "SpectralNorm"))


def _module_path(module: nn.Module) -> str:
    names = []
    while isinstance(module, nn.Module):
        names.append(module.name or type(module).__name__)
        module = module.parent
    return "/".join(reversed(names))


def _reject_stateful(next_fun, args, kwargs, context):
    """``nn.intercept_methods`` hook: fail on the first stateful layer the cell calls, and on
    random numbers drawn by the cell (``make_rng``; the innermost calling module is named)."""
    for cls, reason in _STATEFUL:
        if isinstance(context.module, cls):
            raise _stateful.stateful_error(
                _NAME, f"nn.{cls.__name__}", _module_path(context.module), reason
            )
    try:
        return next_fun(*args, **kwargs)
    except InvalidRngError as e:
        stream = re.search(r'PRNG for "([^"]*)"', str(e))
        what = f"a call of make_rng({stream.group(1)!r})" if stream else "a call of make_rng"
        raise _stateful.stateful_error(_NAME, what, _module_path(context.module), "rng") from e


@dataclasses.dataclass(frozen=True)
class _Cell:
    """The cell applied functionally, ``cell(params, z, x)``: hashable (a Linen module
    definition without parent), so that the compiled solve is reused across calls. No rng is
    passed: a cell that draws random numbers is rejected by name."""

    pure: nn.Module

    @property
    def name(self) -> str:
        return type(self.pure).__name__

    def module(self, params):
        return self.pure

    def _apply(self, params, *args, **kwargs):
        with nn.intercept_methods(_reject_stateful):
            return self.pure.apply({"params": params}, *args, **kwargs)

    def method(self, params, name, x):
        return self._apply(params, x, method=name)

    def __call__(self, params, z, x):
        return self._apply(params, z, x)


def _deterministic(attribute: bool | None, argument: bool | None) -> bool:
    if attribute is None and argument is None:
        return False  # training
    return bool(nn.merge_param("deterministic", attribute, argument))


@with_shared_doc(layer_options=common.LAYER_OPTIONS_DOC)
class DEQ(nn.Module):
    r"""Deep equilibrium layer: returns :math:`z^* = f(z^*, x)` for a Linen cell ``f(z, x)``.

    The cell is a child module named ``"cell"``, so its parameters live under this layer's
    scope (e.g. ``params["DEQ_0"]["cell"]["W"]["kernel"]``), also when the cell was
    constructed inside the enclosing module's compact method. ``DEQ.init`` calls the cell once
    to create them; inside the solve the cell is applied functionally,
    ``cell.apply({"params": p}, z, x)``, with ``p`` an explicit argument of
    :func:`deq.fixed_point`, so the parameters receive gradients through ``adjoint`` (exact
    implicit differentiation by default).

    Collections written:

    * ``"intermediates"``: ``"stats"``, the :class:`LayerStats` of the solve
      (``mutable=["intermediates"]`` to read it; a tuple with one entry per call). Their
      shapes do not depend on the batch size;
    * ``"losses"``: ``"jac_loss"``, the value (for logging, no gradient) of ``jac_reg_weight``
      times the Jacobian penalty :func:`deq.regularization.jacobian_regularization` at
      :math:`z^*`, when ``jac_reg_samples > 0``, the call is neither ``deterministic`` nor
      ``init`` and ``"losses"`` is mutable. The penalty itself enters the gradient of any loss
      of the layer's output whether or not the collection is mutable: nothing to add to the
      loss. Its probes come from the ``"jac_reg"`` rng stream, else from a key derived from ``x``.

    The names match :class:`deq.nnx.DEQ`'s ``layer.stats`` and ``layer.jac_loss``.

    Cells must not hold state that changes on each call: ``nn.BatchNorm``, ``nn.Dropout``,
    ``nn.SpectralNorm``, any collection other than ``params``, and a cell that draws random
    numbers (``self.make_rng``, even when the rng is passed) are rejected with an error
    naming the layer and the module (use GroupNorm/LayerNorm and weight normalisation; put
    dropout and noise outside).

    Eager calls (``model.apply`` outside ``jit``) are cheap after the first: the forward pass
    runs in a ``jax.jit`` keyed on the cell's module definition and the layer's options, so
    later calls with the same shapes reuse its compilation; under ``jax.jit`` nothing
    changes. When training solves keep stopping unconverged, one
    :class:`UnconvergedWarning` says so (see ``warn_unconverged_after``).

    Attributes:
      cell: a Linen module called as ``cell(z, x)`` returning a ``z``-shaped output.
      {layer_options}
      deterministic: evaluation mode (the ``eval_*`` settings, no Jacobian penalty, no
        counting of unconverged solves); may instead be passed to the call. Unset in both
        places: training.

    Example usage::

      >>> import jax, jax.numpy as jnp, optax
      >>> import flax.linen as nn
      >>> import deq.linen
      >>> from deq.cells.linen import MLPCell
      >>> class Model(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         z = deq.linen.DEQ(cell=MLPCell(16), jac_reg_samples=1)(x)
      ...         return nn.Dense(3)(z)
      >>> model, x, y = Model(), jnp.ones((8, 4)), jnp.zeros(8, jnp.int32)
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> tx = optax.adam(1e-2)
      >>> opt_state = tx.init(params)
      >>> @jax.jit
      ... def train_step(params, opt_state, key):
      ...     def loss_fn(params):
      ...         logits, aux = model.apply({"params": params}, x, rngs={"jac_reg": key},
      ...                                   mutable=["losses", "intermediates"])
      ...         # The stabiliser is already in the gradient: the loss is just the task's.
      ...         return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), aux
      ...     (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      ...     updates, opt_state = tx.update(grads, opt_state)
      ...     stats = aux["intermediates"]["DEQ_0"]["stats"][0]
      ...     return optax.apply_updates(params, updates), opt_state, loss, stats
      >>> params, opt_state, loss, stats = train_step(params, opt_state, jax.random.key(1))
      >>> int(stats.num_steps) > 0
      True
    """

    cell: nn.Module
    solver: ForwardSolver | None = None
    adjoint: Adjoint | None = None
    max_steps: int = common.DEFAULT_MAX_STEPS
    z_init: str | Callable[[jax.Array], Any] = "zeros"
    batched: bool = True
    precision: str | jax.lax.Precision | None = None
    jac_reg_samples: int = common.DEFAULT_JAC_REG_SAMPLES
    jac_reg_batch: int | None = common.DEFAULT_JAC_REG_BATCH
    jac_reg_weight: float | str | AdaptiveWeight = common.DEFAULT_JAC_REG_WEIGHT
    deterministic: bool | None = None
    eval_solver: ForwardSolver | None = None
    eval_max_steps: int | None = None
    warn_unconverged_after: int | None = common.DEFAULT_WARN_UNCONVERGED_AFTER

    def __post_init__(self):
        common.validate(_NAME, self)
        if not isinstance(self.cell, nn.Module):
            raise TypeError(
                f"{_NAME}: cell must be a flax.linen Module, got {type(self.cell).__name__}."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, probe: jax.Array | None = None,
                 deterministic: bool | None = None) -> jax.Array:
        """Solve for the equilibrium state of ``x``.

        Args:
          x: the input injected into every cell evaluation (batch first if ``batched``).
          probe: optional :func:`deq.backward_stats_probe`, whose cotangent receives the
            statistics of the implicit backward solve.
          deterministic: evaluation mode (the ``eval_*`` settings, no Jacobian penalty, no
            unconverged-solve warning); give it here or as the attribute, not both. Neither:
            training.

        Returns:
          The fixed point ``z*``.
        """
        deterministic = _deterministic(self.deterministic, deterministic)
        # The cell's parameters live in its own scope, "cell" under this layer, whoever
        # constructed it: a cell built in the enclosing module's compact method belongs to
        # that module, so it is re-created here as this layer's child.
        cell = self.cell if self.cell.parent is self else self.cell.clone(parent=self,
                                                                          name="cell")
        if self.is_initializing():
            # Create the cell's variables with one ordinary call. A method z_init (e.g.
            # "inject") needs parameters that do not exist yet: start from zeros here.
            z_init = self.z_init if callable(self.z_init) else "zeros"
            z = common.initial_state(_NAME, z_init, x, cell, None, self.batched)
            with nn.intercept_methods(_reject_stateful):
                common.checked_start(_NAME, z_init, cell, x, z, lambda: cell(z, x))
        variables = cell.variables
        for col in variables:
            if col != "params":
                where = "/".join((*cell.path, next(iter(variables[col]), "")))
                raise _stateful.stateful_error(
                    _NAME, f"a {col!r} variable collection", f"{col}: {where}", "mutable"
                )
        params = variables.get("params", {})
        # Inside the solve the cell is applied functionally, its parameters an explicit input.
        pure = _Cell(cell.clone(parent=None))
        initializing = self.is_initializing()
        options = common.CallOptions.make(_NAME, self, deterministic, watch=not initializing,
                                          stabilise=not initializing)
        # The penalty's probes: the "jac_reg" rng stream if the call has one, else a key
        # derived from the input (so that they vary from batch to batch).
        key = (self.make_rng("jac_reg")
               if options.jac_reg_samples and self.has_rng("jac_reg") else None)
        z, stats, penalty = common.forward(pure, options, params, x, probe, key)
        self.sow("intermediates", "stats", stats)
        if options.jac_reg_samples and self.is_mutable_collection("losses"):
            self.sow("losses", "jac_loss", penalty)
        return z


__all__ = ["DEQ", "LayerStats", "UnconvergedWarning"]

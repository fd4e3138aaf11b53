"""Tiny models and data shared by the layer tests, and one adapter per API (``NNX``,
``LINEN``) through which a test is written once for both layers (``@pytest.mark.parametrize(
"api", APIS)``).

Compilation dominates the cost of these tests on CPU, so the adapters call layers through a
few module-level jitted functions: layers of the same structure and options share their
compilations, across tests and test files.
"""

from __future__ import annotations

import functools
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deq
import deq.linen
import deq.nnx
from deq.cells import linen as linen_cells
from deq.cells import nnx as nnx_cells

CHANNELS = 4
CLASSES = 3


def randn(shape, seed=0, dtype=jnp.float32):
    """Test data from NumPy: ``jax.random`` would compile a sampler for every new shape."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def image_batch(n=8, size=6, seed=0):
    """A fixed random batch of ``(n, size, size, 1)`` images whose mean depends on the label."""
    y = jnp.asarray(np.random.default_rng(seed).integers(0, CLASSES, n), jnp.int32)
    return randn((n, size, size, 1), seed) + (y - 1.0)[:, None, None, None], y


def to_float64(params):
    """Cast a pytree of float32 parameters to float64 (cheaper than initialising in float64)."""
    return jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)


def tight():
    """Solver and adjoint options tight enough for float64 gradient checks."""
    return dict(
        solver=deq.Anderson(rtol=1e-12, atol=1e-12, stall_patience=None),
        adjoint=deq.ImplicitAdjoint(solver=deq.Anderson(rtol=1e-10, atol=1e-10), max_steps=200),
        max_steps=200,
    )


def unrolled(steps=300):
    """A long unrolled run of plain iteration: the reference gradient at convergence."""
    return dict(solver=deq.FixedPointIteration(), adjoint=deq.UnrolledAdjoint(), max_steps=steps)


class NNXClassifier(nnx.Module):
    """conv stem -> DEQ(MDEQ cell) -> global average pool -> linear head."""

    def __init__(self, *, rngs: nnx.Rngs, **deq_options):
        self.stem = nnx.Conv(1, CHANNELS, (3, 3), rngs=rngs)
        cell = nnx_cells.MDEQCell(CHANNELS, CHANNELS, num_groups=2, rngs=rngs)
        self.deq = deq.nnx.DEQ(cell, **deq_options)
        self.head = nnx.Linear(CHANNELS, CLASSES, rngs=rngs)

    def __call__(self, x):
        z = self.deq(nnx.relu(self.stem(x)))
        return self.head(jnp.mean(z, axis=(1, 2)))


class LinenClassifier(nn.Module):
    """The Linen twin of :class:`NNXClassifier`."""

    max_steps: int = 30

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(CHANNELS, (3, 3))(x))
        cell = linen_cells.MDEQCell(CHANNELS, num_groups=2)
        z = deq.linen.DEQ(cell=cell, max_steps=self.max_steps)(x)
        return nn.Dense(CLASSES)(jnp.mean(z, axis=(1, 2)))


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def check_directional_derivatives(loss, grads, params, *, seed=0, num_directions=3, eps=1e-4,
                                  rtol=1e-5, atol=1e-7):
    """Compare ``grads`` with central finite differences of ``loss`` along random directions.

    The reverse-mode check of ``jax.test_util.check_grads``, written out so that ``loss`` can
    be any already-compiled function (each evaluation then costs no compilation). ``params``
    and ``grads`` are pytrees of the same structure.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    g_leaves = jax.tree_util.tree_leaves(grads)
    assert len(g_leaves) == len(leaves)
    rng = np.random.default_rng(seed)
    for _ in range(num_directions):
        v = [rng.standard_normal(np.shape(p)) for p in leaves]

        def shifted(s, v=v):
            return jax.tree_util.tree_unflatten(
                treedef, [p + s * d for p, d in zip(leaves, v, strict=True)]
            )

        numeric = (loss(shifted(eps)) - loss(shifted(-eps))) / (2 * eps)
        analytic = sum(np.vdot(g, d) for g, d in zip(g_leaves, v, strict=True))
        assert abs(float(numeric) - float(analytic)) <= atol + rtol * abs(float(analytic)), (
            float(numeric), float(analytic)
        )


# ---- one adapter per API --------------------------------------------------------------------
#
# A *handle* is what a test holds of a layer with its parameters: the ``deq.nnx.DEQ`` module
# itself (its parameters inside), or a :class:`LinenLayer` (the module and its parameters).
# Both adapters have the same methods, so a scenario is written once for both APIs.

class Trained(NamedTuple):
    """The classifier after eight optax steps (trained once per API and session)."""

    model: Any  # NNX: the model; Linen: its parameters
    losses: list
    grads: Any  # gradients of the last step (NNX: an nnx.State; Linen: a dict)
    cell_grads: dict  # the DEQ cell's part of ``grads``, a pure dict
    stats: Any  # the DEQ layer's LayerStats of the last step


def perturbed(params, seed=5):
    """Parameters moved away from the initialisation (so that a restore from it is noticed)."""
    return jax.tree_util.tree_map(lambda p: p + 0.1 * randn(p.shape, seed), params)


_nnx_forward = nnx.jit(lambda m, x: m(x))


@nnx.jit
def _nnx_grads(m, x, c, probe):
    """Gradients of ``sum(c * m(x))`` w.r.t. the parameters, ``x`` and the stats probe."""
    loss = lambda m, x, probe: jnp.sum(c * m(x, probe=probe))
    return nnx.grad(loss, argnums=(0, 1, 2))(m, x, probe)


@nnx.jit
def _nnx_penalty_and_grad(m, x):
    # The layer adds its penalty's gradient to any loss of its output: a loss that is 0 times
    # the output has the penalty's gradient alone.
    def loss(m):
        return 0.0 * jnp.sum(m(x))
    grads = nnx.grad(loss)(m)
    return m.jac_loss[...], grads


class _NNX:
    """deq.nnx: the handle is the layer module."""

    name = "nnx"
    lib = deq.nnx
    module_type = "nnx.Module"  # named by the error for a cell of another kind

    def __repr__(self):
        return self.name

    def layer(self, cell=None, **options):
        """A layer (default cell: an MLP, 3 -> 4); ``rngs`` added where the penalty needs it."""
        cell = nnx_cells.MLPCell(3, 4, rngs=nnx.Rngs(0)) if cell is None else cell
        if options.get("jac_reg_samples") and "rngs" not in options:
            options["rngs"] = nnx.Rngs(0)
        return deq.nnx.DEQ(cell, **options)

    @staticmethod
    def _cast(cell, dtype):
        if dtype == jnp.float64:
            nnx.update(cell, to_float64(nnx.state(cell, nnx.Param)))
        return cell

    def mlp(self, dtype=jnp.float32, **options):
        """``(handle, x, c)``: an MLP-cell layer, an input and a cotangent for its output."""
        cell = self._cast(nnx_cells.MLPCell(3, 4, norm=True, rngs=nnx.Rngs(0)), dtype)
        return deq.nnx.DEQ(cell, **options), randn((2, 3), 1, dtype), randn((2, 4), 2, dtype)

    def mdeq(self, dtype=jnp.float32, **options):
        """``(handle, x, c)`` with an MDEQ cell (convolutions, GroupNorm, weight norm)."""
        cell = nnx_cells.MDEQCell(1, 2, num_groups=1, rngs=nnx.Rngs(0))
        # Switch the residual branch on (it starts at zero gain) so that every parameter matters.
        cell.norm2["scale"][...] = jnp.full((2,), 0.2)
        cell = self._cast(cell, dtype)
        x, c = randn((2, 3, 3, 1), 1, dtype), randn((2, 3, 3, 2), 2, dtype)
        return deq.nnx.DEQ(cell, **options), x, c

    def with_penalty(self):
        """``(handle, x)``: an MLP layer with a Jacobian penalty (on the first sample only)."""
        return self.mlp(jac_reg_samples=2, jac_reg_batch=1, jac_reg_weight=1.0,
                        rngs=nnx.Rngs(3))[:2]

    def module(self, layer):
        return layer

    def clone(self, layer, **options):
        """The same cell (and parameters) in a layer with other options."""
        return deq.nnx.DEQ(layer.cell, **options)

    def evaluating(self, layer):
        """A copy of the layer in evaluation mode (``model.eval()``)."""
        layer = nnx.clone(layer)
        layer.eval()
        return layer

    def params(self, layer):
        return nnx.to_pure_dict(nnx.state(layer, nnx.Param))

    def with_params(self, layer, params):
        """A copy of the layer with other parameter values (a pure dict)."""
        graphdef, state, rest = nnx.split(layer, nnx.Param, ...)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state, rest, copy=True)

    def start(self, layer, x):
        """``(handle, z)``: the layer's first call, eager."""
        return layer, layer(x)

    def call(self, layer, x):
        """``(z, stats)`` of an eager call."""
        return layer(x), layer.stats.get_value()

    def forward(self, layer, x):
        """``(z, stats)`` of a jitted call."""
        return _nnx_forward(layer, x), layer.stats.get_value()

    def grads(self, layer, x, c):
        """Gradients of ``sum(c * z)``: ``(parameters (pure dict), x, stats probe)``."""
        g, gx, probe = _nnx_grads(layer, x, c, deq.backward_stats_probe())
        return nnx.to_pure_dict(g), gx, probe

    def penalty_and_grad(self, layer, x, seed):
        """The Jacobian penalty and its parameter gradients; ``seed`` is not used: the layer
        draws new probes from its own stream on every call."""
        value, g = _nnx_penalty_and_grad(layer, x)
        return value, nnx.to_pure_dict(g)

    def cell_apply(self, layer, z, x):
        return layer.cell(z, x)

    def pure(self, layer):
        """``(fn, state)`` with ``fn(state, x)`` the layer's output: for JAX transforms."""
        graphdef, state = nnx.split(layer)
        return (lambda s, x: nnx.merge(graphdef, s, copy=True)(x)), state

    def checkpoint(self, layer):
        """What a checkpoint stores: ``nnx.state(model, nnx.Param)``."""
        return nnx.state(layer, nnx.Param)

    def restore_mlp(self, checkpointer, path):
        """The MLP layer restored from ``path``, built abstractly with ``nnx.eval_shape``."""
        abstract = nnx.eval_shape(lambda: self.mlp()[0])
        graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
        return nnx.merge(graphdef, checkpointer.restore(path, abstract_params), rest)

    @functools.cache  # noqa: B019 (two adapters, kept for the session)
    def trained_classifier(self) -> Trained:
        model = NNXClassifier(rngs=nnx.Rngs(0), max_steps=15)
        optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
        x, y = image_batch()

        @nnx.jit
        def train_step(model, optimizer, x, y):
            loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
            optimizer.update(model, grads)
            return loss, grads

        losses = []
        for _ in range(8):
            loss, grads = train_step(model, optimizer, x, y)
            losses.append(float(loss))
        cell_grads = nnx.to_pure_dict(grads["deq"]["cell"])
        return Trained(model, losses, grads, cell_grads, model.deq.stats.get_value())


class LinenLayer(NamedTuple):
    module: deq.linen.DEQ
    params: dict


@partial(jax.jit, static_argnums=0)
def _linen_forward(layer, params, x):
    """``(z, stats)`` of a layer (or model) holding one DEQ layer at the top level."""
    z, state = layer.apply({"params": params}, x, mutable=["intermediates"])
    return z, state["intermediates"]["stats"][0]


@partial(jax.jit, static_argnums=0)
def _linen_grads(layer, params, x, c, probe):
    """Gradients of ``sum(c * layer(x))`` w.r.t. the parameters, ``x`` and the stats probe."""
    loss = lambda p, x, probe: jnp.sum(c * layer.apply({"params": p}, x, probe=probe))
    return jax.grad(loss, argnums=(0, 1, 2))(params, x, probe)


def _linen_penalty(layer, params, x, key):
    # As for NNX: 0 times the output, plus the penalty the layer applies to the gradient.
    z, state = layer.apply({"params": params}, x, rngs={"jac_reg": key}, mutable=["losses"])
    return 0.0 * jnp.sum(z), sum(jax.tree_util.tree_leaves(state["losses"]))


@partial(jax.jit, static_argnums=0)
def _linen_penalty_and_grad(layer, params, x, key):
    (_, penalty), grads = jax.value_and_grad(_linen_penalty, argnums=1, has_aux=True)(
        layer, params, x, key)
    return penalty, grads


@functools.lru_cache
def _linen_init(layer, shape, dtype):
    # Linen's init runs a full forward solve: compile it once per layer and input shape.
    return jax.jit(layer.init)(jax.random.key(0), jnp.ones(shape, dtype))["params"]


class _Linen:
    """deq.linen: the handle is a :class:`LinenLayer`."""

    name = "linen"
    lib = deq.linen
    module_type = "flax.linen Module"

    def __repr__(self):
        return self.name

    def layer(self, cell=None, **options):
        """A layer (default cell: an MLP of width 4)."""
        return deq.linen.DEQ(cell=linen_cells.MLPCell(4) if cell is None else cell, **options)

    def init(self, model, x):
        """Initial parameters (a fresh copy: tests may edit them)."""
        return jax.tree_util.tree_map(lambda p: p, _linen_init(model, x.shape, x.dtype))

    def mlp(self, dtype=jnp.float32, **options):
        """``(handle, x, c)``: an MLP-cell layer, an input and a cotangent for its output."""
        cell = linen_cells.MLPCell(4, norm=True)
        # The parameters do not depend on the layer's options: one init serves them all.
        params = self.init(deq.linen.DEQ(cell=cell), randn((2, 3), 1))
        params = to_float64(params) if dtype == jnp.float64 else params
        x, c = randn((2, 3), 1, dtype), randn((2, 4), 2, dtype)
        return LinenLayer(deq.linen.DEQ(cell=cell, **options), params), x, c

    def with_penalty(self):
        """``(handle, x)``: an MLP layer with a Jacobian penalty."""
        return self.mlp(jac_reg_samples=2, jac_reg_weight=1.0)[:2]

    def module(self, h):
        return h.module

    def clone(self, h, **options):
        return LinenLayer(h.module.clone(**options), h.params)

    def evaluating(self, h):
        """The layer in evaluation mode (the ``deterministic`` attribute)."""
        return self.clone(h, deterministic=True)

    def params(self, h):
        return h.params

    def with_params(self, h, params):
        return LinenLayer(h.module, params)

    def start(self, layer, x):
        """``(handle, z)``: the layer's first call, its eager ``init``."""
        z, variables = layer.init_with_output(jax.random.key(0), x)
        return LinenLayer(layer, variables["params"]), z

    def call(self, h, x, **kwargs):
        """``(z, stats)`` of an eager call (``kwargs``: of ``apply``, e.g. ``deterministic``)."""
        z, state = h.module.apply({"params": h.params}, x, mutable=["intermediates"], **kwargs)
        return z, state["intermediates"]["stats"][0]

    def forward(self, h, x):
        return _linen_forward(h.module, h.params, x)

    def grads(self, h, x, c):
        return _linen_grads(h.module, h.params, x, c, deq.backward_stats_probe())

    def penalty_and_grad(self, h, x, seed):
        """The Jacobian penalty and its parameter gradients, probes drawn from ``seed``."""
        return _linen_penalty_and_grad(h.module, h.params, x, jax.random.key(seed))

    def cell_apply(self, h, z, x):
        return h.module.cell.apply({"params": h.params["cell"]}, z, x)

    def pure(self, h):
        return (lambda p, x: h.module.apply({"params": p}, x)), h.params

    def checkpoint(self, h):
        return h.params

    def restore_mlp(self, checkpointer, path):
        """The MLP layer restored from ``path``, its parameters' shapes as the target."""
        h = self.mlp()[0]
        abstract = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                                          h.params)
        return LinenLayer(h.module, checkpointer.restore(path, abstract))

    @functools.cache  # noqa: B019 (two adapters, kept for the session)
    def trained_classifier(self) -> Trained:
        model = LinenClassifier(max_steps=15)
        x, y = image_batch()
        params = self.init(model, x)
        tx = optax.adam(3e-2)
        opt_state = tx.init(params)

        @jax.jit
        def train_step(params, opt_state):
            def loss_fn(params):
                logits, state = model.apply({"params": params}, x, mutable=["intermediates"])
                return cross_entropy(logits, y), state["intermediates"]
            (loss, inter), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state)
            return optax.apply_updates(params, updates), opt_state, loss, grads, inter

        losses = []
        for _ in range(8):
            params, opt_state, loss, grads, inter = train_step(params, opt_state)
            losses.append(float(loss))
        (stats,) = inter["DEQ_0"]["stats"]
        return Trained(params, losses, grads, grads["DEQ_0"]["cell"], stats)


NNX = _NNX()
LINEN = _Linen()
APIS = [pytest.param(NNX, id="nnx"), pytest.param(LINEN, id="linen")]

"""deq.linen.DEQ: training, gradients, NNX parity, stats, checkpoints, stateful cells.

Layers are applied through a few module-level jitted functions with the module as a static
argument, so tests with equal layers share their compilations.
"""

from functools import lru_cache, partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers_layers import (
    LinenClassifier,
    check_directional_derivatives,
    cross_entropy,
    image_batch,
    randn,
    tight,
    to_float64,
    unrolled,
)

import deq
import deq.cells
import deq.linen
import deq.nnx
from deq.cells import linen as linen_cells
from deq.cells import nnx as nnx_cells


@partial(jax.jit, static_argnums=0)
def _forward(layer, params, x):
    """``(z, stats)`` of a layer (or model) holding one DEQ layer at the top level."""
    z, state = layer.apply({"params": params}, x, mutable=["intermediates"])
    return z, state["intermediates"]["deq_stats"][0]


@partial(jax.jit, static_argnums=0)
def _grads(layer, params, x, c, probe):
    """Gradients of ``sum(c * layer(x))`` w.r.t. the parameters, ``x`` and the stats probe."""
    loss = lambda p, x, probe: jnp.sum(c * layer.apply({"params": p}, x, probe=probe))
    return jax.grad(loss, argnums=(0, 1, 2))(params, x, probe)


def _init(layer, x):
    """Initial parameters (a fresh copy: tests may edit them)."""
    params = _init_cached(layer, x.shape, x.dtype)
    return jax.tree_util.tree_map(lambda p: p, params)


@lru_cache
def _init_cached(layer, shape, dtype):
    # Linen's init runs a full forward solve: compile it once per layer and input shape.
    return jax.jit(layer.init)(jax.random.key(0), jnp.ones(shape, dtype))["params"]


def _mlp(dtype=jnp.float32, **options):
    layer = deq.linen.DEQ(cell=linen_cells.MLPCell(4, norm=True), **options)
    x, c = randn((2, 3), 1, dtype), randn((2, 4), 2, dtype)
    params = _init(layer, randn((2, 3), 1))
    return layer, (to_float64(params) if dtype == jnp.float64 else params), x, c


def test_classifier_trains_with_optax():
    model = LinenClassifier(max_steps=15)
    x, y = image_batch()
    params = _init(model, x)
    assert set(params["DEQ_0"]) == {"cell"}  # the cell's parameters live under the layer
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
    assert losses[-1] < 0.7 * losses[0], losses
    for g in jax.tree_util.tree_leaves(grads["DEQ_0"]["cell"]):
        assert float(jnp.max(jnp.abs(g))) > 0
    (stats,) = inter["DEQ_0"]["deq_stats"]
    assert isinstance(stats, deq.linen.LayerStats)
    assert 1 <= int(stats.num_steps) <= 15 and stats.abs_trace.shape == (15,)


def test_parameter_gradients_match_finite_differences():
    # The MDEQ cell's gradients are checked in the NNX tests and tied to these by the parity
    # test below.
    with jax.enable_x64(True):
        layer, params, x, c = _mlp(jnp.float64, **tight())
        grads, _, _ = _grads(layer, params, x, c, deq.backward_stats_probe())
        loss = lambda p: jnp.sum(c * _forward(layer, p, x)[0])
        check_directional_derivatives(loss, grads, params)


def test_gradients_match_long_unrolled_run():
    with jax.enable_x64(True):
        layer, params, x, c = _mlp(jnp.float64, **tight())
        ref = layer.clone(**unrolled())
        g, gx, _ = _grads(layer, params, x, c, deq.backward_stats_probe())
        g_ref, gx_ref, _ = _grads(ref, params, x, c, deq.backward_stats_probe())
        assert int(_forward(ref, params, x)[1].result) == deq.RESULTS.SUCCESSFUL
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(gx, gx_ref, rtol=1e-6, atol=1e-9)


def test_backward_stats_probe_reaches_the_implicit_solve():
    with jax.enable_x64(True):
        layer, params, x, c = _mlp(jnp.float64, **tight())
        _, _, probe_grad = _grads(layer, params, x, c, deq.backward_stats_probe())
    back = deq.backward_stats(probe_grad)
    assert int(back.num_steps) > 0 and bool(back.converged)


def test_nnx_and_linen_layers_with_the_same_weights_agree():
    # The MDEQ cell (convolutions, GroupNorm, weight norm); deq.cells' tests cover the others.
    cell, x = nnx_cells.MDEQCell(1, 2, num_groups=1, rngs=nnx.Rngs(0)), randn((2, 3, 3, 1), 1)
    cell.norm2["scale"][...] = jnp.full((2,), 0.3)
    linen_layer = deq.linen.DEQ(cell=linen_cells.MDEQCell(2, num_groups=1))
    nnx_layer = deq.nnx.DEQ(cell)
    params = deq.cells.to_linen_params(nnx_layer)  # {"cell": {...}}, the Linen layout
    shapes = lambda t: jax.tree_util.tree_map(jnp.shape, t)
    expected = jax.eval_shape(linen_layer.init, jax.random.key(0), x)["params"]
    assert shapes(params) == shapes(expected)

    c = randn(cell.state_shape(x.shape), 2)
    # One compiled function per framework: value, gradients and stats together.
    def linen_loss(p, x):
        z, state = linen_layer.apply({"params": p}, x, mutable=["intermediates"])
        return jnp.sum(c * z), (z, state["intermediates"]["deq_stats"][0])

    (_, (z_linen, stats)), (g_linen, gx_linen) = jax.jit(
        jax.value_and_grad(linen_loss, argnums=(0, 1), has_aux=True))(params, x)

    def loss(m, x):
        z = m(x)
        return jnp.sum(c * z), z

    (_, z_nnx), (g_nnx, gx_nnx) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1),
                                                             has_aux=True))(nnx_layer, x)
    np.testing.assert_allclose(z_linen, z_nnx, rtol=1e-5, atol=1e-6)
    assert int(stats.num_steps) == int(nnx_layer.stats.get_value().num_steps)
    for a, b in zip(jax.tree_util.tree_leaves(g_linen),
                    jax.tree_util.tree_leaves(nnx.to_pure_dict(g_nnx)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gx_linen, gx_nnx, rtol=1e-4, atol=1e-6)


def test_stats_are_sown_with_fixed_shapes_under_jit():
    layer, params, x, _ = _mlp()
    z, stats = _forward(layer, params, x)
    assert isinstance(stats, deq.linen.LayerStats)
    assert bool(stats.converged) and int(stats.num_steps) > 1
    assert stats.abs_trace.shape == (layer.max_steps,) and stats.abs_residual.shape == ()
    cell = linen_cells.MLPCell(4, norm=True)
    residual = jnp.linalg.norm(cell.apply({"params": params["cell"]}, z, x) - z, axis=1)
    np.testing.assert_allclose(stats.abs_residual, jnp.max(residual), rtol=0.1, atol=1e-6)
    # Without a mutable "intermediates" nothing is sown and the output is just z.
    out = jax.eval_shape(layer.apply, {"params": params}, x)
    assert out.shape == z.shape


def test_jacobian_penalty_is_sown_when_losses_are_mutable():
    layer, params, x, _ = _mlp(jac_reg_samples=2)

    @jax.jit
    def penalty(params, key):
        _, state = layer.apply({"params": params}, x, rngs={"jac_reg": key}, mutable=["losses"])
        return sum(jax.tree_util.tree_leaves(state["losses"]))

    first = penalty(params, jax.random.key(1))
    assert float(first) > 0
    assert float(penalty(params, jax.random.key(2))) != float(first)
    grads = jax.jit(jax.grad(penalty))(params, jax.random.key(1))
    assert float(jnp.max(jnp.abs(grads["cell"]["W"]["kernel"]))) > 0
    # Not asked for: not computed, and no rng needed (shapes suffice to see that).
    _, state = jax.eval_shape(partial(layer.apply, mutable=["intermediates"]), {"params": params},
                              x)
    assert "losses" not in state


def test_unbatched_layer_under_vmap_matches_batched_layer():
    layer, params, x, _ = _mlp()
    single = layer.clone(batched=False)
    z_vmap = jax.jit(jax.vmap(lambda xi: single.apply({"params": params}, xi)))(x)
    np.testing.assert_allclose(z_vmap, _forward(layer, params, x)[0], rtol=1e-4, atol=1e-5)


def test_orbax_round_trip_gives_identical_outputs(tmp_path):
    layer, params, x, _ = _mlp()
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * randn(p.shape, 5), params)
    expected, _ = _forward(layer, params, x)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", params)
    checkpointer.wait_until_finished()
    abstract = jax.eval_shape(lambda: _init(layer, x))
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    np.testing.assert_array_equal(_forward(layer, restored, x)[0], expected)


class _Setup(nn.Module):
    def setup(self):
        self.deq = deq.linen.DEQ(cell=linen_cells.MLPCell(4))
        self.head = nn.Dense(2)

    def __call__(self, x):
        return self.head(self.deq(x))


class _Compact(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(deq.linen.DEQ(cell=linen_cells.MLPCell(4))(x))


@pytest.mark.parametrize("model, path", [(_Setup(), "deq"), (_Compact(), "DEQ_0")])
def test_cell_parameters_live_under_the_layer_in_setup_and_compact_models(model, path):
    x = randn((2, 3), 1)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert set(params[path]) == {"cell"} and set(params[path]["cell"]) == {"W", "U"}
    assert not any(k.startswith("MLPCell") for k in params)


class _StatefulCell(nn.Module):
    make: str

    @nn.compact
    def __call__(self, z, x):
        h = nn.Dense(3)(z) + x
        if self.make == "batchnorm":
            return nn.BatchNorm(use_running_average=False)(h)
        if self.make == "dropout":
            return nn.Dropout(0.1, deterministic=True)(h)
        if self.make == "spectralnorm":
            return nn.SpectralNorm(nn.Dense(3))(h, update_stats=False)
        self.variable("cache", "last", lambda: h)
        return jnp.tanh(h)


@pytest.mark.parametrize("make, name", [
    ("batchnorm", "nn.BatchNorm at 'DEQ/cell/BatchNorm_0'"),
    ("dropout", "nn.Dropout at 'DEQ/cell/Dropout_0'"),
    ("spectralnorm", "nn.SpectralNorm at 'DEQ/cell/SpectralNorm_0'"),
    ("variable", "'cache' variable collection at 'cache: cell/last'"),
])
def test_stateful_layers_in_the_cell_are_rejected_by_name(make, name):
    layer = deq.linen.DEQ(cell=_StatefulCell(make))
    with pytest.raises(ValueError, match="cannot be used inside a fixed-point solve") as err:
        layer.init(jax.random.key(0), jnp.ones((2, 3)))
    assert name in str(err.value)


@pytest.mark.parametrize("z_init", ["inject", lambda x: jnp.ones((*x.shape[:-1], 4))],
                         ids=["method", "callable"])
def test_starting_points_reach_the_same_fixed_point(z_init):
    layer, params, x, _ = _mlp()
    other = layer.clone(z_init=z_init)
    np.testing.assert_allclose(_forward(other, params, x)[0], _forward(layer, params, x)[0],
                               rtol=1e-3, atol=1e-3)


def test_options_are_validated_at_construction():
    cell = linen_cells.MLPCell(4)
    with pytest.raises(TypeError, match="z_init"):
        deq.linen.DEQ(cell=cell, z_init=3)
    with pytest.raises(ValueError, match="max_steps"):
        deq.linen.DEQ(cell=cell, max_steps=0)
    with pytest.raises(TypeError, match="adjoint"):
        deq.linen.DEQ(cell=cell, adjoint=deq.Anderson())
    with pytest.raises(ValueError, match="jac_reg_batch"):
        deq.linen.DEQ(cell=cell, jac_reg_batch=0)
    with pytest.raises(TypeError, match="flax.linen Module"):
        deq.linen.DEQ(cell=lambda z, x: z)
    with pytest.raises(AttributeError, match="no method"):
        deq.linen.DEQ(cell=cell, z_init="nonexistent").init(jax.random.key(0), jnp.ones((2, 3)))

"""deq.nnx.DEQ: training, gradients, stats, checkpoints, stateful cells, regularisation.

Compilation dominates the cost of these tests on CPU, so layers are called through a few
module-level jitted functions: layers of the same structure share their compilations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers_layers import (
    NNXClassifier,
    check_directional_derivatives,
    cross_entropy,
    image_batch,
    randn,
    tight,
    to_float64,
    unrolled,
)

import deq
import deq.nnx
from deq.cells.nnx import MDEQCell, MLPCell
from deq.regularization import jacobian_regularization

_forward = nnx.jit(lambda m, x: m(x))


@nnx.jit
def _grads(m, x, c, probe):
    """Gradients of ``sum(c * m(x))`` w.r.t. the parameters, ``x`` and the stats probe."""
    loss = lambda m, x, probe: jnp.sum(c * m(x, probe=probe))
    return nnx.grad(loss, argnums=(0, 1, 2))(m, x, probe)


def _cast(layer, dtype):
    if dtype == jnp.float64:
        nnx.update(layer, to_float64(nnx.state(layer, nnx.Param)))
    return layer


def _mlp_layer(dtype=jnp.float32, **options):
    cell = _cast(MLPCell(3, 4, norm=True, rngs=nnx.Rngs(0)), dtype)
    return deq.nnx.DEQ(cell, **options), randn((2, 3), 1, dtype), randn((2, 4), 2, dtype)


def _mdeq_layer(dtype=jnp.float32, **options):
    cell = MDEQCell(1, 2, num_groups=1, rngs=nnx.Rngs(0))
    # Switch the residual branch on (it starts at zero gain) so that every parameter matters.
    cell.norm2["scale"][...] = jnp.full((2,), 0.2)
    cell = _cast(cell, dtype)
    x, c = randn((2, 3, 3, 1), 1, dtype), randn((2, 3, 3, 2), 2, dtype)
    return deq.nnx.DEQ(cell, **options), x, c


def _param_grads(layer, x, c):
    g, _, _ = _grads(layer, x, c, deq.backward_stats_probe())
    return nnx.to_pure_dict(g)


def test_classifier_trains_with_optax_and_stats_are_not_trained():
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
    assert losses[-1] < 0.7 * losses[0], losses
    # Gradients (and the optimiser) cover parameters only; every cell parameter gets some.
    assert not jax.tree_util.tree_leaves(nnx.state(grads, deq.nnx.DEQStats))
    for g in jax.tree_util.tree_leaves(nnx.to_pure_dict(grads["deq"]["cell"])):
        assert float(jnp.max(jnp.abs(g))) > 0
    stats = model.deq.stats.get_value()
    assert isinstance(stats, deq.nnx.LayerStats)
    assert 1 <= int(stats.num_steps) <= 15 and stats.abs_trace.shape == (15,)


@pytest.mark.parametrize("make", [_mlp_layer, _mdeq_layer], ids=["mlp", "mdeq"])
def test_parameter_gradients_match_finite_differences(make):
    with jax.enable_x64(True):
        layer, x, c = make(jnp.float64, **tight())
        graphdef, _, rest = nnx.split(layer, nnx.Param, ...)
        params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))

        def loss(p):
            state = nnx.state(layer, nnx.Param)
            nnx.replace_by_pure_dict(state, p)
            return jnp.sum(c * _forward(nnx.merge(graphdef, state, rest, copy=True), x))

        check_directional_derivatives(loss, _param_grads(layer, x, c), params)


def test_gradients_match_long_unrolled_run():
    # The layer adds nothing cell-specific to the gradient: one cell suffices here.
    with jax.enable_x64(True):
        layer, x, c = _mlp_layer(jnp.float64, **tight())
        ref, _, _ = _mlp_layer(jnp.float64, **unrolled())
        g, gx, _ = _grads(layer, x, c, deq.backward_stats_probe())
        g_ref, gx_ref, _ = _grads(ref, x, c, deq.backward_stats_probe())
        _forward(ref, x)
        assert int(ref.stats.get_value().result) == deq.RESULTS.SUCCESSFUL
        for a, b in zip(jax.tree_util.tree_leaves(nnx.to_pure_dict(g)),
                        jax.tree_util.tree_leaves(nnx.to_pure_dict(g_ref)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        # Gradients also reach x (the stem, in a model).
        np.testing.assert_allclose(gx, gx_ref, rtol=1e-6, atol=1e-9)


def test_backward_stats_probe_reaches_the_implicit_solve():
    with jax.enable_x64(True):
        layer, x, c = _mlp_layer(jnp.float64, **tight())
        _, _, probe_grad = _grads(layer, x, c, deq.backward_stats_probe())
    back = deq.backward_stats(probe_grad)
    assert int(back.num_steps) > 0 and bool(back.converged)


def test_stats_are_set_under_jit_with_fixed_shapes_and_are_not_params():
    layer, x, _ = _mlp_layer()
    before = jax.tree_util.tree_map(jnp.shape, layer.stats.get_value())
    assert int(layer.stats.get_value().num_steps) == 0
    z = _forward(layer, x)
    stats = layer.stats.get_value()
    assert isinstance(stats, deq.nnx.LayerStats)
    assert jax.tree_util.tree_map(jnp.shape, stats) == before  # no recompilation next time
    assert bool(stats.converged) and int(stats.num_steps) > 1
    residual = jnp.linalg.norm(layer.cell(z, x) - z, axis=1)
    np.testing.assert_allclose(stats.abs_residual, jnp.max(residual), rtol=0.1, atol=1e-6)
    assert "steps=" in stats.summary()
    is_var = lambda v: isinstance(v, nnx.Variable)
    params = jax.tree_util.tree_leaves(nnx.state(layer, nnx.Param), is_leaf=is_var)
    assert params and all(type(v) is nnx.Param for v in params)


def test_unbatched_layer_under_vmap_matches_batched_layer():
    layer, x, _ = _mlp_layer()
    single = deq.nnx.DEQ(layer.cell, batched=False)
    graphdef, state = nnx.split(single)
    z_vmap = jax.jit(jax.vmap(lambda xi: nnx.merge(graphdef, state, copy=True)(xi)))(x)
    np.testing.assert_allclose(z_vmap, _forward(layer, x), rtol=1e-4, atol=1e-5)


def test_orbax_round_trip_gives_identical_outputs(tmp_path):
    layer, x, _ = _mlp_layer()
    # Move away from the initialisation so that a restore from it would be noticed.
    params = nnx.state(layer, nnx.Param)
    nnx.update(layer, jax.tree_util.tree_map(lambda p: p + 0.1 * randn(p.shape, 5), params))
    expected = _forward(layer, x)

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", nnx.state(layer, nnx.Param))
    checkpointer.wait_until_finished()

    abstract = nnx.eval_shape(lambda: _mlp_layer()[0])
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "ckpt", abstract_params), rest)
    np.testing.assert_array_equal(_forward(restored, x), expected)


class _Wrap(nnx.Module):
    def __init__(self, make, rngs):
        self.lin = nnx.Linear(3, 3, rngs=rngs)
        self.inner = make(rngs)

    def __call__(self, z, x):
        return self.inner(self.lin(z) + x)


@pytest.mark.parametrize("make, name", [
    (lambda r: nnx.BatchNorm(3, rngs=r), "nnx.BatchNorm at 'inner'"),
    (lambda r: nnx.Dropout(0.1, rngs=r), "nnx.Dropout at 'inner'"),
    (lambda r: nnx.Dropout(0.1, deterministic=True), "nnx.Dropout at 'inner'"),
    (lambda r: nnx.SpectralNorm(nnx.Linear(3, 3, rngs=r), rngs=r), "nnx.SpectralNorm at 'inner'"),
])
def test_stateful_layers_in_the_cell_are_rejected_by_name(make, name):
    with pytest.raises(ValueError, match="GroupNorm|outside the DEQ|weight normalisation") as err:
        deq.nnx.DEQ(_Wrap(make, nnx.Rngs(0)))
    assert name in str(err.value)


def test_cell_replaced_after_construction_is_checked_at_call():
    layer, x, _ = _mlp_layer()
    layer.cell = _Wrap(lambda r: nnx.BatchNorm(3, rngs=r), nnx.Rngs(0))
    with pytest.raises(ValueError, match="nnx.BatchNorm"):
        layer(jnp.ones((2, 3)))


def test_jacobian_penalty_is_stored_differentiable_and_off_in_eval():
    # jac_reg_batch=1: the penalty is taken on the first sample of the batch only.
    layer, x, _ = _mlp_layer(jac_reg_samples=2, jac_reg_batch=1, rngs=nnx.Rngs(3))
    key = jax.random.key(7)
    z = nnx.jit(lambda m, x, key: m(x, rngs=key))(layer, x, key)
    graphdef, state = nnx.split(layer.cell)
    fn = lambda z, a: nnx.merge(graphdef, a[0])(z, a[1])
    expected = jax.jit(lambda z, a: jacobian_regularization(fn, z, a, key, 2))(
        z[:1], (state, x[:1])
    )
    np.testing.assert_allclose(layer.jac_loss[...], expected, rtol=1e-5)

    @nnx.jit
    def penalty_and_grad(model, x):
        def loss(model):
            model(x)
            return model.jac_loss[...]
        return nnx.value_and_grad(loss)(model)

    first, grads = penalty_and_grad(layer, x)
    assert float(first) > 0 and float(first) == float(layer.jac_loss[...])
    assert float(jnp.max(jnp.abs(grads["cell"]["W"]["kernel"][...]))) > 0
    # The layer's own stream draws new probes on every call.
    second, _ = penalty_and_grad(layer, x)
    assert float(second) != float(first)
    layer.eval()
    assert layer.deterministic
    _forward(layer, x)
    assert float(layer.jac_loss[...]) == 0.0


def test_jacobian_penalty_needs_rngs():
    cell = MLPCell(3, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rngs"):
        deq.nnx.DEQ(cell, jac_reg_samples=1)


@pytest.mark.parametrize("z_init", ["inject", lambda x: jnp.ones((*x.shape[:-1], 4))],
                         ids=["method", "callable"])
def test_starting_points_reach_the_same_fixed_point(z_init):
    layer, x, _ = _mlp_layer()
    other = deq.nnx.DEQ(layer.cell, z_init=z_init)
    # Same fixed point within the default tolerance (rtol 1e-4 on |f(z) - z|).
    np.testing.assert_allclose(_forward(other, x), _forward(layer, x), rtol=1e-3, atol=1e-3)


def test_options_are_validated_at_construction():
    cell = MLPCell(3, 4, rngs=nnx.Rngs(0))
    with pytest.raises(AttributeError, match="no method"):
        deq.nnx.DEQ(cell, z_init="nonexistent")
    with pytest.raises(TypeError, match="z_init"):
        deq.nnx.DEQ(cell, z_init=3)
    with pytest.raises(ValueError, match="max_steps"):
        deq.nnx.DEQ(cell, max_steps=0)
    with pytest.raises(TypeError, match="solver"):
        deq.nnx.DEQ(cell, solver=deq.ImplicitAdjoint())
    with pytest.raises(ValueError, match="jac_reg_samples"):
        deq.nnx.DEQ(cell, jac_reg_samples=-1)
    with pytest.raises(ValueError, match="jac_reg_batch needs batched=True"):
        deq.nnx.DEQ(cell, jac_reg_samples=1, jac_reg_batch=1, batched=False, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="nnx.Module"):
        deq.nnx.DEQ(lambda z, x: z)

"""What only deq.nnx.DEQ has: stats and the Jacobian penalty held in variables, ``model.eval()``,
``rngs``, options checked at construction. The behaviour both layers share is tested once for
both in test_layers.py; the faults a user meets, in test_layers_faults.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_layers import NNX

import deq
import deq.nnx
from deq.cells.nnx import MLPCell
from deq.regularization import jacobian_regularization


def test_optimizer_gradients_leave_the_stats_variable_alone():
    # Gradients (and the optimiser) cover parameters only.
    grads = NNX.trained_classifier().grads
    assert not jax.tree_util.tree_leaves(nnx.state(grads, deq.nnx.DEQStats))


def test_stats_exist_before_the_first_call_in_their_final_shapes_and_are_not_params():
    layer, x, _ = NNX.mlp()
    before = jax.tree_util.tree_map(jnp.shape, layer.stats.get_value())
    assert int(layer.stats.get_value().num_steps) == 0
    NNX.forward(layer, x)
    assert jax.tree_util.tree_map(jnp.shape, layer.stats.get_value()) == before
    is_var = lambda v: isinstance(v, nnx.Variable)
    params = jax.tree_util.tree_leaves(nnx.state(layer, nnx.Param), is_leaf=is_var)
    assert params and all(type(v) is nnx.Param for v in params)
    # The traces are as long as the longest budget, training or evaluation.
    # (Both budgets are doubled by the default Broyden fallbacks, in training and in
    # evaluation; a solver passed by the user is used as given.)
    other = NNX.clone(layer, max_steps=2, eval_max_steps=40)
    assert other.stats.get_value().abs_trace.shape == (80,)
    other = NNX.clone(layer, max_steps=50, eval_max_steps=40, eval_solver=deq.Anderson())
    assert other.stats.get_value().abs_trace.shape == (100,)
    other = NNX.clone(layer, max_steps=50, eval_max_steps=40, eval_solver=deq.Anderson(),
                      solver=deq.Anderson())
    assert other.stats.get_value().abs_trace.shape == (50,)


def test_jacobian_penalty_value_is_stored_and_off_in_eval():
    # jac_reg_batch=1: the penalty is taken on the first sample of the batch only.
    layer, x = NNX.with_penalty()
    key = jax.random.key(7)
    z = nnx.jit(lambda m, x, key: m(x, rngs=key))(layer, x, key)
    graphdef, state = nnx.split(layer.cell)
    fn = lambda z, a: nnx.merge(graphdef, a[0])(z, a[1])
    expected = jax.jit(lambda z, a: jacobian_regularization(fn, z, a, key, 2))(
        z[:1], (state, x[:1])
    )
    np.testing.assert_allclose(layer.jac_loss[...], expected, rtol=1e-5)
    first, _ = NNX.penalty_and_grad(layer, x, seed=None)
    assert float(first) == float(layer.jac_loss[...])
    layer.eval()
    assert layer.deterministic
    NNX.forward(layer, x)
    assert float(layer.jac_loss[...]) == 0.0


def test_jacobian_penalty_without_rngs_draws_probes_from_the_input():
    cell = MLPCell(3, 4, rngs=nnx.Rngs(0))
    layer = deq.nnx.DEQ(cell, jac_reg_weight=1.0)  # the stabiliser is on by default
    assert layer.rngs is None  # no random state to checkpoint
    x = jnp.ones((2, 3))
    layer(x)
    first = float(layer.jac_loss[...])
    layer(x)
    assert float(layer.jac_loss[...]) == first > 0  # same input, same probes
    layer(2 * x)
    assert float(layer.jac_loss[...]) != first
    with pytest.raises(TypeError, match="rngs"):
        deq.nnx.DEQ(cell, rngs=0)


def test_z_init_naming_no_method_fails_at_construction():
    with pytest.raises(AttributeError, match="no method"):
        deq.nnx.DEQ(MLPCell(3, 4, rngs=nnx.Rngs(0)), z_init="nonexistent")

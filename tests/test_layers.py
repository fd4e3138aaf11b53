"""deq.nnx.DEQ and deq.linen.DEQ, one suite for both: training, gradients, stats, checkpoints,
regularisation, options; and the two layers agreeing with the same weights.

Each test takes an ``api`` adapter (``helpers_layers.NNX`` or ``LINEN``); what only one API
has is tested in test_nnx.py and test_linen.py. The adapters call the layers through a few
module-level jitted functions, so layers of the same structure share their compilations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers_layers import (
    APIS,
    LINEN,
    NNX,
    check_directional_derivatives,
    perturbed,
    randn,
    tight,
    unrolled,
)

import deq
import deq.cells
import deq.linen
import deq.nnx
from deq._layer_common import trace_length
from deq.cells import linen as linen_cells
from deq.cells import nnx as nnx_cells

leaves = jax.tree_util.tree_leaves


@pytest.mark.parametrize("api", APIS)
def test_classifier_trains_with_optax(api):
    run = api.trained_classifier()
    assert run.losses[-1] < 0.7 * run.losses[0], run.losses
    # Every cell parameter gets some gradient.
    for g in leaves(run.cell_grads):
        assert float(jnp.max(jnp.abs(g))) > 0
    assert isinstance(run.stats, api.lib.LayerStats)
    assert 1 <= int(run.stats.num_steps) <= 15
    # Traces as long as the longest budget: evaluation's (100) with its Broyden fallback.
    assert run.stats.abs_trace.shape == (200,)


# The MDEQ cell's gradients are checked with NNX, and tied to Linen's by the parity test below.
@pytest.mark.parametrize("api, cell", [
    pytest.param(NNX, "mlp", id="nnx-mlp"),
    pytest.param(NNX, "mdeq", id="nnx-mdeq"),
    pytest.param(LINEN, "mlp", id="linen-mlp"),
])
@pytest.mark.usefixtures("x64")
def test_parameter_gradients_match_finite_differences(api, cell):
    h, x, c = getattr(api, cell)(jnp.float64, **tight())
    grads, _, _ = api.grads(h, x, c)
    loss = lambda p: jnp.sum(c * api.forward(api.with_params(h, p), x)[0])
    check_directional_derivatives(loss, grads, api.params(h))


@pytest.mark.parametrize("api", APIS)
@pytest.mark.usefixtures("x64")
def test_gradients_match_long_unrolled_run(api):
    # The layer adds nothing cell-specific to the gradient: one cell suffices here.
    h, x, c = api.mlp(jnp.float64, **tight())
    ref = api.clone(h, **unrolled())
    g, gx, _ = api.grads(h, x, c)
    g_ref, gx_ref, _ = api.grads(ref, x, c)
    assert int(api.forward(ref, x)[1].result) == deq.RESULTS.SUCCESSFUL
    for a, b in zip(leaves(g), leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    # Gradients also reach x (the stem, in a model).
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("api", APIS)
def test_backward_stats_probe_reaches_the_implicit_solve(api):
    with jax.enable_x64(True):
        h, x, c = api.mlp(jnp.float64, **tight())
        _, _, probe_grad = api.grads(h, x, c)
    back = deq.backward_stats(probe_grad)
    assert int(back.num_steps) > 0 and bool(back.converged)


@pytest.mark.parametrize("api", APIS)
def test_stats_have_fixed_shapes_under_jit_and_match_the_residual(api):
    h, x, _ = api.mlp()
    z, stats = api.forward(h, x)
    assert isinstance(stats, api.lib.LayerStats)
    assert bool(stats.converged) and int(stats.num_steps) > 1
    assert stats.abs_trace.shape == (trace_length(api.module(h)),)
    assert stats.abs_residual.shape == ()
    residual = jnp.linalg.norm(api.cell_apply(h, z, x) - z, axis=1)
    np.testing.assert_allclose(stats.abs_residual, jnp.max(residual), rtol=0.1, atol=1e-6)
    assert "steps=" in stats.summary()


@pytest.mark.parametrize("api", APIS)
def test_unbatched_layer_under_vmap_matches_batched_layer(api):
    h, x, _ = api.mlp()
    fn, state = api.pure(api.clone(h, batched=False))
    z_vmap = jax.jit(jax.vmap(lambda xi: fn(state, xi)))(x)
    np.testing.assert_allclose(z_vmap, api.forward(h, x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("api", APIS)
def test_orbax_round_trip_gives_identical_outputs(api, tmp_path):
    h, x, _ = api.mlp()
    h = api.with_params(h, perturbed(api.params(h)))
    expected, _ = api.forward(h, x)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", api.checkpoint(h))
    checkpointer.wait_until_finished()
    restored = api.restore_mlp(checkpointer, tmp_path / "ckpt")
    np.testing.assert_array_equal(api.forward(restored, x)[0], expected)


@pytest.mark.parametrize("api", APIS)
def test_jacobian_penalty_is_positive_differentiable_and_redrawn(api):
    h, x = api.with_penalty()
    first, grads = api.penalty_and_grad(h, x, seed=1)
    assert float(first) > 0
    assert float(jnp.max(jnp.abs(grads["cell"]["W"]["kernel"]))) > 0
    # New probes on every call (NNX: from the layer's own stream; Linen: from the rng given).
    second, _ = api.penalty_and_grad(h, x, seed=2)
    assert float(second) != float(first)


@pytest.mark.parametrize("z_init", ["inject", lambda x: jnp.ones((*x.shape[:-1], 4))],
                         ids=["method", "callable"])
@pytest.mark.parametrize("api", APIS)
def test_starting_points_reach_the_same_fixed_point(api, z_init):
    h, x, _ = api.mlp()
    other = api.clone(h, z_init=z_init)
    # Same fixed point within the default tolerance (rtol 1e-4 on |f(z) - z|).
    np.testing.assert_allclose(api.forward(other, x)[0], api.forward(h, x)[0],
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("api", APIS)
def test_options_are_validated_at_construction(api):
    for options, error, match in [
        (dict(z_init=3), TypeError, "z_init"),
        (dict(max_steps=0), ValueError, "max_steps"),
        (dict(solver=deq.ImplicitAdjoint()), TypeError, "solver"),
        (dict(adjoint=deq.Anderson()), TypeError, "adjoint"),
        (dict(jac_reg_samples=-1), ValueError, "jac_reg_samples"),
        (dict(jac_reg_batch=0), ValueError, "jac_reg_batch"),
        (dict(jac_reg_weight="often"), ValueError, "jac_reg_weight"),
    ]:
        with pytest.raises(error, match=match):
            api.layer(**options)
    with pytest.raises(TypeError, match=api.module_type):
        api.layer(lambda z, x: z)
    # NNX finds a z_init that names no method at construction (test_nnx.py), Linen at init.
    with pytest.raises(AttributeError, match="no method"):
        api.start(api.layer(z_init="nonexistent"), jnp.ones((2, 3)))


def test_nnx_and_linen_layers_with_the_same_weights_agree():
    # The MDEQ cell (convolutions, GroupNorm, weight norm); deq.cells' tests cover the others.
    cell, x = nnx_cells.MDEQCell(1, 2, num_groups=1, rngs=nnx.Rngs(0)), randn((2, 3, 3, 1), 1)
    cell.norm2["scale"][...] = jnp.full((2,), 0.3)
    # Without the stabiliser, whose probes are drawn differently (test_equilibrium.py).
    linen_layer = deq.linen.DEQ(cell=linen_cells.MDEQCell(2, num_groups=1), jac_reg_samples=0)
    nnx_layer = deq.nnx.DEQ(cell, jac_reg_samples=0)
    params = deq.cells.to_linen_params(nnx_layer)  # {"cell": {...}}, the Linen layout
    shapes = lambda t: jax.tree_util.tree_map(jnp.shape, t)
    expected = jax.eval_shape(linen_layer.init, jax.random.key(0), x)["params"]
    assert shapes(params) == shapes(expected)

    c = randn(cell.state_shape(x.shape), 2)
    # One compiled function per framework: value, gradients and stats together.
    def linen_loss(p, x):
        z, state = linen_layer.apply({"params": p}, x, mutable=["intermediates"])
        return jnp.sum(c * z), (z, state["intermediates"]["stats"][0])

    (_, (z_linen, stats)), (g_linen, gx_linen) = jax.jit(
        jax.value_and_grad(linen_loss, argnums=(0, 1), has_aux=True))(params, x)

    def loss(m, x):
        z = m(x)
        return jnp.sum(c * z), z

    (_, z_nnx), (g_nnx, gx_nnx) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1),
                                                             has_aux=True))(nnx_layer, x)
    np.testing.assert_allclose(z_linen, z_nnx, rtol=1e-5, atol=1e-6)
    assert int(stats.num_steps) == int(nnx_layer.stats.get_value().num_steps)
    for a, b in zip(leaves(g_linen), leaves(nnx.to_pure_dict(g_nnx)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gx_linen, gx_nnx, rtol=1e-4, atol=1e-6)

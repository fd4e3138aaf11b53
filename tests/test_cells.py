"""deq.cells: one parameter layout and one forward math for NNX and Linen; reference checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_layers import randn

import deq.cells
import deq.nnx
from deq.cells import _functional as F
from deq.cells import linen as linen_cells
from deq.cells import nnx as nnx_cells

# (NNX constructor, Linen module, x shape, z shape)
CELLS = {
    "mlp": (lambda r: nnx_cells.MLPCell(3, 4, rngs=r), linen_cells.MLPCell(4), (2, 3), (2, 4)),
    "mlp-norm-wn": (
        lambda r: nnx_cells.MLPCell(3, 4, norm=True, weight_norm=True, activation=nn.relu,
                                    rngs=r),
        linen_cells.MLPCell(4, norm=True, weight_norm=True, activation=nn.relu),
        (2, 3), (2, 4),
    ),
    "mdeq": (
        lambda r: nnx_cells.MDEQCell(1, 4, hidden_channels=6, num_groups=2, rngs=r),
        linen_cells.MDEQCell(4, hidden_channels=6, num_groups=2),
        (2, 5, 5, 1), (2, 5, 5, 4),
    ),
    "mdeq-no-wn": (
        lambda r: nnx_cells.MDEQCell(1, 4, num_groups=2, weight_norm=False, rngs=r),
        linen_cells.MDEQCell(4, num_groups=2, weight_norm=False),
        (2, 5, 5, 1), (2, 5, 5, 4),
    ),
}

_shapes = lambda tree: jax.tree_util.tree_map(jnp.shape, tree)


@pytest.mark.parametrize("name", list(CELLS))
def test_nnx_and_linen_cells_have_the_same_parameter_layout(name):
    make_nnx, linen_cell, xs, zs = CELLS[name]
    nnx_cell = nnx.eval_shape(lambda: make_nnx(nnx.Rngs(0)))  # shapes only, no computation
    linen_params = jax.eval_shape(linen_cell.init, jax.random.key(0), jnp.ones(zs),
                                  jnp.ones(xs))["params"]
    assert _shapes(deq.cells.to_linen_params(nnx_cell)) == _shapes(linen_params)
    assert nnx_cell.state_shape(xs) == linen_cell.state_shape(xs) == zs


@pytest.mark.parametrize("name", ["mlp-norm-wn", "mdeq"])
def test_nnx_and_linen_cells_with_the_same_weights_compute_the_same_function(name):
    make_nnx, linen_cell, xs, zs = CELLS[name]
    nnx_cell = make_nnx(nnx.Rngs(0))
    if hasattr(nnx_cell, "norm2"):  # switch the residual branch on (zero gain at init)
        nnx_cell.norm2["scale"][...] = jnp.full((4,), 0.5)
    params = deq.cells.to_linen_params(nnx_cell)
    z, x = randn(zs, 1), randn(xs, 2)
    out_nnx = nnx.jit(lambda m, z, x: (m(z, x), m.inject(x)))(nnx_cell, z, x)
    out_linen = jax.jit(lambda p, z, x: (
        linen_cell.apply({"params": p}, z, x),
        linen_cell.apply({"params": p}, x, method="inject"),
    ))(params, z, x)
    for a, b in zip(out_nnx, out_linen, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_parameters_convert_both_ways_and_mismatches_are_reported():
    make_nnx, linen_cell, xs, zs = CELLS["mlp"]
    nnx_cell = make_nnx(nnx.Rngs(0))
    params = jax.tree_util.tree_map(lambda p: p + 1.0, deq.cells.to_linen_params(nnx_cell))
    deq.cells.load_linen_params(nnx_cell, params)
    for a, b in zip(jax.tree_util.tree_leaves(deq.cells.to_linen_params(nnx_cell)),
                    jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    params["W"]["kernel"] = jnp.zeros((5, 4))
    with pytest.raises(ValueError, match="layouts differ"):
        deq.cells.load_linen_params(nnx_cell, params)


def test_weight_norm_starts_at_the_raw_kernel_and_ignores_its_scale():
    p = F.conv_init(jax.random.key(0), 3, 2, 4, weight_norm=True)
    np.testing.assert_allclose(F._weight_normed(p), p["kernel"], rtol=1e-6, atol=1e-7)
    x = randn((1, 5, 5, 2), 3)
    scaled = dict(p, kernel=3.0 * p["kernel"])  # only the direction of v matters
    np.testing.assert_allclose(F.conv(scaled, x), F.conv(p, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        F.conv(dict(p, scale=2.0 * p["scale"]), x), 2.0 * F.conv(p, x), rtol=1e-5, atol=1e-5
    )


def test_conv_and_dense_match_flax_layers():
    x = randn((2, 5, 5, 3), 4)
    p = F.conv_init(jax.random.key(1), 3, 3, 4)
    ref = nn.Conv(4, (3, 3)).apply({"params": p}, x)  # same names, same HWIO layout
    np.testing.assert_allclose(F.conv(p, x), ref, rtol=1e-5, atol=1e-5)
    # Unbatched inputs (e.g. under vmap) work too.
    np.testing.assert_allclose(F.conv(p, x[0]), ref[0], rtol=1e-5, atol=1e-5)
    q = F.dense_init(jax.random.key(2), 3, 4)
    np.testing.assert_allclose(F.dense(q, x), nn.Dense(4).apply({"params": q}, x), rtol=1e-6)


def test_group_norm_matches_flax_and_is_per_sample():
    x = randn((3, 4, 4, 6), 5) * 3.0 + 1.0
    p = {"scale": randn((6,), 6), "bias": randn((6,), 7)}
    ref = nn.GroupNorm(num_groups=2).apply({"params": p}, x)
    np.testing.assert_allclose(F.group_norm(p, x, 2, 3), ref, rtol=1e-4, atol=1e-4)
    ref_ln = nn.LayerNorm().apply({"params": p}, x)
    np.testing.assert_allclose(F.group_norm(p, x, 1, 1), ref_ln, rtol=1e-4, atol=1e-4)
    # Changing one sample leaves the others untouched: no statistics across the batch.
    y = F.group_norm(p, x.at[0].multiply(10.0), 2, 3)
    np.testing.assert_array_equal(y[1:], F.group_norm(p, x, 2, 3)[1:])


def test_mdeq_cell_treats_samples_independently():
    make_nnx, _, xs, zs = CELLS["mdeq"]
    cell = make_nnx(nnx.Rngs(0))
    cell.norm2["scale"][...] = jnp.full((4,), 0.5)
    z, x = randn(zs, 1), randn(xs, 2)
    f = nnx.jit(lambda m, z, x: m(z, x))
    out = f(cell, z, x)
    out2 = f(cell, z.at[1].set(0.0), x.at[1].set(5.0))
    np.testing.assert_array_equal(out[0], out2[0])


def test_num_groups_must_divide_the_channels():
    with pytest.raises(ValueError, match="num_groups=3"):
        nnx_cells.MDEQCell(1, 4, num_groups=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_groups=4"):
        nnx_cells.MDEQCell(1, 8, hidden_channels=6, num_groups=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_groups=3"):
        linen_cells.MDEQCell(4, num_groups=3).init(jax.random.key(0), jnp.ones((1, 3, 3, 4)),
                                                   jnp.ones((1, 3, 3, 1)))


@pytest.mark.parametrize("name", ["mlp", "mdeq"])
def test_untrained_cells_are_contractive_enough_to_converge(name):
    # A DEQ with a default cell must train from its first step: the solve converges at init.
    make_nnx, _, xs, _ = CELLS[name]
    layer = deq.nnx.DEQ(make_nnx(nnx.Rngs(0)))
    nnx.jit(lambda m, x: m(x))(layer, randn(xs, 3))
    stats = layer.stats.get_value()
    assert bool(stats.converged), stats.summary()


def test_conv2d_same_custom_vjp_matches_lax_conv():
    """The CPU-friendly VJP of the cells' convolution gives JAX's own gradients."""
    from jax.test_util import check_grads

    from deq.cells._functional import _conv_nhwc, conv2d_same

    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 3))
        for ksize in (1, 3, 5):
            k = jax.random.normal(jax.random.PRNGKey(ksize), (ksize, ksize, 3, 4))
            check_grads(conv2d_same, (x, k), order=1, modes=["rev"])
            g1 = jax.grad(lambda a, b: jnp.sum(jnp.sin(conv2d_same(a, b))), argnums=(0, 1))(x, k)
            g2 = jax.grad(lambda a, b: jnp.sum(jnp.sin(_conv_nhwc(a, b))), argnums=(0, 1))(x, k)
            for a, b in zip(g1, g2):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)

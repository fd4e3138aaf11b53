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


# --------------------------------------------------------------------------------------------
# Tools for a user's own cell: the fast Conv drop-ins and WeightNorm.


def _lax_conv(x, k, padding="SAME"):
    return jax.lax.conv_general_dilated(x, k, (1, 1), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_fast_conv_general_dilated_gradients_equal_jax_grad_of_the_lax_conv(x64):
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    for ksize, padding in ((1, "SAME"), (3, "SAME"), (3, [(1, 1), (1, 1)]), (5, "SAME")):
        k = jax.random.normal(jax.random.key(ksize), (ksize, ksize, 3, 4))
        fast = lambda a, b: deq.cells.fast_conv_general_dilated(
            a, b, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        loss = lambda conv: lambda a, b: jnp.sum(jnp.sin(conv(a, b)))
        g1 = jax.grad(loss(fast), argnums=(0, 1))(x, k)
        g2 = jax.grad(loss(lambda a, b: _lax_conv(a, b, padding)), argnums=(0, 1))(x, k)
        for a, b in zip(g1, g2, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # On CPU the fast gradient is the one lowered (the platform is chosen at lowering time).
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(fast), argnums=1))(x, k))
    assert "branches_platforms=(('cpu',), None)" in jaxpr
    # Anything else (here a stride of 2) is lax.conv_general_dilated itself.
    strided = deq.cells.fast_conv_general_dilated(x, k, (2, 2), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_array_equal(strided, jax.lax.conv_general_dilated(
        x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))


def test_fast_conv_modules_match_flax_conv_in_values_and_gradients(x64):
    x = jax.random.normal(jax.random.key(1), (2, 3, 5, 5, 3))  # two batch axes, as Flax allows
    fast = nnx_cells.Conv(3, 4, (3, 3), param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    ref = nnx.Conv(3, 4, (3, 3), param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
    g_fast = nnx.grad(loss, argnums=(0, 1))(fast, x)
    g_ref = nnx.grad(loss, argnums=(0, 1))(ref, x)
    for a, b in zip(jax.tree_util.tree_leaves(g_fast), jax.tree_util.tree_leaves(g_ref),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # Linen: the same parameters, the same function and gradients as nn.Conv.
    params = deq.cells.to_linen_params(fast)
    lin = lambda mod: jax.grad(lambda p, x: jnp.sum(jnp.sin(mod.apply({"params": p}, x))),
                               argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(lin(linen_cells.Conv(4, (3, 3)))),
                    jax.tree_util.tree_leaves(lin(nn.Conv(4, (3, 3)))), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_fast_conv_modules_reject_what_the_fast_path_does_not_cover():
    for kwargs, what in (({"strides": 2}, "strides=1"), ({"padding": "VALID"}, "padding"),
                         ({"kernel_dilation": 2}, "dilation"),
                         ({"feature_group_count": 2}, "feature_group_count")):
        with pytest.raises(ValueError, match=what):
            nnx_cells.Conv(4, 4, (3, 3), rngs=nnx.Rngs(0), **kwargs)
        with pytest.raises(ValueError, match=what):
            linen_cells.Conv(4, (3, 3), **kwargs)
    with pytest.raises(ValueError, match="odd kernel"):
        nnx_cells.Conv(4, 4, (2, 2), rngs=nnx.Rngs(0))


def test_weight_norm_wrappers_share_one_layout_and_one_function():
    x = randn((2, 5, 5, 3), 3)
    wn = nnx_cells.WeightNorm(nnx_cells.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)))
    params = deq.cells.to_linen_params(wn)
    assert _shapes(params) == {"layer": {"kernel": (3, 3, 3, 4), "bias": (4,)}, "scale": (4,)}
    # Wrapping does not change the initial function (g starts at |v|).
    plain = nn.Conv(4, (3, 3)).apply({"params": params["layer"]}, x)
    np.testing.assert_allclose(wn(x), plain, rtol=1e-5, atol=1e-5)

    class UserCell(nn.Module):  # the layer is built inside the user's compact method
        @nn.compact
        def __call__(self, x):
            return linen_cells.WeightNorm(linen_cells.Conv(4, (3, 3)))(x)

    user = jax.eval_shape(UserCell().init, jax.random.key(0), x)["params"]
    assert _shapes(user) == {"WeightNorm_0": _shapes(params)}
    # After changing v and g: each output channel's kernel has norm |g|, in both frameworks,
    # and the stored kernel (the direction v) is never overwritten by a call.
    params = {"layer": {"kernel": 3.0 * params["layer"]["kernel"].at[0, 0].add(1.0),
                        "bias": params["layer"]["bias"]},
              "scale": jnp.array([0.5, 1.0, 2.0, 0.1])}
    deq.cells.load_linen_params(wn, params)
    np.testing.assert_allclose(jnp.sqrt(jnp.sum(wn.kernel() ** 2, axis=(0, 1, 2))),
                               params["scale"], rtol=1e-5)
    out = wn(x)
    np.testing.assert_array_equal(wn.layer.kernel[...], params["layer"]["kernel"])
    out_linen = linen_cells.WeightNorm(linen_cells.Conv(4, (3, 3))).apply({"params": params}, x)
    np.testing.assert_allclose(out, out_linen, rtol=1e-5, atol=1e-5)
    # Dense/Linear too.
    lin = nnx_cells.WeightNorm(nnx.Linear(3, 2, rngs=nnx.Rngs(1)))
    dense = jax.eval_shape(linen_cells.WeightNorm(nn.Dense(2)).init, jax.random.key(0), x)
    assert _shapes(deq.cells.to_linen_params(lin)) == _shapes(dense["params"])
    with pytest.raises(TypeError, match="kernel"):
        nnx_cells.WeightNorm(nnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0)))


def test_weight_norm_parameters_are_trained_by_optax():
    import optax

    wn = nnx_cells.WeightNorm(nnx_cells.Conv(2, 2, (3, 3), rngs=nnx.Rngs(0)))
    opt = nnx.Optimizer(wn, optax.sgd(0.1), wrt=nnx.Param)
    before = deq.cells.to_linen_params(wn)
    grads = nnx.grad(lambda m: jnp.sum(m(randn((1, 4, 4, 2), 1)) ** 2))(wn)
    opt.update(wn, grads)
    after = deq.cells.to_linen_params(wn)
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after),
                    strict=True):
        assert not np.allclose(a, b)

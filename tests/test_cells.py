"""deq.cells: one parameter layout and one forward math for NNX and Linen; reference checks."""

from functools import partial

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

    from deq.cells._conv import _conv_nhwc, conv2d_same

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
    def loss(conv):
        return lambda a, b: jnp.sum(jnp.sin(conv(a, b)))

    def fast_conv(padding):
        return lambda a, b: deq.cells.fast_conv_general_dilated(
            a, b, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    for ksize, padding in ((1, "SAME"), (3, "SAME"), (3, [(1, 1), (1, 1)]), (5, "SAME")):
        k = jax.random.normal(jax.random.key(ksize), (ksize, ksize, 3, 4))
        fast = fast_conv(padding)
        g1 = jax.grad(loss(fast), argnums=(0, 1))(x, k)
        g2 = jax.grad(loss(partial(_lax_conv, padding=padding)), argnums=(0, 1))(x, k)
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


# --------------------------------------------------------------------------------------------
# Multiscale MDEQ cell: a tuple state at several resolutions.


def _multiscale(dtype=jnp.float32):
    return (nnx_cells.MultiscaleMDEQCell(2, (2, 4), hidden_channels=(4, 2), num_groups=2,
                                         param_dtype=dtype, rngs=nnx.Rngs(0)),
            linen_cells.MultiscaleMDEQCell((2, 4), hidden_channels=(4, 2), num_groups=2))


def _switch_on(params):
    """Every GroupNorm gain at 0.5: the zero-gain residual branches take part in the tests."""
    def gain(path, a):
        name = [getattr(k, "key", None) for k in path]
        return jnp.full_like(a, 0.5) if name[-1] == "scale" and name[-2] == "norm2" else a
    return jax.tree_util.tree_map_with_path(gain, params)


def test_multiscale_cell_layout_state_shapes_and_function_agree_between_nnx_and_linen():
    nnx_cell, linen_cell = _multiscale()
    xs = (2, 7, 5, 2)
    shapes = ((2, 7, 5, 2), (2, 4, 3, 4))
    assert nnx_cell.state_shape(xs) == linen_cell.state_shape(xs) == shapes
    params = _switch_on(deq.cells.to_linen_params(nnx_cell))
    deq.cells.load_linen_params(nnx_cell, params)
    z = tuple(randn(s, i) for i, s in enumerate(shapes))
    x = randn(xs, 5)
    linen_params = jax.eval_shape(linen_cell.init, jax.random.key(0), z, x)["params"]
    assert _shapes(linen_params) == _shapes(params)
    assert {"branch0", "branch1", "inject0", "inject1", "down0_1", "up1_0", "post0",
            "post1"} == set(params)
    out_nnx = nnx.jit(lambda m, z, x: m(z, x))(nnx_cell, z, x)
    out_linen = jax.jit(linen_cell.apply)({"params": params}, z, x)
    assert [a.shape for a in out_nnx] == list(shapes)
    for a, b in zip(out_nnx, out_linen, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    inj_nnx = nnx.jit(lambda m, x: m.inject(x))(nnx_cell, x)
    inj_linen = linen_cell.apply({"params": params}, x, method="inject")
    assert [a.shape for a in inj_nnx] == list(shapes)
    for a, b in zip(inj_nnx, inj_linen, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # Three resolutions: two-step down paths and a 4x upsampling.
    cell3 = nnx_cells.MultiscaleMDEQCell(2, (2, 2, 4), num_groups=2, rngs=nnx.Rngs(1))
    shapes3 = cell3.state_shape((1, 9, 9, 2))
    assert shapes3 == ((1, 9, 9, 2), (1, 5, 5, 2), (1, 3, 3, 4))
    out3 = nnx.eval_shape(lambda m: m(tuple(jnp.ones(s) for s in shapes3),
                                       jnp.ones((1, 9, 9, 2))), cell3)
    assert tuple(a.shape for a in out3) == shapes3
    with pytest.raises(ValueError, match="2 or more"):
        nnx_cells.MultiscaleMDEQCell(2, (4,), num_groups=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_groups=2"):
        nnx_cells.MultiscaleMDEQCell(2, (4, 3), num_groups=2, rngs=nnx.Rngs(0))


def _multiscale_loss(solver, adjoint, max_steps):
    """Loss of the cell's fixed point, through deq.fixed_point (the math NNX and Linen share)."""
    def fn(z, args):
        p, x = args
        return F.multiscale_cell(p, z, x, 2)

    def loss(args):
        z0 = F.multiscale_inject(args[0], args[1], 2)
        z = deq.fixed_point(fn, z0, args, solver=solver, adjoint=adjoint, max_steps=max_steps,
                            batched=True).value
        return sum(jnp.sum(jnp.sin(a) * (i + 1.0)) for i, a in enumerate(z))

    return loss


def _multiscale_args():
    cell, _ = _multiscale(jnp.float64)
    params = _switch_on(deq.cells.to_linen_params(cell))
    # A strong input (x3) keeps this tiny cell well contractive: plain iteration converges to
    # 1e-12 in ~130 steps, so a 200-step unrolled run is at the fixed point.
    return params, 3.0 * randn((2, 5, 5, 2), 3, jnp.float64)


def _multiscale_implicit_grad(args):
    # Plain iteration both ways: it converges here (see _multiscale_args) and compiles faster.
    loss = _multiscale_loss(
        deq.FixedPointIteration(rtol=1e-12, atol=1e-12),
        deq.ImplicitAdjoint(solver=deq.FixedPointIteration(rtol=1e-11, atol=1e-11),
                            max_steps=300), 300)
    value_and_grad = jax.jit(jax.value_and_grad(loss))  # one compilation serves both checks
    return (lambda a: value_and_grad(a)[0]), value_and_grad(args)[1]


def test_multiscale_cell_gradients_match_finite_differences(x64):
    from helpers_layers import check_directional_derivatives

    args = _multiscale_args()
    loss, g = _multiscale_implicit_grad(args)
    check_directional_derivatives(loss, g, args, eps=1e-5, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_multiscale_cell_gradients_match_a_long_unrolled_run(x64):
    args = _multiscale_args()
    _, g = _multiscale_implicit_grad(args)
    unrolled = _multiscale_loss(deq.FixedPointIteration(), deq.UnrolledAdjoint(), 200)
    g_unrolled = jax.jit(jax.grad(unrolled))(args)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_unrolled),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("framework,z_init", [
    ("nnx", "inject"), pytest.param("nnx", "zeros", marks=pytest.mark.slow),
    pytest.param("linen", "zeros", marks=pytest.mark.slow),
    pytest.param("linen", "inject", marks=pytest.mark.slow),
])
def test_multiscale_cell_in_the_layers(framework, z_init):
    """The layers take the tuple state (z_init="zeros" builds it from state_shape)."""
    import deq.linen

    nnx_cell, linen_cell = _multiscale()
    x = randn((2, 6, 6, 2), 4)
    if framework == "nnx":
        layer = deq.nnx.DEQ(nnx_cell, z_init=z_init)
        z = nnx.jit(lambda m, x: m(x))(layer, x)
        fz = nnx_cell(z, x)
    else:
        layer = deq.linen.DEQ(cell=linen_cell, z_init=z_init)
        variables = layer.init(jax.random.key(0), x)
        z = layer.apply(variables, x)
        z = z[0] if isinstance(z, tuple) and len(z) == 2 and isinstance(z[0], tuple) else z
        fz = linen_cell.apply({"params": variables["params"]["cell"]}, z, x)
    assert [a.shape for a in z] == [(2, 6, 6, 2), (2, 3, 3, 4)]
    for a, b in zip(z, fz, strict=True):  # an equilibrium (default rtol 1e-4, float32 slack)
        assert float(jnp.linalg.norm(a - b)) <= 1e-3 * float(jnp.linalg.norm(b))

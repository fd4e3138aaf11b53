"""Second-order and forward-mode derivatives through the Flax layers, against the same cell
iterated long past convergence and differentiated by JAX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import deq
import deq.linen
import deq.nnx

TIGHT = dict(solver=deq.Anderson(rtol=1e-11, atol=1e-13), max_steps=200,
             adjoint=deq.ImplicitAdjoint(solver=deq.GMRES(rtol=1e-12, atol=1e-14), max_steps=200))


class NNXCell(nnx.Module):
    def __init__(self, d, rngs):
        self.w = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(0.5 * self.w(z) + x)


class LinenCell(nn.Module):
    @nn.compact
    def __call__(self, z, x):
        return jnp.tanh(0.5 * nn.Dense(z.shape[-1])(z) + x)


def _unrolled(cell, x, steps=300):
    z = jnp.zeros_like(x)
    for _ in range(steps):
        z = cell(z, x)
    return z


def _loss(z):
    return jnp.sum(jnp.sin(3.0 * z))


def test_nnx_layer_hessian_in_input_and_hvp_in_parameters(x64):
    layer = deq.nnx.DEQ(NNXCell(3, nnx.Rngs(0)), **TIGHT)
    x = 0.3 * jax.random.normal(jax.random.key(1), (2, 3))
    h = jax.hessian(lambda x: _loss(layer(x)))(x)
    ref = jax.hessian(lambda x: _loss(_unrolled(layer.cell, x)))(x)
    np.testing.assert_allclose(h, ref, rtol=1e-8, atol=1e-10)
    assert np.abs(np.asarray(h)).max() > 1e-2  # not trivially zero

    # A Hessian-vector product in the parameters, forward over reverse, through nnx.split.
    f64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    cell_graph, cell_params = nnx.split(layer.cell, nnx.Param)
    params, cell_params = f64(params), f64(cell_params)  # nnx.Linear keeps float32 params

    def deq_loss(p):
        return _loss(nnx.merge(graphdef, p, rest)(x))

    def ref_loss(p):
        return _loss(_unrolled(nnx.merge(cell_graph, p), x))

    v = jax.tree.map(jnp.ones_like, params)
    hvp = jax.jvp(jax.grad(deq_loss), (params,), (v,))[1]
    ref_hvp = jax.jvp(jax.grad(ref_loss), (cell_params,), (jax.tree.map(jnp.ones_like,
                                                                         cell_params),))[1]
    for a, b in zip(jax.tree.leaves(hvp), jax.tree.leaves(ref_hvp), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_linen_layer_jvp_and_hessian_in_input(x64):
    layer = deq.linen.DEQ(cell=LinenCell(), **TIGHT)
    x = 0.3 * jax.random.normal(jax.random.key(1), (2, 3))
    variables = layer.init(jax.random.key(0), x)
    cell_vars = {"params": variables["params"]["cell"]}
    cell = lambda z, x: LinenCell().apply(cell_vars, z, x)
    t = jnp.ones_like(x)
    jvp = jax.jvp(lambda x: layer.apply(variables, x), (x,), (t,))[1]
    np.testing.assert_allclose(jvp, jax.jvp(lambda x: _unrolled(cell, x), (x,), (t,))[1],
                               rtol=1e-8, atol=1e-10)
    h = jax.hessian(lambda x: _loss(layer.apply(variables, x)))(x)
    np.testing.assert_allclose(h, jax.hessian(lambda x: _loss(_unrolled(cell, x)))(x),
                               rtol=1e-8, atol=1e-10)


def test_package_conv_cell_takes_forward_mode_and_second_order():
    # MDEQCell's convolutions have a rewritten derivative on CPU (deq.cells.conv2d_same): it is
    # a custom JVP, so forward mode and Hessians go through the package's cells too.
    from deq.cells.nnx import MDEQCell

    layer = deq.nnx.DEQ(MDEQCell(4, 4, num_groups=2, rngs=nnx.Rngs(0)), max_steps=60,
                        solver=deq.Anderson(rtol=1e-6, atol=1e-8),
                        adjoint=deq.ImplicitAdjoint(solver=deq.GMRES(rtol=1e-7, atol=1e-9)))
    x = jax.random.normal(jax.random.key(1), (1, 5, 5, 4))
    t = jax.random.normal(jax.random.key(2), x.shape)
    w = jax.random.normal(jax.random.key(3), (1, 5, 5, 4))
    loss = lambda x: jnp.sum(w * layer(x))
    jvp = jax.jvp(loss, (x,), (t,))[1]
    grad = jax.grad(loss)(x)
    assert abs(float(jvp)) > 1e-2
    np.testing.assert_allclose(jvp, jnp.sum(grad * t), rtol=1e-4)  # forward = reverse
    hvp = jax.jvp(jax.grad(loss), (x,), (t,))[1]
    eps = 1e-2
    fd = (jax.grad(loss)(x + eps * t) - jax.grad(loss)(x - eps * t)) / (2 * eps)
    np.testing.assert_allclose(hvp, fd, rtol=2e-2, atol=2e-2 * float(jnp.abs(fd).max()))

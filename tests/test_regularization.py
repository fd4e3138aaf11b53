"""Regularisers: Jacobian penalty against dense Jacobians, correction loss by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from deq.regularization import (
    correction_iterates,
    fixed_point_correction,
    jacobian_regularization,
)


def _cell(z, args):
    w, u, x = args
    return jnp.tanh(z @ w + x @ u)


def _problem(dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    w = 0.6 * jax.random.normal(k1, (3, 3), dtype) / np.sqrt(3)
    u = jax.random.normal(k2, (2, 3), dtype)
    x = jax.random.normal(k3, (4, 2), dtype)  # a batch of 4
    z = jax.random.normal(k4, (4, 3), dtype)
    return z, (w, u, x)


def _dense(z, args):
    jac = jax.jacobian(lambda zz: _cell(zz, args))(z)  # (4, 3, 4, 3), block diagonal
    return jnp.sum(jac**2) / z.size


def test_jacobian_regularization_matches_dense_frobenius_norm():
    z, args = _problem()
    exact = _dense(z, args)
    n = 4000
    est = jacobian_regularization(_cell, z, args, jax.random.key(1), num_samples=n)
    # Per-probe values ||e^T J||^2 / d; the mean of n of them has std = std(one) / sqrt(n).
    ones = jax.vmap(lambda k: jacobian_regularization(_cell, z, args, k))(
        jax.random.split(jax.random.key(2), 500)
    )
    tol = 4 * float(jnp.std(ones)) / np.sqrt(n)
    assert abs(float(est) - float(exact)) < tol
    assert abs(float(jnp.mean(ones)) - float(exact)) < 4 * float(jnp.std(ones)) / np.sqrt(500)


def test_jacobian_regularization_on_pytree_state():
    # Two leaves: the estimate must cover the Jacobian of the whole pytree.
    def f(z, w):
        a, b = z
        return (0.5 * a, jnp.tanh(w * b) + a[:2])

    z = (jnp.ones(3), jnp.zeros(2))
    est = jacobian_regularization(f, z, jnp.ones(()), jax.random.key(0), num_samples=20000)
    # ||J||_F^2 = 3 * 0.25 (0.5 a) + 2 (tanh'(0) w, w = 1) + 2 (a[:2]) = 4.75, d = 5.
    np.testing.assert_allclose(float(est), 4.75 / 5, rtol=0.05)


def test_jacobian_regularization_gradient_matches_dense_gradient():
    z, args = _problem()
    g_est = jax.grad(
        lambda a: jacobian_regularization(_cell, z, a, jax.random.key(3), num_samples=4000)
    )(args)
    g_exact = jax.grad(lambda a: _dense(z, a))(args)
    for ge, gx in zip(g_est[:2], g_exact[:2], strict=True):
        np.testing.assert_allclose(ge, gx, atol=0.1 * float(jnp.max(jnp.abs(gx))) + 1e-3)


def test_jacobian_regularization_gradient_finite_differences():
    with jax.enable_x64(True):
        z, args = _problem(jnp.float64)
        w, u, x = args
        fn = lambda w, u: jacobian_regularization(
            _cell, z, (w, u, x), jax.random.key(4), num_samples=3
        )
        check_grads(fn, (w, u), order=1, modes=["rev"])


def test_jacobian_regularization_rejects_bad_num_samples():
    z, args = _problem()
    with pytest.raises(ValueError, match="num_samples"):
        jacobian_regularization(_cell, z, args, jax.random.key(0), num_samples=0)


def test_correction_iterates_and_loss_by_hand():
    f = lambda z, w: jnp.tanh(w * z + 1.0)
    z_star = jnp.array([0.3, -0.2])
    w = jnp.asarray(0.5)
    zs = correction_iterates(f, z_star, w, num_iterates=2, damping=0.25)
    z1 = 0.25 * z_star + 0.75 * f(z_star, w)
    z2 = 0.25 * z1 + 0.75 * f(z1, w)
    np.testing.assert_allclose(zs[0], z1, rtol=1e-6)
    np.testing.assert_allclose(zs[1], z2, rtol=1e-6)
    loss = fixed_point_correction(jnp.sum, zs, decay=0.5)
    np.testing.assert_allclose(loss, 0.5 * jnp.sum(z1) + jnp.sum(z2), rtol=1e-6)
    # The start is a constant: no gradient reaches z_star.
    g = jax.grad(lambda z: fixed_point_correction(jnp.sum, correction_iterates(f, z, w)))(z_star)
    np.testing.assert_array_equal(g, jnp.zeros(2))


def test_correction_gradient_at_fixed_point_approaches_implicit_gradient():
    # With many undamped iterates from z*, the last iterate's gradient is the implicit one.
    f = lambda z, w: jnp.tanh(w * z + 1.0)
    w = jnp.asarray(0.5)
    z = jnp.zeros(())
    for _ in range(200):
        z = f(z, w)
    implicit = (1 - z**2) * z / (1 - (1 - z**2) * w)  # dz*/dw by the implicit function theorem
    g = jax.grad(lambda w: correction_iterates(f, z, w, num_iterates=40)[-1])(w)
    np.testing.assert_allclose(g, implicit, rtol=1e-5)


@pytest.mark.parametrize("bad", [{"num_iterates": 0}, {"damping": 1.0}])
def test_correction_iterates_validates(bad):
    with pytest.raises(ValueError):
        correction_iterates(lambda z, a: z, jnp.zeros(2), None, **bad)


def test_fixed_point_correction_validates():
    with pytest.raises(ValueError, match="empty"):
        fixed_point_correction(jnp.sum, [])
    with pytest.raises(ValueError, match="decay"):
        fixed_point_correction(jnp.sum, [jnp.ones(1)], decay=0.0)

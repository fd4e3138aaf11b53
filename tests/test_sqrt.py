"""The base case: deq.fixed_point_sqrt, its IFT gradient, and the same through fixed_point."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import deq


def test_seed_case_values_and_gradients():
    x = jnp.array([4.0, 9.0])
    np.testing.assert_allclose(deq.fixed_point_sqrt(x), [2.0, 3.0], rtol=1e-6)
    g = jax.grad(lambda x: deq.fixed_point_sqrt(x).sum())(x)
    np.testing.assert_allclose(g, [0.25, 0.16667], rtol=1e-4)


def test_check_grads(x64):
    x = jnp.array([0.5, 2.0, 30.0])
    check_grads(deq.fixed_point_sqrt, (x,), order=1, modes=["rev"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16])
def test_shapes_and_dtypes(x64, dtype):
    x = jnp.linspace(0.5, 50.0, 24, dtype=jnp.float64).reshape(2, 3, 4).astype(dtype)
    y = deq.fixed_point_sqrt(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    tol = {jnp.float64: 1e-12, jnp.float32: 1e-6}.get(dtype, 1e-2)
    np.testing.assert_allclose(np.asarray(y, np.float64), np.sqrt(np.asarray(x, np.float64)),
                               rtol=tol)
    g = jax.grad(lambda x: deq.fixed_point_sqrt(x).astype(jnp.float32).sum())(x)
    np.testing.assert_allclose(np.asarray(g, np.float64), 0.5 / np.sqrt(np.asarray(x, np.float64)),
                               rtol=max(tol, 1e-6))


def test_jit_vmap_grad_compose():
    x = jnp.array([[1.0, 4.0], [16.0, 25.0]])
    f = jax.jit(jax.vmap(jax.grad(lambda v: deq.fixed_point_sqrt(v))))
    np.testing.assert_allclose(f(x.reshape(-1)), 0.5 / jnp.sqrt(x.reshape(-1)), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(deq.fixed_point_sqrt)(x), jnp.sqrt(x), rtol=1e-6)


def test_integer_input_is_promoted():
    y = deq.fixed_point_sqrt(jnp.array([4, 9]))
    assert jnp.issubdtype(y.dtype, jnp.floating)
    np.testing.assert_allclose(y, [2.0, 3.0], rtol=1e-6)


def _count_primitives(jaxpr, names):
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            count += 1
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                count += _count_primitives(inner, names)
            elif hasattr(p, "eqns"):
                count += _count_primitives(p, names)
    return count


def test_backward_never_unrolls_the_newton_loop():
    x = jnp.array([4.0, 9.0])
    _, vjp = jax.vjp(deq.fixed_point_sqrt, x)
    bwd = jax.make_jaxpr(vjp)(jnp.ones(2)).jaxpr
    assert _count_primitives(bwd, {"while", "scan"}) == 0
    # The backward is one multiply and one divide: nowhere near 10 Newton steps.
    assert _count_primitives(bwd, {"div"}) <= 1
    # The whole gradient holds exactly one loop (fori_loop lowers to scan): the forward
    # Newton iteration, with its 10 steps inside, and no transposed copy of it.
    full = jax.make_jaxpr(jax.grad(lambda x: deq.fixed_point_sqrt(x).sum()))(x).jaxpr
    assert _count_primitives(full, {"while", "scan"}) == 1


@pytest.mark.parametrize("bad", [[4.0, 0.0], [-1.0, 2.0], [np.nan, 1.0], [1.0, np.inf]])
def test_non_positive_or_non_finite_concrete_input_raises(bad):
    with pytest.raises(ValueError, match="strictly positive"):
        deq.fixed_point_sqrt(jnp.array(bad))


def _documented_range(dtype_name):
    """The accuracy range the docstring states for a dtype: (bound in ulps, lo, hi)."""
    doc = " ".join(deq.fixed_point_sqrt.__doc__.split())
    m = re.search(r"at most (\d+) ulps \(about [^)]*\) for ``x`` in ``\[([^,]+), ([^\]]+)\]`` "
                  rf"in {dtype_name}", doc)
    assert m, f"the docstring no longer states the {dtype_name} accuracy range"
    return int(m.group(1)), float(m.group(2)), float(m.group(3))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_documented_accuracy_range_holds_and_is_tight(x64, dtype):
    ulps, lo, hi = _documented_range(jnp.dtype(dtype).name)
    bound = ulps * float(jnp.finfo(dtype).eps)
    # Inside: a dense grid, the ends included. Just outside (x2 in float32, x4 in float64,
    # where the 10 steps have not converged yet): the bound fails, so a stale range shows.
    factor = 2.0 if dtype == jnp.float32 else 4.0
    x = np.concatenate([np.geomspace(lo, hi, 2001), [lo / factor, hi * factor]])
    xd = jnp.asarray(x, dtype)
    ref = np.sqrt(np.asarray(xd, np.float64))
    err = np.abs(np.asarray(deq.fixed_point_sqrt(xd), np.float64) - ref) / ref
    assert err[:-2].max() <= bound, (err[:-2].max(), bound)
    assert np.all(err[-2:] > bound), (err[-2:], bound)


def test_non_positive_traced_input_gives_nan_like_jnp_sqrt():
    y = jax.jit(deq.fixed_point_sqrt)(jnp.array([4.0, -1.0, 0.0]))
    assert float(y[0]) == pytest.approx(2.0)
    assert np.isnan(y[1]) and np.isnan(y[2])


def test_same_sqrt_through_the_general_primitive(x64):
    x = jnp.array([4.0, 9.0, 2.0])

    def newton(y, x):
        return 0.5 * (y + x / y)

    def via_fixed_point(x):
        sol = deq.fixed_point(newton, jnp.ones_like(x), x,
                              solver=deq.FixedPointIteration(rtol=1e-12, atol=0.0),
                              max_steps=50)
        return sol.value

    np.testing.assert_allclose(via_fixed_point(x), deq.fixed_point_sqrt(x), rtol=1e-12)
    g1 = jax.grad(lambda x: via_fixed_point(x).sum())(x)
    g2 = jax.grad(lambda x: deq.fixed_point_sqrt(x).sum())(x)
    np.testing.assert_allclose(g1, g2, rtol=1e-10)
    np.testing.assert_allclose(g1, 0.5 / jnp.sqrt(x), rtol=1e-10)

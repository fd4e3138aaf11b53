"""Derivative test matrix: forward solvers x adjoints x JAX transforms x dtypes.

Problem: z* = tanh(W z* + x), n = 4, ||W||_2 = 0.5 (a contraction). The reference is the
same map iterated 400 times from 0 by a plain ``lax.fori_loop`` (no deq code), in float64 /
complex128 on the dtype-rounded data, differentiated by JAX. For the phantom and
Jacobian-free adjoints the reference is JAX's derivative of the documented k-step damped map
started at the (constant) converged z*. Unrolled backprop through 200 solver steps is compared
with the converged (implicit) derivatives.

The full product is parametrised; CI (CI=true) runs a subset, the rest is marked slow.
Every jitted function is compiled once per test; n is tiny because compile time dominates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq

N = 4
REF_STEPS = 400
UNROLL_STEPS = 200
MAX_STEPS = 300

# Forward (and iterative adjoint) solver tolerances per dtype.
TOLS = {
    "float64": dict(rtol=1e-11, atol=1e-13),
    "float32": dict(rtol=1e-6, atol=1e-7),
    "complex64": dict(rtol=1e-6, atol=1e-7),
    "bfloat16": dict(rtol=1e-2, atol=1e-3),
}
GMRES_TOLS = {
    "float64": dict(rtol=1e-12, atol=1e-14),
    "float32": dict(rtol=1e-6, atol=1e-7),
    "complex64": dict(rtol=1e-6, atol=1e-7),
    "bfloat16": dict(rtol=1e-2, atol=1e-3),
}
# Norm-wise relative error allowed on each output leaf (derivatives), and on the value.
DERIV_RTOL = {"float64": 1e-8, "float32": 1e-4, "complex64": 1e-4, "bfloat16": 5e-2}
VALUE_RTOL = {"float64": 1e-10, "float32": 1e-5, "complex64": 1e-5, "bfloat16": 2e-2}

SOLVER_NAMES = ("iteration", "anderson", "broyden")
ADJOINT_NAMES = ("implicit_anderson", "implicit_gmres", "unrolled", "phantom", "jfb")
PHANTOM = dict(steps=3, damping=0.5)
TRANSFORMS = {
    "float64": ("jvp", "jacfwd", "jacrev", "hessian", "gradgrad", "vmap_jvp", "jit_jvp"),
    "float32": ("jvp", "jacfwd", "jacrev", "hessian", "gradgrad", "vmap_jvp", "jit_jvp"),
    "complex64": ("jvp", "jacfwd", "jacrev"),
    "bfloat16": ("jvp", "grad"),
}

# Kept in CI (CI=true); every other combination is marked slow.
CI_CASES = {
    # every transform: Anderson forward, implicit adjoint with an Anderson adjoint solver
    *(("float64", "anderson", "implicit_anderson", t) for t in TRANSFORMS["float64"]),
    # every other adjoint kind: a jvp and the Hessian
    *(("float64", "anderson", a, t)
      for a in ("implicit_gmres", "unrolled", "phantom", "jfb") for t in ("jit_jvp", "hessian")),
    # unrolled backprop through plain iteration (the baseline the others are compared to)
    ("float64", "iteration", "unrolled", "jit_jvp"),
    # each other dtype once
    ("float32", "anderson", "implicit_anderson", "jacrev"),
    ("complex64", "anderson", "implicit_anderson", "jacrev"),
    ("bfloat16", "anderson", "implicit_anderson", "grad"),
}


def _f(z, args):
    w, x = args
    return jnp.tanh(w @ z + x)


def _loss(z):
    # A fixed weighting so every entry of z matters; real dtypes only.
    return jnp.sum(jnp.sin(3.0 * z + jnp.arange(z.shape[-1])))


def _is_complex(dtype_name):
    return dtype_name.startswith("complex")


@functools.cache
def _data(dtype_name):
    """W, x, the tangents (tw, tx) and a batch of x-tangents, rounded to the dtype, as
    float64/complex128 numpy arrays (the reference problem is exactly the tested one)."""
    rng = np.random.default_rng(1234)
    cplx = _is_complex(dtype_name)

    def draw(*shape):
        a = rng.standard_normal(shape)
        return a + 1j * rng.standard_normal(shape) if cplx else a

    w = draw(N, N)
    w = 0.5 * w / np.linalg.norm(w, 2)
    x = draw(N) * (0.5 if cplx else 1.0)  # keep tanh well away from its complex poles
    tw, tx, tb = draw(N, N), draw(N), draw(3, N)
    dt = jnp.dtype(dtype_name)
    wide = np.complex128 if cplx else np.float64
    # Round through the test dtype (ml_dtypes handles bfloat16 in numpy).
    return tuple(np.asarray(np.asarray(a).astype(dt), wide) for a in (w, x, tw, tx, tb))


def _cast(dtype_name, *arrays):
    return tuple(jnp.asarray(np.asarray(a).astype(jnp.dtype(dtype_name))) for a in arrays)


def _apply(name, zf, w, x, tw, tx, tb, cplx):
    """Apply transform ``name`` to ``zf(w, x) -> (z, aux)``; return (derivatives, aux)."""
    def z(w, x):
        return zf(w, x)[0]

    def loss(w, x):
        return _loss(z(w, x))

    if name in ("jvp", "jit_jvp"):
        primal, tangent, aux = jax.jvp(zf, (w, x), (tw, tx), has_aux=True)
        return (primal, tangent), aux
    aux = zf(w, x)[1]
    if name == "jacfwd":
        out = jax.jacfwd(z, 1, holomorphic=cplx)(w, x)
    elif name == "jacrev":
        out = jax.jacrev(z, (0, 1), holomorphic=cplx)(w, x)  # w.r.t. W and x
    elif name == "hessian":
        out = jax.hessian(loss, 1)(w, x)
    elif name == "gradgrad":
        out = jax.grad(lambda x: jnp.sum(jax.grad(loss, 1)(w, x) ** 2))(x)
    elif name == "vmap_jvp":
        out = jax.vmap(lambda t: jax.jvp(lambda x: z(w, x), (x,), (t,))[1])(tb)
    elif name == "grad":
        out = jax.grad(loss, (0, 1))(w, x)  # w.r.t. W and x
    else:
        raise ValueError(name)
    return out, aux


# ----------------------------------------------------------------------------- references


def _iterate_ref(w, x):
    """400 plain iterations from 0: no deq code."""
    return jax.lax.fori_loop(0, REF_STEPS, lambda _, z: _f(z, (w, x)), jnp.zeros_like(x))


@functools.cache
def _ref_fixed_point(dtype_name):
    w, x, *_ = _data(dtype_name)
    with jax.enable_x64(True):
        return np.asarray(jax.jit(_iterate_ref)(jnp.asarray(w), jnp.asarray(x)))


@functools.cache
def _reference(dtype_name, kind, transform):
    """Reference derivatives (numpy, float64/complex128). kind: 'implicit' (converged
    derivatives) or 'phantom'/'jfb' (the k-step damped map from the constant z*)."""
    w, x, tw, tx, tb = _data(dtype_name)
    zstar = _ref_fixed_point(dtype_name)
    steps, damping = {"phantom": (PHANTOM["steps"], PHANTOM["damping"]), "jfb": (1, 0.0)}.get(
        kind, (None, None))

    def zf(w, x):
        if kind == "implicit":
            return _iterate_ref(w, x), ()
        z = jnp.asarray(zstar)
        for _ in range(steps):
            z = damping * z + (1 - damping) * _f(z, (w, x))
        return z, ()

    with jax.enable_x64(True):
        fn = jax.jit(functools.partial(_apply, transform, zf, cplx=_is_complex(dtype_name)))
        out, _ = fn(*(jnp.asarray(a) for a in (w, x, tw, tx, tb)))
        return jax.tree_util.tree_map(np.asarray, out)


# ----------------------------------------------------------------------------- deq side


def _solver(name, dtype_name):
    tol = TOLS[dtype_name]
    return {"iteration": deq.FixedPointIteration, "anderson": deq.Anderson,
            "broyden": deq.Broyden}[name](**tol)


def _adjoint(name, dtype_name):
    if name == "implicit_anderson":
        return deq.ImplicitAdjoint(solver=deq.Anderson(**TOLS[dtype_name]), max_steps=MAX_STEPS)
    if name == "implicit_gmres":
        return deq.ImplicitAdjoint(solver=deq.GMRES(**GMRES_TOLS[dtype_name]),
                                   max_steps=MAX_STEPS)
    if name == "unrolled":
        return deq.UnrolledAdjoint()
    if name == "phantom":
        return deq.PhantomAdjoint(**PHANTOM)
    if name == "jfb":
        return deq.JacobianFreeAdjoint()
    raise ValueError(name)


def _ref_kind(adjoint_name):
    return adjoint_name if adjoint_name in ("phantom", "jfb") else "implicit"


def _rel_err(a, b):
    a = np.asarray(a).astype(np.complex128 if np.iscomplexobj(b) else np.float64)
    b = np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _assert_close(out, ref, rtol, what):
    outs, tree_out = jax.tree_util.tree_flatten(out)
    refs, tree_ref = jax.tree_util.tree_flatten(ref)
    assert tree_out == tree_ref, (tree_out, tree_ref)
    errs = []
    for a, b in zip(outs, refs):
        assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
        assert np.all(np.isfinite(np.asarray(a, np.complex128))), f"{what}: non-finite {a}"
        errs.append(_rel_err(a, b))
    assert max(errs) <= rtol, f"{what}: relative errors {[f'{e:.2e}' for e in errs]} > {rtol}"


def _assert_no_nonfinite_success(value, converged, result):
    finite = bool(np.all(np.isfinite(np.asarray(value, np.complex128))))
    if not finite:
        assert not bool(converged), "non-finite value reported converged"
        assert int(result) != deq.RESULTS.SUCCESSFUL, "non-finite value reported SUCCESSFUL"


def _cases():
    for dtype_name, transforms in TRANSFORMS.items():
        for solver in SOLVER_NAMES:
            for adj in ADJOINT_NAMES:
                for t in transforms:
                    key = (dtype_name, solver, adj, t)
                    marks = () if key in CI_CASES else (pytest.mark.slow,)
                    yield pytest.param(*key, marks=marks, id="-".join(key))


@pytest.mark.parametrize("dtype_name,solver_name,adjoint_name,transform", list(_cases()))
def test_derivatives_match_reference(dtype_name, solver_name, adjoint_name, transform):
    # float64 needs x64; the other dtypes run as users run them, with x64 off.
    with jax.enable_x64(dtype_name == "float64"):
        _check_derivatives(dtype_name, solver_name, adjoint_name, transform)


def _check_derivatives(dtype_name, solver_name, adjoint_name, transform):
    cplx = _is_complex(dtype_name)
    w, x, tw, tx, tb = _cast(dtype_name, *_data(dtype_name))
    z0 = jnp.zeros((N,), jnp.dtype(dtype_name))
    solver, adjoint = _solver(solver_name, dtype_name), _adjoint(adjoint_name, dtype_name)
    max_steps = UNROLL_STEPS if adjoint_name == "unrolled" else MAX_STEPS

    def zf(w, x):
        sol = deq.fixed_point(_f, z0, (w, x), solver=solver, adjoint=adjoint,
                              max_steps=max_steps)
        return sol.value, (sol.value, sol.stats.converged, sol.stats.result)

    fn = functools.partial(_apply, transform, zf, cplx=cplx)
    if transform != "jvp":  # "jvp" is the eager (un-jitted) transform; the rest compile once
        fn = jax.jit(fn)
    out, (value, converged, result) = fn(w, x, tw, tx, tb)

    _assert_no_nonfinite_success(value, converged, result)
    if dtype_name != "bfloat16":
        assert bool(converged), f"forward solve did not converge (result {int(result)})"
    _assert_close(value, _ref_fixed_point(dtype_name), VALUE_RTOL[dtype_name], "value")
    ref = _reference(dtype_name, _ref_kind(adjoint_name), transform)
    _assert_close(out, ref, DERIV_RTOL[dtype_name], f"{transform} derivatives")


# ----------------------------------------------------------------------------- sqrt


def _newton(y, x):
    return 0.5 * (y + x / y)


def _sqrt_fp(x):
    # Default adjoint (ImplicitAdjoint); Newton converges quadratically by plain iteration.
    return deq.fixed_point(_newton, jnp.asarray(1.0, x.dtype), x,
                           solver=deq.FixedPointIteration(rtol=1e-12, atol=1e-14),
                           max_steps=100).value


def _second(h):
    return jax.grad(jax.grad(h))


SQRT_TRANSFORMS = {
    "grad": lambda h: jax.grad(h),
    "jvp": lambda h: lambda x: jax.jvp(h, (x,), (jnp.ones_like(x),)),
    "hessian": lambda h: jax.hessian(h),
    "gradgrad": _second,
}


@functools.cache
def _jitted_sqrt(transform):
    return jax.jit(SQRT_TRANSFORMS[transform](_sqrt_fp))


@pytest.mark.parametrize("xv", [2.0, 9.0])
@pytest.mark.parametrize("transform", sorted(SQRT_TRANSFORMS))
def test_sqrt_newton_fixed_point_closed_form(x64, transform, xv):
    x = jnp.asarray(xv, jnp.float64)
    out = _jitted_sqrt(transform)(x)  # the value sqrt(x) is checked through jvp's primal
    d1, d2 = 0.5 / np.sqrt(xv), -0.25 * xv ** -1.5
    if transform == "jvp":
        np.testing.assert_allclose(float(out[0]), np.sqrt(xv), rtol=1e-10)
        np.testing.assert_allclose(float(out[1]), d1, rtol=1e-10)
    elif transform == "grad":
        np.testing.assert_allclose(float(out), d1, rtol=1e-10)
    else:
        np.testing.assert_allclose(float(out), d2, rtol=1e-10)


@pytest.mark.parametrize("xv", [2.0, 9.0])
def test_fixed_point_sqrt_gradient(x64, xv):
    g = jax.grad(deq.fixed_point_sqrt)(jnp.asarray(xv, jnp.float64))
    np.testing.assert_allclose(float(g), 0.5 / np.sqrt(xv), rtol=1e-12)


@pytest.mark.parametrize("transform", ["hessian", "gradgrad"])
def test_fixed_point_sqrt_second_order_by_reverse_over_reverse(x64, transform):
    # Documented: the backward rule 0.5 / y is differentiated, y through the Newton steps.
    x = jnp.asarray(2.0, jnp.float64)
    fn = jax.hessian if transform == "hessian" else _second
    np.testing.assert_allclose(float(fn(deq.fixed_point_sqrt)(x)), -0.25 * 2.0 ** -1.5,
                               rtol=1e-12)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd"])
def test_fixed_point_sqrt_refuses_forward_mode_naming_fixed_point(x64, transform):
    h = deq.fixed_point_sqrt
    x = jnp.asarray(2.0, jnp.float64)
    call = {
        "jvp": lambda: jax.jvp(h, (x,), (jnp.ones_like(x),)),
        "jacfwd": lambda: jax.jacfwd(h)(x),
    }[transform]
    with pytest.raises(TypeError, match="forward mode") as info:
        jax.block_until_ready(call())
    assert "deq.fixed_point" in str(info.value)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("loop", ["solve", "unroll"])
def test_complex_residual_entries_do_not_cancel(loop):
    a = jnp.asarray([1.0, 1j, 0.5, 0.5j], jnp.complex64)  # sum(a * a) == 0, |a| = 1.58
    adjoint = deq.UnrolledAdjoint() if loop == "unroll" else deq.ImplicitAdjoint()
    sol = jax.jit(lambda a: deq.fixed_point(lambda z, a: a, jnp.zeros(4, jnp.complex64), a,
                                            adjoint=adjoint, max_steps=1))(a)
    assert not bool(sol.stats.converged), sol.stats
    assert int(sol.stats.result) != deq.RESULTS.SUCCESSFUL
    np.testing.assert_allclose(float(jnp.real(sol.stats.abs_residual)), np.sqrt(2.5),
                               rtol=1e-5)


def _blowup(z, args):
    a, c = args
    return c * z * z + a


NONFINITE_CASES = {
    # f(z0) is NaN
    "nan_arg": (np.zeros(N), np.array([np.nan, 0.1, 0.1, 0.1]), 0.0),
    # the start is infinite
    "inf_start": (np.array([np.inf, 0.0, 0.0, 0.0]), np.full(N, 0.1), 0.0),
    # z <- z^2 + 2 has no real fixed point and overflows to inf
    "overflow": (np.zeros(N), np.full(N, 2.0), 1.0),
}


@pytest.mark.parametrize("loop", [
    "solve", pytest.param("unroll", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype_name", sorted(TOLS))
def test_nonfinite_is_never_reported_converged(dtype_name, loop):
    dt = jnp.dtype(dtype_name)
    adjoint = deq.UnrolledAdjoint() if loop == "unroll" else deq.ImplicitAdjoint()

    @jax.jit
    def run(z0, a, c):
        return deq.fixed_point(_blowup, z0, (a, c), solver=deq.Anderson(**TOLS[dtype_name]),
                               adjoint=adjoint, max_steps=40)

    for case, (z0, a, c) in NONFINITE_CASES.items():
        sol = run(*(jnp.asarray(np.asarray(v).astype(dt)) for v in (z0, a, c)))
        value = np.asarray(sol.value, np.complex128)
        # None of these problems has a finite fixed point reachable from z0.
        assert not bool(sol.stats.converged), (case, sol.stats.summary())
        assert int(sol.stats.result) != deq.RESULTS.SUCCESSFUL, (case, sol.stats.summary())
        _assert_no_nonfinite_success(value, sol.stats.converged, sol.stats.result)


@pytest.mark.parametrize("adjoint", [deq.PhantomAdjoint(steps=4, damping=0.5),
                                     deq.JacobianFreeAdjoint()], ids=["phantom", "jfb"])
def test_phantom_step_that_overflows_is_reported_nonfinite(adjoint):
    # Two finite evaluations (f(0) = 1, f(1) = 1e10) end the forward solve at MAX_STEPS with
    # the best iterate z = 0; four damped phantom steps from there overflow float32 (0.5,
    # 1.3e9, 7.8e27, inf), one step (JFB) does not.
    f = lambda z, a: a * z * z + 1.0
    sol = deq.fixed_point(f, jnp.zeros(2), jnp.float32(1e10), solver=deq.FixedPointIteration(),
                          adjoint=adjoint, max_steps=2)
    finite = bool(np.all(np.isfinite(np.asarray(sol.value))))
    assert finite == (adjoint.steps == 1)
    expected = deq.RESULTS.MAX_STEPS if finite else deq.RESULTS.NONFINITE
    assert int(sol.stats.result) == expected, sol.stats.summary()
    assert list(np.asarray(sol.stats.result_per_sample)) == [expected]
    assert not bool(sol.stats.converged)

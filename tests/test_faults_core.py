"""Faults and bad inputs met by the core, as a user would meet them.

A NaN sample in a batch, a diverging unrolled run, Python scalars in ``args``, mistyped
options, an empty batch, and backward statistics shared by several solves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq

OK, NONFINITE = int(deq.RESULTS.SUCCESSFUL), int(deq.RESULTS.NONFINITE)
GOOD = np.array([0, 2])  # the healthy samples of the three-sample batches below


# --- one bad sample in a batch -----------------------------------------------------------

def _half_plus_x(z, x):
    """Fixed point 2 x; a sample whose input is NaN returns NaN at every step."""
    return jnp.where(jnp.isnan(x), jnp.nan, 0.5 * z + x)


@pytest.mark.parametrize("solver", [
    deq.FixedPointIteration(rtol=1e-6), deq.FixedPointIteration(damping=0.3, rtol=1e-6),
    deq.Anderson(rtol=1e-6), deq.Broyden(rtol=1e-6),
], ids=["iteration", "damped", "anderson", "broyden"])
def test_a_nan_sample_does_not_stop_the_healthy_ones(solver):
    x = jnp.array([[1.0, 1.0], [jnp.nan, 1.0], [1.0, 1.0]])
    sol = jax.jit(lambda x: deq.fixed_point(_half_plus_x, jnp.zeros((3, 2)), x, solver=solver,
                                            batched=True, max_steps=200))(x)
    st = sol.stats
    np.testing.assert_allclose(sol.value[GOOD], 2.0, rtol=1e-5)
    assert bool(jnp.all(jnp.isfinite(sol.value)))  # the bad sample: its best finite iterate
    assert st.result_per_sample.tolist() == [OK, NONFINITE, OK]
    assert int(st.result) == NONFINITE and not bool(st.converged)
    assert bool(jnp.all(st.abs_residual_per_sample[GOOD] < 1e-4))
    # The trace follows the healthy samples, not the inf of the bad one.
    n = int(st.num_steps)
    assert np.all(np.isfinite(st.abs_trace[:n])) and float(st.abs_trace[n - 1]) < 1e-4


def test_a_sample_that_overflows_later_is_frozen_at_its_best_iterate():
    a = jnp.array([[0.5], [3.0], [0.5]])  # the middle sample diverges to inf in float32

    def fn(z, a):
        return a * z + 1.0

    solver = deq.FixedPointIteration(rtol=1e-6, stall_patience=None)
    sol = deq.fixed_point(fn, jnp.zeros((3, 1)), a, solver=solver, batched=True, max_steps=200)
    assert sol.stats.result_per_sample.tolist() == [OK, NONFINITE, OK]
    np.testing.assert_allclose(sol.value[GOOD], 2.0, rtol=1e-5)
    # Its best iterate is the start: every later one is further from a fixed point.
    assert float(sol.value[1, 0]) == 0.0
    assert float(sol.stats.abs_residual_per_sample[1]) == pytest.approx(1.0)


def test_values_and_gradients_of_healthy_samples_survive_a_nan_sample():
    def loss(x):
        z = deq.fixed_point(_half_plus_x, jnp.zeros((3, 2)), x, batched=True).value
        return jnp.sum(jnp.where(jnp.isnan(x), 0.0, z))

    x = jnp.array([[1.0, 1.0], [jnp.nan, 1.0], [1.0, 1.0]])
    value, g = jax.jit(jax.value_and_grad(loss))(x)
    assert float(value) == pytest.approx(4 * 2.0, rel=1e-3)
    np.testing.assert_allclose(g[GOOD], 2.0, rtol=1e-4)  # dz*/dx = 1 / (1 - 0.5)


# --- static Python scalars -----------------------------------------------------------------

def test_python_scalars_in_args_reach_fn_unchanged():
    seen = {}

    def fn(z, args):
        n, scale, flag, arr = args["n"], args["scale"], args["flag"], args["arr"]
        seen.update(n=type(n), scale=type(scale), flag=type(flag),
                    arr_traced=isinstance(arr, jax.core.Tracer))
        acc = jnp.zeros((n,))  # a shape from an int: needs a concrete int
        for i in range(n):
            acc = acc.at[i].set(scale * z[i] + i)
        return jnp.where(flag, 0.5 * acc, acc) + 0.0 * arr

    args = {"n": 3, "scale": 0.5, "flag": True, "arr": np.ones(3, np.float32)}
    eager = deq.fixed_point(fn, jnp.zeros(3), args).value
    assert seen["n"] is int and seen["scale"] is float and seen["flag"] is bool
    assert seen["arr_traced"]  # numpy arrays are traced
    jitted = jax.jit(lambda arr: deq.fixed_point(fn, jnp.zeros(3), {**args, "arr": arr}).value)
    np.testing.assert_allclose(jitted(args["arr"]), eager, rtol=1e-6)
    np.testing.assert_allclose(eager, [0.0, 0.5 / 0.75, 1.0 / 0.75], rtol=1e-4)


# --- options validated at construction -----------------------------------------------------

BAD_OPTIONS = [
    (lambda: deq.Anderson(history=2.5), TypeError, "Anderson: history"),
    (lambda: deq.Anderson(history=True), TypeError, "Anderson: history"),
    (lambda: deq.Anderson(rtol=float("nan")), ValueError, "Anderson: rtol"),
    (lambda: deq.Anderson(mixing=True), TypeError, "Anderson: mixing"),
    (lambda: deq.Anderson(ridge=float("inf")), ValueError, "Anderson: ridge"),
    (lambda: deq.Broyden(memory=2.5), TypeError, "Broyden: memory"),
    (lambda: deq.Broyden(atol=float("inf")), ValueError, "Broyden: atol"),
    (lambda: deq.FixedPointIteration(stall_patience=2.0), TypeError, "stall_patience"),
    (lambda: deq.FixedPointIteration(damping="0.5"), TypeError, "damping"),
    (lambda: deq.GMRES(restart=2.5), TypeError, "GMRES: restart"),
    (lambda: deq.GMRES(rtol=-1, atol=-1), ValueError, "GMRES: rtol"),
    (lambda: deq.GMRES(rtol=0, atol=0), ValueError, "GMRES: rtol and atol"),
    (lambda: deq.ImplicitAdjoint(max_steps=2.5), TypeError, "ImplicitAdjoint: max_steps"),
    (lambda: deq.PhantomAdjoint(steps=2.5), TypeError, "PhantomAdjoint: steps"),
    (lambda: deq.PhantomAdjoint(damping=True), TypeError, "PhantomAdjoint: damping"),
    (lambda: deq.JacobianFreeAdjoint(steps=0), ValueError, "JacobianFreeAdjoint: steps"),
    (lambda: deq.UnrolledAdjoint(checkpoint=1), TypeError, "UnrolledAdjoint: checkpoint"),
    (lambda: deq.fixed_point(lambda z, a: z, jnp.zeros(2), max_steps=True), TypeError,
     "max_steps"),
    (lambda: deq.fixed_point(lambda z, a: z, jnp.zeros(2), max_steps=5.0), TypeError,
     "max_steps"),
    (lambda: deq.fixed_point(lambda z, a: z, jnp.zeros(2), batched="yes"), TypeError,
     "batched"),
    (lambda: deq.fixed_point(lambda z, a: z, jnp.zeros(2), max_steps=2**31), ValueError,
     "max_steps=2147483648 is more steps than a solve can count"),
    (lambda: deq.ImplicitAdjoint(max_steps=10**10), ValueError, "ImplicitAdjoint: max_steps"),
]


@pytest.mark.parametrize("make,error,match", BAD_OPTIONS,
                         ids=[m for _, _, m in BAD_OPTIONS])
def test_bad_options_are_named_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_numpy_integers_are_accepted_and_normalised():
    a = deq.Anderson(history=np.int64(3), rtol=np.float64(1e-3))
    assert a == deq.Anderson(history=3, rtol=1e-3) and hash(a) == hash(deq.Anderson(
        history=3, rtol=1e-3))
    assert type(a.history) is int and type(a.rtol) is float
    assert deq.ImplicitAdjoint(max_steps=np.int32(7)).max_steps == 7
    sol = jax.eval_shape(lambda: deq.fixed_point(lambda z, a: 0.5 * z + a, jnp.zeros(2),
                                                 jnp.ones(2), max_steps=np.int64(5)))
    assert sol.stats.abs_trace.shape == (5,)


@pytest.mark.parametrize("solver", [deq.Anderson(), deq.Anderson(fallback=deq.Broyden())])
def test_stats_stay_small_whatever_the_budget(solver):
    """A huge budget costs nothing until it is used: the traces keep at most TRACE_CAP
    entries, every step's entry up to that, every stride-th step beyond it."""
    fn = lambda z, a: 0.5 * jnp.tanh(z) + a  # noqa: E731
    for budget in (5, deq.TRACE_CAP, 2 * 10**8, 2**29):
        sol = jax.eval_shape(lambda b=budget: deq.fixed_point(
            fn, jnp.zeros((3, 2)), jnp.ones((3, 2)), solver=solver, max_steps=b,
            batched=True))
        assert sol.stats.abs_trace.shape == (deq.trace_size(solver.budget(budget)),)
        assert sol.stats.abs_trace.shape[0] <= deq.TRACE_CAP
    assert deq.trace_size(5) == 5 and deq.trace_size(2 * 10**8) <= deq.TRACE_CAP
    # Run for real: a budget of 2e8 steps converges in a few, like a budget of 50.
    sol = deq.fixed_point(fn, jnp.zeros(2), jnp.ones(2), solver=solver, max_steps=2 * 10**8)
    assert bool(sol.stats.converged) and int(sol.stats.num_steps) < 50
    # A budget beyond the cap: entry j holds step (j + 1) * stride (or the last step).
    strict = deq.FixedPointIteration(rtol=0.0, atol=1e-30, stall_patience=10**6)
    slow = lambda z, a: 0.999 * z + a  # noqa: E731
    sol = deq.fixed_point(slow, jnp.zeros(1), jnp.ones(1), solver=strict, max_steps=1000)
    stride = deq.trace_stride(1000)
    assert stride == 4 and sol.stats.abs_trace.shape == (250,)
    full = deq.fixed_point(slow, jnp.zeros(1), jnp.ones(1), solver=strict, max_steps=200)
    np.testing.assert_allclose(sol.stats.abs_trace[:50], full.stats.abs_trace[3:200:4],
                               rtol=1e-6)
    unrolled = deq.fixed_point(slow, jnp.zeros(1), jnp.ones(1), solver=strict, max_steps=1000,
                               adjoint=deq.UnrolledAdjoint())
    np.testing.assert_allclose(unrolled.stats.abs_trace, sol.stats.abs_trace, rtol=1e-5)


# --- empty batch ---------------------------------------------------------------------------

@pytest.mark.parametrize("adjoint", [
    deq.ImplicitAdjoint(), deq.ImplicitAdjoint(solver=deq.GMRES()), deq.PhantomAdjoint(),
    deq.UnrolledAdjoint(),
], ids=["implicit", "implicit-gmres", "phantom", "unrolled"])
def test_an_empty_batch_returns_z0_converged(adjoint):
    def fn(z, args):
        w, x = args
        return jnp.tanh(w * z + x)

    def loss(w):
        sol = deq.fixed_point(fn, jnp.zeros((0, 3)), (w, jnp.ones((0, 3))), batched=True,
                              adjoint=adjoint, max_steps=4)
        return sol.value.sum(), sol

    g, sol = jax.jit(jax.grad(loss, has_aux=True))(jnp.asarray(0.5))
    assert sol.value.shape == (0, 3) and bool(sol.stats.converged)
    assert sol.stats.result_per_sample.shape == (0,)
    assert float(sol.stats.abs_residual) == 0.0
    assert float(g) == 0.0


# --- unrolled runs of a diverging map ------------------------------------------------------

def test_unrolled_diverging_samples_return_their_best_finite_iterate():
    def fn(z, args):
        a, b = args
        return a * z + b  # a = 3 overflows float32 within ~80 steps

    a = jnp.array([[0.5], [3.0], [0.5]])

    def run(b):
        return deq.fixed_point(fn, jnp.zeros((3, 1)), (a, b), solver=deq.FixedPointIteration(),
                               adjoint=deq.UnrolledAdjoint(), batched=True, max_steps=120)

    b = jnp.ones((3, 1))
    sol = run(b)
    assert bool(jnp.all(jnp.isfinite(sol.value)))
    np.testing.assert_allclose(sol.value[GOOD], 2.0, rtol=1e-6)
    assert float(sol.value[1, 0]) == 0.0  # its best iterate: the start
    assert sol.stats.result_per_sample.tolist() == [OK, NONFINITE, OK]
    assert int(sol.stats.result) == NONFINITE
    g = jax.grad(lambda b: run(b).value.sum())(b)
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g[:, 0], [2.0, 0.0, 2.0], rtol=1e-5)


def test_unrolled_map_that_turns_nan_keeps_a_finite_value_and_gradient():
    def fn(z, b):
        # NaN once the iterate passes 1.5 on its way to the fixed point 2 b.
        return jnp.where(z > 1.5, jnp.nan, 0.5 * z + b)

    for solver in (deq.FixedPointIteration(), deq.Anderson()):
        def loss(b, solver=solver):
            sol = deq.fixed_point(fn, jnp.zeros(2), b, solver=solver,
                                  adjoint=deq.UnrolledAdjoint(), max_steps=20)
            return sol.value.sum(), sol

        g, sol = jax.jit(jax.grad(loss, has_aux=True))(jnp.ones(2))
        assert bool(jnp.all(jnp.isfinite(sol.value))) and bool(jnp.all(sol.value <= 1.5))
        assert int(sol.stats.result) == NONFINITE
        assert bool(jnp.all(jnp.isfinite(g)))


# --- backward statistics shared by several solves ------------------------------------------

def _two_solves(x64_dtype):
    def fn(z, args):
        w, x = args
        return jnp.tanh(w * z + x)

    good = deq.ImplicitAdjoint(solver=deq.FixedPointIteration(rtol=1e-8, atol=0.0))
    short = deq.ImplicitAdjoint(solver=deq.FixedPointIteration(rtol=1e-12, atol=0.0),
                                max_steps=2, on_failure="ignore")
    x = jnp.linspace(-1.0, 1.0, 4, dtype=x64_dtype)
    z0 = jnp.zeros(4, x64_dtype)

    def loss(w, probe_a, probe_b):
        za = deq.fixed_point(fn, z0, (w, x), adjoint=good, probe=probe_a).value
        zb = deq.fixed_point(fn, z0, (w, 2 * x), adjoint=short, probe=probe_b).value
        return jnp.sum(za * x) + jnp.sum(jnp.sin(zb))

    return loss


def test_backward_stats_of_solves_sharing_a_probe_add_up(x64):
    loss = _two_solves(jnp.float64)
    w = jnp.asarray(0.9)
    p = deq.backward_stats_probe(jnp.float64)
    ga, gb = jax.jit(jax.grad(loss, argnums=(1, 2)))(w, p, p)
    a, b = deq.backward_stats(ga), deq.backward_stats(gb)
    # One solve each: the meaning of one probe per solve is unchanged.
    assert int(a.num_solves) == 1 and bool(a.converged) and int(a.result) == OK
    assert int(b.num_solves) == 1 and not bool(b.converged) and int(b.num_steps) == 2
    assert int(b.result) == int(deq.RESULTS.MAX_STEPS) and float(a.mean_steps) == int(a.num_steps)
    shared = deq.backward_stats(jax.jit(jax.grad(lambda w, p: loss(w, p, p), argnums=1))(w, p))
    assert int(shared.num_solves) == 2 and int(shared.num_failed) == 1
    assert int(shared.num_steps) == int(a.num_steps) + int(b.num_steps)
    assert float(shared.mean_steps) == pytest.approx((int(a.num_steps) + 2) / 2)
    assert not bool(shared.converged) and int(shared.result) == int(deq.RESULTS.MAX_STEPS)
    np.testing.assert_allclose(shared.abs_residual, np.hypot(a.abs_residual, b.abs_residual),
                               rtol=1e-12)
    u_sq = (a.abs_residual / a.rel_residual) ** 2 + (b.abs_residual / b.rel_residual) ** 2
    np.testing.assert_allclose(shared.rel_residual, shared.abs_residual / np.sqrt(u_sq),
                               rtol=1e-12)
    # Unused probe: zero solves, converged.
    empty = deq.backward_stats(jnp.zeros_like(deq.backward_stats_probe()))
    assert int(empty.num_solves) == 0 and bool(empty.converged) and int(empty.result) == OK


def test_backward_stats_of_a_model_with_two_deq_layers():
    from flax import nnx

    import deq.nnx
    from deq.cells.nnx import MLPCell

    class TwoLayers(nnx.Module):
        def __init__(self, rngs):
            self.first = deq.nnx.DEQ(MLPCell(3, 4, rngs=rngs))
            self.second = deq.nnx.DEQ(MLPCell(4, 4, rngs=rngs))

        def __call__(self, x, probe):
            return self.second(self.first(x, probe=probe), probe=probe)

    model = TwoLayers(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3))

    @nnx.jit
    def probe_grad(model, x, probe):
        return nnx.grad(lambda m, p: jnp.sum(m(x, p) ** 2), argnums=(0, 1))(model, probe)[1]

    st = deq.backward_stats(probe_grad(model, x, deq.backward_stats_probe()))
    assert int(st.num_solves) == 2 and bool(st.converged) and int(st.num_failed) == 0
    assert int(st.num_steps) >= 2 and float(st.rel_residual) < 1e-3

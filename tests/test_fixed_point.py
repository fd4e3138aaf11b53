"""deq.fixed_point: forward solvers x backward modes, on small contractive problems."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PROBLEMS, conv_cell, dense_tanh
from jax.test_util import check_grads

import deq

TIGHT = dict(rtol=1e-11, atol=1e-13)
SOLVERS = {
    "iteration": deq.FixedPointIteration(**TIGHT),
    "damped": deq.FixedPointIteration(damping=0.3, **TIGHT),
    "anderson": deq.Anderson(**TIGHT),
    "broyden": deq.Broyden(**TIGHT),
}
ADJOINT_SOLVERS = {
    "iteration": deq.FixedPointIteration(**TIGHT),
    "anderson": deq.Anderson(**TIGHT),
    "broyden": deq.Broyden(**TIGHT),
    "gmres": deq.GMRES(rtol=1e-12, atol=1e-14),
}


def _loss(fn, z0, solver, adjoint, max_steps=300):
    def loss(args):
        z = deq.fixed_point(fn, z0, args, solver=solver, adjoint=adjoint,
                            max_steps=max_steps).value
        # A fixed random weighting so every entry of z matters.
        leaves = jax.tree_util.tree_leaves(z)
        return sum(jnp.sum(jnp.sin(3.0 * leaf + i)) for i, leaf in enumerate(leaves))
    # Jitted: an eager fixed_point call compiles its loops on every call, and finite
    # differences call the loss many times.
    return jax.jit(loss)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_forward_converges_to_a_fixed_point(x64, problem, solver):
    fn, z0, args = PROBLEMS[problem]()
    sol = deq.fixed_point(fn, z0, args, solver=SOLVERS[solver], max_steps=300)
    assert bool(sol.stats.converged), sol.stats.summary()
    assert int(sol.stats.result) == deq.RESULTS.SUCCESSFUL
    residual = jax.tree_util.tree_map(lambda a, b: a - b, fn(sol.value, args), sol.value)
    assert max(float(jnp.max(jnp.abs(r))) for r in jax.tree_util.tree_leaves(residual)) < 1e-9


@functools.cache
def _unrolled_reference(problem):
    """Gradient of a 200-step unrolled plain iteration, run long past convergence."""
    with jax.enable_x64(True):
        fn, z0, args = PROBLEMS[problem]()
        return jax.grad(_loss(fn, z0, deq.FixedPointIteration(**TIGHT),
                              deq.UnrolledAdjoint(), max_steps=200))(args)


def _solver_pairs():
    """Every forward x adjoint solver pair on every problem; CI runs the full product on the
    dense problem and, on the others, every solver once (the rest is marked slow)."""
    for problem in sorted(PROBLEMS):
        for solver in sorted(SOLVERS):
            for adj in sorted(ADJOINT_SOLVERS):
                full = problem == "dense_tanh" or solver == "anderson" or adj == "anderson"
                marks = () if full else (pytest.mark.slow,)
                yield pytest.param(problem, solver, adj, marks=marks,
                                   id=f"{problem}-{solver}-{adj}")


@pytest.mark.parametrize("problem,solver,adj_solver", list(_solver_pairs()))
def test_implicit_gradient_matches_long_unrolled_run(x64, problem, solver, adj_solver):
    fn, z0, args = PROBLEMS[problem]()
    adjoint = deq.ImplicitAdjoint(solver=ADJOINT_SOLVERS[adj_solver], max_steps=300)
    g_implicit = jax.grad(_loss(fn, z0, SOLVERS[solver], adjoint))(args)
    g_unrolled = _unrolled_reference(problem)
    for a, b in zip(jax.tree_util.tree_leaves(g_implicit), jax.tree_util.tree_leaves(g_unrolled)):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)


def _fd_cases():
    """Every adjoint solver on the dense problem; the others with Anderson in CI (slow: rest)."""
    for problem in sorted(PROBLEMS):
        for adj in sorted(ADJOINT_SOLVERS):
            full = problem == "dense_tanh" or adj == "anderson"
            yield pytest.param(problem, adj, marks=() if full else (pytest.mark.slow,),
                               id=f"{problem}-{adj}")


@pytest.mark.parametrize("problem,adj_solver", list(_fd_cases()))
def test_implicit_gradient_matches_finite_differences(x64, problem, adj_solver):
    fn, z0, args = PROBLEMS[problem]()
    adjoint = deq.ImplicitAdjoint(solver=ADJOINT_SOLVERS[adj_solver], max_steps=300)
    loss = _loss(fn, z0, deq.Anderson(**TIGHT), adjoint)
    check_grads(loss, (args,), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_unrolled_is_exactly_the_iterated_map(x64):
    fn, z0, args = dense_tanh()
    sol = deq.fixed_point(fn, z0, args, solver=deq.FixedPointIteration(),
                          adjoint=deq.UnrolledAdjoint(), max_steps=7)
    z = z0
    for _ in range(7):
        z = fn(z, args)
    np.testing.assert_allclose(sol.value, z, rtol=1e-14)
    assert int(sol.stats.num_steps) == 7


def test_unrolled_checkpoint_gives_the_same_gradient(x64):
    fn, z0, args = conv_cell()
    g1 = jax.grad(_loss(fn, z0, deq.Anderson(), deq.UnrolledAdjoint(), 12))(args)
    g2 = jax.grad(_loss(fn, z0, deq.Anderson(), deq.UnrolledAdjoint(checkpoint=True), 12))(args)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-10)


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def _rel_err(g, ref):
    return float(jnp.linalg.norm(_flat(g) - _flat(ref)) / jnp.linalg.norm(_flat(ref)))


def test_phantom_gradient_approaches_the_exact_one_as_steps_grow(x64):
    fn, z0, args = dense_tanh(scale=0.5)
    solver = deq.Anderson(**TIGHT)
    exact = jax.grad(_loss(fn, z0, solver, deq.ImplicitAdjoint(solver=deq.GMRES(rtol=1e-13),
                                                              max_steps=200)))(args)
    errs = [
        _rel_err(jax.grad(_loss(fn, z0, solver, deq.PhantomAdjoint(steps=k, damping=0.0)))(args),
                 exact)
        for k in (1, 3, 10, 40)
    ]
    # The error of k undamped steps is O(||J||^k): it must shrink geometrically.
    assert errs == sorted(errs, reverse=True), errs
    assert errs[-1] < 1e-8 and errs[0] > 1e-3
    damped = _rel_err(jax.grad(_loss(fn, z0, solver, deq.PhantomAdjoint(steps=40)))(args), exact)
    assert damped < 1e-4


def test_jacobian_free_gradient_is_a_descent_direction(x64):
    fn, z0, args = dense_tanh(scale=0.3)
    solver = deq.Anderson(**TIGHT)
    exact = _flat(jax.grad(_loss(fn, z0, solver, deq.ImplicitAdjoint()))(args))
    jfb = _flat(jax.grad(_loss(fn, z0, solver, deq.JacobianFreeAdjoint()))(args))
    cos = float(exact @ jfb / (jnp.linalg.norm(exact) * jnp.linalg.norm(jfb)))
    assert cos > 0.5
    assert not np.allclose(exact, jfb, rtol=1e-3)  # it is an approximation, not the same


def test_jit_and_vmap(x64):
    fn, z0, args = dense_tanh(dim=4)
    w, u, b, _ = args
    xs = jax.random.normal(jax.random.PRNGKey(3), (6, 4))

    def single(x):
        return deq.fixed_point(fn, jnp.zeros(4), (w, u, b, x)).value

    batched = jax.jit(jax.vmap(single))(xs)
    single_jit = jax.jit(single)
    one_by_one = jnp.stack([single_jit(x) for x in xs])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-9, atol=1e-9)
    grad_one = jax.grad(lambda x: single(x).sum())
    gv = jax.jit(jax.vmap(grad_one))(xs)
    grad_jit = jax.jit(grad_one)
    g1 = jnp.stack([grad_jit(x) for x in xs])
    np.testing.assert_allclose(gv, g1, rtol=1e-8, atol=1e-10)


def test_batched_stops_when_every_sample_converged_and_reports_the_worst(x64):
    fn, z0, args = dense_tanh(batch=4)
    w, u, b, x = args
    x = x.at[2].multiply(30.0)  # saturating sample: a different convergence speed
    solver = deq.FixedPointIteration(rtol=1e-8, atol=0.0)
    sol = deq.fixed_point(fn, z0, (w, u, b, x), solver=solver, batched=True, max_steps=200)
    st = sol.stats
    assert bool(st.converged) and st.abs_residual_per_sample.shape == (4,)
    assert float(st.rel_residual) == pytest.approx(float(jnp.max(st.rel_residual_per_sample)))
    assert bool(jnp.all(st.rel_residual_per_sample <= 1e-8 * (1 + 1e-6)))
    # Per-sample solves agree with the batched one.
    for i in range(4):
        one = deq.fixed_point(fn, z0[i], (w, u, b, x[i]), solver=solver, max_steps=200)
        np.testing.assert_allclose(sol.value[i], one.value, atol=1e-7)
    assert st.abs_trace.shape == (200,)
    n = int(st.num_steps)
    assert np.all(np.isfinite(st.abs_trace[:n])) and np.all(np.isnan(st.abs_trace[n:]))


def test_anderson_and_broyden_need_fewer_steps_than_iteration():
    fn, z0, args = dense_tanh(dim=20, batch=4, scale=0.95)
    steps = {}
    for name, solver in [("iteration", deq.FixedPointIteration(rtol=1e-5)),
                         ("anderson", deq.Anderson(rtol=1e-5)),
                         ("broyden", deq.Broyden(rtol=1e-5))]:
        st = deq.fixed_point(fn, z0, args, solver=solver, max_steps=500, batched=True).stats
        assert bool(st.converged), (name, st.summary())
        steps[name] = int(st.num_steps)
    assert steps["anderson"] < steps["iteration"] and steps["broyden"] < steps["iteration"], steps


def test_non_contractive_cell_reports_failure_without_nans():
    def expanding(z, w):
        return 2.0 * z + w  # plain iteration diverges (Anderson would solve this affine map)

    def shift(z, w):
        return z + w  # no fixed point at all

    cases = [(expanding, deq.FixedPointIteration())] + [
        (shift, s) for s in (deq.FixedPointIteration(), deq.Anderson(), deq.Broyden())
    ]
    for fn, solver in cases:
        sol = jax.jit(lambda w, s=solver, f=fn: deq.fixed_point(f, jnp.ones(3), w, solver=s,
                                                                max_steps=40))(jnp.ones(3))
        assert not bool(sol.stats.converged)
        assert bool(jnp.all(jnp.isfinite(sol.value)))
        assert int(sol.stats.result) in (deq.RESULTS.MAX_STEPS, deq.RESULTS.NONFINITE,
                                         deq.RESULTS.STAGNATED)

    def oscillating(z, w):
        return -1.5 * jnp.tanh(z) + w  # bounded but not contractive at its fixed point

    sol = deq.fixed_point(oscillating, jnp.ones(3), jnp.zeros(3),
                          solver=deq.FixedPointIteration(stall_patience=None), max_steps=30)
    assert int(sol.stats.result) == deq.RESULTS.MAX_STEPS and int(sol.stats.num_steps) == 30
    assert bool(jnp.all(jnp.isfinite(sol.value)))


def test_overflow_stops_with_nonfinite_and_returns_the_best_finite_iterate():
    def fn(z, w):
        return jnp.exp(z) + w  # no fixed point: blows up to inf within a few steps

    sol = deq.fixed_point(fn, jnp.zeros(2), jnp.ones(2), solver=deq.FixedPointIteration(),
                          max_steps=100)
    assert int(sol.stats.result) == deq.RESULTS.NONFINITE
    assert int(sol.stats.num_steps) < 100
    assert bool(jnp.all(jnp.isfinite(sol.value)))


def test_stagnation_is_detected_and_reported():
    def noisy(z, x):
        # A contraction plus a chaotic term of size 1e-3: the residual cannot go below it,
        # like a solve limited by low matmul precision.
        return 0.5 * z + x + 1e-3 * jnp.sin(1e4 * z)

    sol = deq.fixed_point(noisy, jnp.zeros(4), jnp.ones(4),
                          solver=deq.FixedPointIteration(rtol=1e-9, stall_patience=10),
                          max_steps=1000)
    assert int(sol.stats.result) == deq.RESULTS.STAGNATED
    assert int(sol.stats.num_steps) < 200


@pytest.mark.parametrize("solver", [deq.Anderson(history=4), deq.Broyden(memory=4)])
def test_singular_systems_stay_finite(x64, solver):
    # Rank-one linear map: residuals are collinear, Anderson's Gram matrix is singular.
    a = 0.5 * jnp.outer(jnp.ones(6), jnp.ones(6)) / 6

    def fn(z, b):
        return a @ z + b

    tight = type(solver)(**{**vars(solver), "rtol": 1e-12, "atol": 1e-14})
    sol = deq.fixed_point(fn, jnp.zeros(6), jnp.arange(6.0), solver=tight, max_steps=100)
    assert bool(sol.stats.converged)
    np.testing.assert_allclose(sol.value, jnp.linalg.solve(jnp.eye(6) - a, jnp.arange(6.0)),
                               rtol=1e-9)
    # A constant map converges in one step and must not produce 0/0 afterwards.
    const = deq.fixed_point(lambda z, c: c + 0 * z, jnp.zeros(3), jnp.ones(3), solver=solver)
    assert bool(const.stats.converged) and bool(jnp.all(const.value == 1.0))


def test_closed_over_parameters_get_correct_gradients(x64):
    fn, z0, args = dense_tanh()
    w, u, b, x = args

    solver = deq.Anderson(**TIGHT)
    adjoint = deq.ImplicitAdjoint(solver=deq.Anderson(**TIGHT))

    def closure_loss(w):
        return deq.fixed_point(lambda z, x: fn(z, (w, u, b, x)), z0, x, solver=solver,
                               adjoint=adjoint).value.sum()

    def explicit_loss(w):
        return deq.fixed_point(fn, z0, (w, u, b, x), solver=solver, adjoint=adjoint).value.sum()

    g1, g2 = jax.grad(closure_loss)(w), jax.grad(explicit_loss)(w)
    np.testing.assert_allclose(g1, g2, rtol=1e-10)
    assert float(jnp.abs(g1).max()) > 1e-3  # not the silent zero gradient of jaxopt #31
    check_grads(jax.jit(closure_loss), (w,), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_integer_and_static_args_are_allowed(x64):
    def fn(z, args):
        scale, n, name = args["scale"], args["n"], args["name"]
        assert name == "cell"  # non-array leaves arrive unchanged
        return jnp.tanh(scale * z + n)

    def loss(scale):
        args = {"scale": scale, "n": jnp.arange(3), "name": "cell"}
        return deq.fixed_point(fn, jnp.zeros(3), args).value.sum()

    g = jax.jit(jax.grad(loss))(jnp.asarray(0.5))
    assert np.isfinite(float(g)) and float(g) != 0.0


def test_structure_mismatch_raises_before_solving():
    with pytest.raises(ValueError, match="same structure"):
        deq.fixed_point(lambda z, a: (z, z), jnp.zeros(3), None)
    with pytest.raises(ValueError, match="shapes and dtypes"):
        deq.fixed_point(lambda z, a: z[:2], jnp.zeros(3), None)
    with pytest.raises(ValueError, match="shapes and dtypes"):
        deq.fixed_point(lambda z, a: z.astype(jnp.int32), jnp.zeros(3), None)
    with pytest.raises(ValueError, match="batch"):
        deq.fixed_point(lambda z, a: z, {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))},
                        None, batched=True)
    with pytest.raises(TypeError, match="floating-point"):
        deq.fixed_point(lambda z, a: z, jnp.zeros(3, jnp.int32), None)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="history"):
        deq.Anderson(history=0)
    with pytest.raises(ValueError, match="damping"):
        deq.FixedPointIteration(damping=1.0)
    with pytest.raises(ValueError, match="rtol"):
        deq.Broyden(rtol=0.0, atol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        deq.fixed_point(lambda z, a: z, jnp.zeros(2), None, max_steps=0)
    with pytest.raises(TypeError, match="solver"):
        deq.fixed_point(lambda z, a: z, jnp.zeros(2), None, solver="anderson")
    with pytest.raises(ValueError, match="probe"):
        deq.fixed_point(lambda z, a: z, jnp.zeros(2), None, probe=jnp.zeros(3))


def test_backward_stats_through_the_probe(x64):
    fn, z0, args = dense_tanh()

    def loss(args, probe, adjoint):
        return deq.fixed_point(fn, z0, args, adjoint=adjoint, probe=probe).value.sum()

    probe = deq.backward_stats_probe(jnp.float64)
    _, pg = jax.grad(loss, argnums=(0, 1))(args, probe, deq.ImplicitAdjoint())
    st = deq.backward_stats(pg)
    assert bool(st.converged) and 1 <= int(st.num_steps) < 50
    assert int(st.result) == deq.RESULTS.SUCCESSFUL


def test_backward_stats_residual_is_whole_batch(x64):
    # Samples whose cotangent is ~0 meet the absolute tolerance at once with a large relative
    # residual of their own; the reported residual is the batch's, which the gradient sees.
    fn, z0, args = dense_tanh(batch=4)
    weights = jnp.array([1.0, 1e-9, 1e-9, 1e-9])
    adjoint = deq.ImplicitAdjoint(solver=deq.FixedPointIteration(rtol=1e-8, atol=1e-8),
                                  max_steps=100)

    def loss(args, probe):
        z = deq.fixed_point(fn, z0, args, adjoint=adjoint, probe=probe, batched=True).value
        return jnp.sum(weights[:, None] * z)

    _, pg = jax.grad(loss, argnums=(0, 1))(args, deq.backward_stats_probe(jnp.float64))
    st = deq.backward_stats(pg)
    assert bool(st.converged)
    assert float(st.rel_residual) < 1e-6, float(st.rel_residual)


def test_backward_non_convergence_is_detectable_never_silent(x64):
    fn, z0, args = dense_tanh(scale=0.95)
    adjoint = deq.ImplicitAdjoint(solver=deq.FixedPointIteration(rtol=1e-12), max_steps=2)

    def loss(args, probe):
        return deq.fixed_point(fn, z0, args, adjoint=adjoint, probe=probe).value.sum()

    with pytest.warns(RuntimeWarning, match="did not converge"):
        g, pg = jax.grad(loss, argnums=(0, 1))(args, deq.backward_stats_probe(jnp.float64))
        jax.block_until_ready(g)
    st = deq.backward_stats(pg)
    assert not bool(st.converged) and int(st.num_steps) == 2
    assert int(st.result) == deq.RESULTS.MAX_STEPS
    quiet = deq.ImplicitAdjoint(solver=deq.FixedPointIteration(rtol=1e-12), max_steps=2,
                                on_failure="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.block_until_ready(jax.grad(
            lambda a: deq.fixed_point(fn, z0, a, adjoint=quiet).value.sum())(args))


def test_precision_option_runs_and_converges():
    fn, z0, args = conv_cell()
    sol = jax.jit(lambda a: deq.fixed_point(fn, z0, a, precision="highest", batched=True))(args)
    assert bool(sol.stats.converged)


def test_gradient_w_r_t_z0_is_zero_and_args_get_gradients():
    fn, z0, args = dense_tanh()

    def loss(z0, args):
        return deq.fixed_point(fn, z0, args).value.sum()

    gz0, gargs = jax.jit(jax.grad(loss, argnums=(0, 1)))(z0 + 0.1, args)
    assert float(jnp.abs(gz0).max()) == 0.0
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(gargs))


def test_limited_memory_broyden_restarts_instead_of_stalling(x64):
    # A symmetric linear contraction (rho = 0.95) needs far more steps than the memory:
    # a Broyden that overwrote its oldest rank-one update would stall here; restarting
    # converges.
    m = jax.random.normal(jax.random.PRNGKey(0), (60, 60))
    s = (m + m.T) / 2
    a = 0.95 * s / jnp.max(jnp.abs(jnp.linalg.eigvalsh(s)))

    def fn(z, b):
        return a @ z + b

    st = deq.fixed_point(fn, jnp.zeros(60), jnp.ones(60),
                         solver=deq.Broyden(memory=5, rtol=1e-8, atol=0.0), max_steps=400).stats
    plain = deq.fixed_point(fn, jnp.zeros(60), jnp.ones(60),
                            solver=deq.FixedPointIteration(rtol=1e-8, atol=0.0),
                            max_steps=400).stats
    assert bool(st.converged), st.summary()
    assert int(st.num_steps) < int(plain.num_steps)


def test_anderson_and_broyden_within_60_percent_of_iteration_on_a_symmetric_cell(x64):
    # The acceleration the field expects shows on cells whose Jacobian is close to normal;
    # (random non-normal convolutions are the hard case, see the README's benchmark notes).
    m = jax.random.normal(jax.random.PRNGKey(0), (200, 200))
    s = (m + m.T) / 2
    a = 0.95 * s / jnp.max(jnp.abs(jnp.linalg.eigvalsh(s)))

    def fn(z, b):
        return jnp.tanh(a @ z + b)

    steps = {}
    for name, solver in [("iteration", deq.FixedPointIteration(rtol=1e-6, atol=0.0)),
                         ("anderson", deq.Anderson(rtol=1e-6, atol=0.0)),
                         ("broyden", deq.Broyden(rtol=1e-6, atol=0.0))]:
        st = jax.jit(lambda b, s=solver: deq.fixed_point(fn, jnp.zeros(200), b, solver=s,
                                                         max_steps=500).stats)(0.3 * jnp.ones(200))
        assert bool(st.converged), (name, st.summary())
        steps[name] = int(st.num_steps)
    assert steps["anderson"] <= 0.6 * steps["iteration"], steps
    assert steps["broyden"] <= 0.6 * steps["iteration"], steps


def test_errors_raised_by_fn_keep_their_type():
    def fn(z, a):
        if a > 0:  # Python control flow on a traced value: JAX's own error must come through
            return z
        return -z

    with pytest.raises(jax.errors.TracerBoolConversionError):
        deq.fixed_point(fn, jnp.zeros(2), jnp.ones(()))


def test_gmres_stops_inside_a_cycle_and_respects_its_budget(x64):
    from deq import _linear_solve

    n = 40
    a = jnp.eye(n) + 0.1 * jax.random.normal(jax.random.PRNGKey(0), (n, n)) / jnp.sqrt(n)
    b = jax.random.normal(jax.random.PRNGKey(1), (n,))
    calls = dict(rtol=1e-10, atol=0.0, restart=30)
    x, steps, res, conv, finite = _linear_solve.gmres(lambda v: a @ v, b, jnp.zeros(n),
                                                      max_steps=200, **calls)
    assert bool(finite)
    assert bool(conv) and float(res) <= 1e-10 * float(jnp.linalg.norm(b))
    np.testing.assert_allclose(x, jnp.linalg.solve(a, b), rtol=1e-8, atol=1e-9)
    # Clustered eigenvalues: far fewer products than one full cycle of 30 (+2 residuals).
    assert int(steps) < 25, int(steps)
    # A budget smaller than one cycle is respected, and the answer is the best seen.
    x5, steps5, res5, conv5, _ = _linear_solve.gmres(lambda v: a @ v, b, jnp.zeros(n),
                                                     max_steps=5, **calls)
    assert int(steps5) <= 5 and not bool(conv5)
    assert float(res5) < float(jnp.linalg.norm(b))
    np.testing.assert_allclose(res5, jnp.linalg.norm(b - a @ x5), rtol=1e-6)
    # A matvec that turns non-finite stops the solve at once and says so (no budget burnt).
    # Here: finite at x0 = 0, NaN on the (unit-norm) Krylov vectors.
    def nan_on_basis(v):
        return jnp.where(jnp.abs(jnp.linalg.norm(v) - 1) < 1e-6, jnp.nan, a @ v)

    _, steps_nan, _, conv_nan, finite_nan = _linear_solve.gmres(
        nan_on_basis, b, jnp.zeros(n), max_steps=200, **calls)
    assert not bool(finite_nan) and not bool(conv_nan) and int(steps_nan) <= 3


def test_anderson_gram_matrix_stays_exact_when_its_history_wraps(x64):
    from deq import _solvers

    key = jax.random.PRNGKey(3)
    z = jax.random.normal(key, (2, 7))
    for mixing in (1.0, 0.6):
        solver = _solvers.Anderson(history=3, mixing=mixing)
        state = solver.init(z, z)
        for i in range(8):  # wraps the 3-slot ring buffer twice
            fz = jnp.tanh(0.5 * z + 0.1 * i)
            z, state = solver.update(z, fz, state)
            gs, gram = state.residual_history, state.residual_gram
            np.testing.assert_allclose(gram, jnp.einsum("bid,bjd->bij", gs, gs), atol=1e-12)
            np.testing.assert_allclose(gram, jnp.swapaxes(gram, 1, 2), atol=0)
        assert int(state.num_stored) == 8 and bool(jnp.all(jnp.isfinite(z)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_anderson_stays_on_an_exact_fixed_point_in_the_unrolled_loop(dtype):
    # Every stored residual exactly 0 (a Gram matrix of zeros): the weights must stay a
    # convex combination, not collapse to 0 (the unrolled loop does not freeze samples).
    c = jnp.ones((2, 3), dtype)
    sol = deq.fixed_point(lambda z, c: c, c, c, solver=deq.Anderson(history=5),
                          adjoint=deq.UnrolledAdjoint(), max_steps=8, batched=True)
    np.testing.assert_array_equal(np.asarray(sol.value, np.float32), 1.0)


def test_anderson_with_no_ridge_and_collinear_residuals_still_converges():
    # A linear map whose residuals stay collinear: with ridge=0 the Gram matrix is singular.
    f = lambda z, a: 0.5 * z + a  # noqa: E731
    a = jnp.full((1, 4), 2.0)
    sol = deq.fixed_point(f, jnp.zeros_like(a), a, solver=deq.Anderson(ridge=0.0, rtol=1e-6),
                          max_steps=30, batched=True)
    assert bool(sol.stats.converged)
    np.testing.assert_allclose(np.asarray(sol.value), 4.0, rtol=1e-5)

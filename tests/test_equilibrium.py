"""The equilibrium contract: a solve's fallback, per-sample convergence in the layers' stats,
evaluation defaults that converge, and the adaptive Jacobian-penalty weight."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq
import deq.cells.linen
import deq.cells.nnx
import deq.linen
import deq.nnx
from deq import _layer_common as common
from deq.regularization import AdaptiveWeight

# Per sample, f(z) = a_i z + x: plain iteration converges for |a_i| < 1 and diverges
# (its residual grows until the stall rule stops it) for |a_i| > 1, while Broyden solves the
# linear map in a few steps from any point.
A = jnp.array([-0.1, -1.5])
X = jnp.array([[1.0, 2.0, 3.0], [1.0, -1.0, 0.5]])


def affine(z, args):
    a, x = args
    return a[:, None] * z + x


def exact(a, x):
    return x / (1 - a[:, None])


def test_fallback_takes_over_the_samples_the_solver_leaves_and_keeps_the_others():
    plain = deq.FixedPointIteration(stall_patience=8)
    sol = deq.fixed_point(affine, jnp.zeros((2, 3)), (A, X), solver=plain, batched=True,
                          max_steps=40)
    codes = [deq.RESULTS(int(c)) for c in sol.stats.result_per_sample]
    assert codes == [deq.RESULTS.SUCCESSFUL, deq.RESULTS.STAGNATED]  # reported, not hidden

    with_fb = deq.FixedPointIteration(stall_patience=8, fallback=deq.Broyden())
    sol_fb = deq.fixed_point(affine, jnp.zeros((2, 3)), (A, X), solver=with_fb, batched=True,
                             max_steps=40)
    assert bool(sol_fb.stats.converged)
    np.testing.assert_allclose(sol_fb.value, exact(A, X), rtol=1e-3, atol=1e-4)
    # The converged sample stopped where the solver left it: frozen, not moved by Broyden.
    np.testing.assert_array_equal(sol_fb.value[0], sol.value[0])
    n = int(sol_fb.stats.num_steps)
    assert int(sol.stats.num_steps) < n <= 80  # up to max_steps more for the fallback
    assert sol_fb.stats.abs_trace.shape == (80,)
    assert np.all(np.isfinite(sol_fb.stats.abs_trace[:n]))
    # The implicit gradient still flows through a solve that fell back.
    g = jax.grad(lambda x: deq.fixed_point(affine, jnp.zeros((2, 3)), (A, x), solver=with_fb,
                                           batched=True, max_steps=40).value.sum())(X)
    np.testing.assert_allclose(g, np.broadcast_to(1 / (1 - A[:, None]), (2, 3)), rtol=1e-3)


def test_no_fallback_work_when_every_sample_converges():
    a = jnp.array([-0.5, 0.3])
    base = deq.fixed_point(affine, jnp.zeros((2, 3)), (a, X), batched=True)
    fb = deq.fixed_point(affine, jnp.zeros((2, 3)), (a, X), batched=True,
                         solver=deq.Anderson(fallback=deq.Broyden()))
    assert int(fb.stats.num_steps) == int(base.stats.num_steps)
    np.testing.assert_array_equal(fb.value, base.value)


def test_fallback_is_checked():
    with pytest.raises(TypeError, match="fallback"):
        deq.Anderson(fallback="broyden")
    with pytest.raises(TypeError, match="fallback"):
        deq.Anderson(fallback=deq.Broyden(fallback=deq.FixedPointIteration()))


# ---- the layers: evaluation converges by default, and what does not is reported -------------

class NNXAffine(nnx.Module):
    def __init__(self):
        self.scale = nnx.Param(jnp.ones(()))

    def __call__(self, z, x):  # a_i = -1.5 x_i0 per sample
        return self.scale[...] * (-1.5 * x[:, :1]) * z + x


class LinenAffine(nn.Module):
    @nn.compact
    def __call__(self, z, x):
        scale = self.param("scale", nn.initializers.ones, ())
        return scale * (-1.5 * x[:, :1]) * z + x


XL = jnp.array([[1 / 15, 1.0, 2.0], [1.0, -1.0, 0.5]])  # a = -0.1 and -1.5


def _nnx_eval(**kw):
    layer = deq.nnx.DEQ(NNXAffine(), solver=deq.FixedPointIteration(stall_patience=8), **kw)
    layer.eval()
    z = layer(XL)
    return z, layer.stats.get_value()


def _linen_eval(**kw):
    layer = deq.linen.DEQ(cell=LinenAffine(),
                          solver=deq.FixedPointIteration(stall_patience=8), **kw)
    params = layer.init(jax.random.key(0), XL)
    z, aux = layer.apply(params, XL, deterministic=True, mutable=["intermediates"])
    return z, aux["intermediates"]["stats"][0]


@pytest.mark.parametrize("run", [_nnx_eval, _linen_eval], ids=["nnx", "linen"])
def test_layer_evaluation_falls_back_by_default_and_reports_the_fraction(run):
    z, stats = run()
    assert bool(stats.converged) and float(stats.converged_fraction) == 1.0
    a = -1.5 * XL[:, 0]
    np.testing.assert_allclose(z, exact(a, XL), rtol=1e-3, atol=1e-4)
    # An explicit eval_solver is used as given: the expanding sample is reported, not hidden.
    z, stats = run(eval_solver=deq.FixedPointIteration(stall_patience=8))
    assert not bool(stats.converged) and float(stats.converged_fraction) == 0.5
    assert deq.RESULTS(int(stats.result)) == deq.RESULTS.STAGNATED
    assert "converged=50.0%" in stats.summary()


# ---- training: the default solver's unconverged samples go on by damped iteration ---------

class NNXCos(nnx.Module):
    def __init__(self):
        self.scale = nnx.Param(jnp.ones(()))

    def __call__(self, z, x):
        return self.scale[...] * 0.9 * jnp.cos(z) + x


class LinenCos(nn.Module):
    @nn.compact
    def __call__(self, z, x):
        return self.param("scale", nn.initializers.ones, ()) * 0.9 * jnp.cos(z) + x


XC = jnp.linspace(-2.0, 2.0, 8)[:, None] * jnp.ones((1, 4))


def _nnx_train(**kw):
    layer = deq.nnx.DEQ(NNXCos(), max_steps=10, jac_reg_samples=0,
                        warn_unconverged_after=None, **kw)
    layer(XC)
    return layer.stats.get_value()


def _linen_train(**kw):
    layer = deq.linen.DEQ(cell=LinenCos(), max_steps=10, jac_reg_samples=0,
                          warn_unconverged_after=None, **kw)
    params = layer.init(jax.random.key(0), XC)
    _, aux = layer.apply(params, XC, deterministic=False, mutable=["intermediates"])
    return aux["intermediates"]["stats"][0]


@pytest.mark.parametrize("run", [_nnx_train, _linen_train], ids=["nnx", "linen"])
def test_layer_training_solve_falls_back_by_default_and_an_explicit_solver_does_not(run):
    # Anderson leaves this cell at a relative residual of 1e-4 after its 10 steps; the default
    # goes on from its best iterates by Broyden and converges within 10 more.
    stats = run()
    assert bool(stats.converged) and float(stats.converged_fraction) == 1.0
    assert 10 < int(stats.num_steps) <= 20
    stats = run(solver=deq.Anderson())  # as given: stops at its budget, reported
    assert not bool(stats.converged) and int(stats.num_steps) == 10


def test_training_fallback_is_broyden_and_off_for_unrolled_backprop():
    layer = deq.nnx.DEQ(NNXCos(), jac_reg_samples=0)
    assert common.train_solver(layer) == deq.Anderson(fallback=deq.Broyden())
    layer = deq.nnx.DEQ(NNXCos(), adjoint=deq.UnrolledAdjoint(), jac_reg_samples=0)
    assert common.train_solver(layer) == deq.Anderson()


# ---- the adaptive weight of the Jacobian penalty ----------------------------------------------

def test_adaptive_weight_rises_with_the_steps_a_solve_needed():
    w = AdaptiveWeight(max_weight=2.0, target=0.5)
    got = [float(w(n, 30)) for n in (1, 10, 15, 20, 25, 30, 60)]
    assert got[:3] == [0.0, 0.0, 0.0]  # within half the budget: no penalty
    assert got[2] < got[3] < got[4] < got[5] == 2.0 == got[6]
    for bad in (dict(max_weight=-1.0), dict(target=1.0), dict(target=-0.1)):
        with pytest.raises(ValueError):
            AdaptiveWeight(**bad)


def _mlp_nnx(max_steps):
    cell = deq.cells.nnx.MLPCell(4, 8, rngs=nnx.Rngs(0))
    return deq.nnx.DEQ(cell, max_steps=max_steps, jac_reg_samples=1, jac_reg_weight="auto",
                       rngs=nnx.Rngs(1))


def test_adaptive_penalty_is_zero_for_easy_solves_and_on_for_hard_ones_nnx():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4)), jnp.float32)
    easy = _mlp_nnx(max_steps=30)
    easy(x)
    assert int(easy.stats.get_value().num_steps) <= 15
    assert float(easy.jac_loss[...]) == 0.0
    hard = _mlp_nnx(max_steps=2)  # spends its budget (and its fallback's): the full weight
    hard(x)
    assert int(hard.stats.get_value().num_steps) == 4
    fixed = deq.nnx.DEQ(deq.cells.nnx.MLPCell(4, 8, rngs=nnx.Rngs(0)), max_steps=2,
                        jac_reg_samples=1, jac_reg_weight=AdaptiveWeight().max_weight,
                        rngs=nnx.Rngs(1))
    fixed(x)
    assert float(hard.jac_loss[...]) == pytest.approx(float(fixed.jac_loss[...]), rel=1e-6)
    assert float(hard.jac_loss[...]) > 0
    # The layer adds the penalty's gradient to any loss of its output (here 0 times it).
    def loss(layer):
        return 0.0 * jnp.sum(layer(x))
    grads = nnx.grad(loss)(hard)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(
        nnx.grad(loss)(easy)))


def test_an_eager_call_logs_the_same_penalty_as_a_traced_one_without_its_gradient():
    # On concrete arrays nothing can differentiate the output: the penalty's value is logged
    # (the same as under jit) and its second-order gradient pass is skipped.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4)), jnp.float32)

    def layer():
        return deq.nnx.DEQ(deq.cells.nnx.MLPCell(4, 8, rngs=nnx.Rngs(0)), max_steps=2,
                           jac_reg_samples=1, jac_reg_weight=1.0)

    eager, traced = layer(), layer()
    eager(x)
    nnx.jit(lambda m, x: m(x))(traced, x)
    assert float(eager.jac_loss[...]) > 0
    assert float(eager.jac_loss[...]) == pytest.approx(float(traced.jac_loss[...]), rel=1e-5)


def test_adaptive_penalty_linen_matches_its_weight():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4)), jnp.float32)
    for max_steps, on in ((30, False), (2, True)):
        layer = deq.linen.DEQ(cell=deq.cells.linen.MLPCell(8), max_steps=max_steps,
                              jac_reg_samples=1, jac_reg_weight="auto")
        params = layer.init(jax.random.key(0), x)
        _, aux = layer.apply(params, x, rngs={"jac_reg": jax.random.key(1)},
                             mutable=["losses", "intermediates"])
        penalty = float(aux["losses"]["jac_loss"][0])
        assert (penalty > 0) == on


@pytest.mark.parametrize("bad", ["autos", -1.0, float("nan")])
def test_jac_reg_weight_is_checked(bad):
    with pytest.raises((TypeError, ValueError), match="jac_reg_weight"):
        deq.nnx.DEQ(deq.cells.nnx.MLPCell(4, 8, rngs=nnx.Rngs(0)), jac_reg_weight=bad)


def test_empty_batch_penalty_is_zero():
    layer = deq.nnx.DEQ(deq.cells.nnx.MLPCell(4, 8, rngs=nnx.Rngs(0)), jac_reg_samples=1,
                        rngs=nnx.Rngs(1))
    layer(jnp.zeros((0, 4)))
    assert float(layer.jac_loss[...]) == 0.0

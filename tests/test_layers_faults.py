"""DEQ layers (NNX and Linen) met as a user meets their faults: stateful cells, a state wider
than x, transforms around the layer, eager calls, evaluation settings, solves that keep
failing, and bad options. A fault both layers can meet is one test over the two APIs (the
adapters of helpers_layers); tiny MLP cells keep each test to a few compilations."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_layers import APIS, LINEN, NNX, perturbed, randn

import deq
import deq.linen
import deq.nnx
from deq import _layer_common as common
from deq import _unconverged
from deq.cells import linen as linen_cells
from deq.cells.nnx import MLPCell

# ---- stateful cells -------------------------------------------------------------------------

class _Wrap(nnx.Module):
    def __init__(self, make, rngs):
        self.lin = nnx.Linear(3, 3, rngs=rngs)
        self.inner = make(rngs)

    def __call__(self, z, x):
        return self.inner(self.lin(z) + x)


class _Counter(nnx.Variable):
    pass


class _CountingCell(nnx.Module):
    """Counts its calls in a Variable that is neither a Param nor a BatchStat."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 3, rngs=rngs)
        self.calls = _Counter(jnp.zeros((), jnp.int32))

    def __call__(self, z, x):
        self.calls[...] += 1
        return jnp.tanh(self.lin(z) + x)


class _CachingCell(nnx.Module):
    """Keeps its last output in a Variable it creates during the call."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, z, x):
        out = jnp.tanh(self.lin(z) + x)
        self.last = nnx.Variable(out)
        return out


class _StatefulLinen(nn.Module):
    make: str

    @nn.compact
    def __call__(self, z, x):
        h = nn.Dense(3)(z) + x
        if self.make == "batchnorm":
            return nn.BatchNorm(use_running_average=False)(h)
        if self.make == "dropout":
            return nn.Dropout(0.1, deterministic=True)(h)
        if self.make == "spectralnorm":
            return nn.SpectralNorm(nn.Dense(3))(h, update_stats=False)
        self.variable("cache", "last", lambda: h)
        return jnp.tanh(h)


def _wrap(make):
    return lambda: _Wrap(make, nnx.Rngs(0))


@pytest.mark.parametrize("api, make, name", [
    pytest.param(NNX, _wrap(lambda r: nnx.BatchNorm(3, rngs=r)), "nnx.BatchNorm at 'inner'",
                 id="nnx-batchnorm"),
    pytest.param(NNX, _wrap(lambda r: nnx.Dropout(0.1, rngs=r)), "nnx.Dropout at 'inner'",
                 id="nnx-dropout"),
    pytest.param(NNX, _wrap(lambda r: nnx.Dropout(0.1, deterministic=True)),
                 "nnx.Dropout at 'inner'", id="nnx-dropout-deterministic"),
    pytest.param(NNX, _wrap(lambda r: nnx.SpectralNorm(nnx.Linear(3, 3, rngs=r), rngs=r)),
                 "nnx.SpectralNorm at 'inner'", id="nnx-spectralnorm"),
    pytest.param(NNX, _wrap(lambda r: nnx.WeightNorm(nnx.Linear(3, 3, rngs=r), rngs=r)),
                 "nnx.WeightNorm at 'inner'", id="nnx-weightnorm"),
    pytest.param(NNX, lambda: _CountingCell(nnx.Rngs(0)),
                 "a _Counter variable that its call updates at 'calls'", id="nnx-updates"),
    pytest.param(NNX, lambda: _CachingCell(nnx.Rngs(0)),
                 "a Variable variable created by its call at 'last'", id="nnx-creates"),
    pytest.param(LINEN, lambda: _StatefulLinen("batchnorm"),
                 "nn.BatchNorm at 'DEQ/cell/BatchNorm_0'", id="linen-batchnorm"),
    pytest.param(LINEN, lambda: _StatefulLinen("dropout"),
                 "nn.Dropout at 'DEQ/cell/Dropout_0'", id="linen-dropout"),
    pytest.param(LINEN, lambda: _StatefulLinen("spectralnorm"),
                 "nn.SpectralNorm at 'DEQ/cell/SpectralNorm_0'", id="linen-spectralnorm"),
    pytest.param(LINEN, lambda: _StatefulLinen("variable"),
                 "'cache' variable collection at 'cache: cell/last'", id="linen-creates"),
])
def test_stateful_cells_are_rejected_by_name(api, make, name):
    # NNX finds stateful layers at construction and variable writes at the first call; Linen
    # finds both at init.
    with pytest.raises(ValueError, match="cannot be used inside a fixed-point solve") as err:
        api.start(api.layer(make()), jnp.ones((2, 3)))
    message = str(err.value)
    assert f"deq.{api.name}.DEQ" in message and name in message, message
    # ... and says what to use instead.
    assert any(s in message for s in ("GroupNorm", "outside the DEQ", "weight normalisation"))


def test_nnx_cell_replaced_after_construction_is_checked_at_call():
    layer, _, _ = NNX.mlp()
    layer.cell = _Wrap(lambda r: nnx.BatchNorm(3, rngs=r), nnx.Rngs(0))
    with pytest.raises(ValueError, match="nnx.BatchNorm"):
        layer(jnp.ones((2, 3)))


def test_nnx_options_set_after_construction_are_checked_at_call():
    layer, x, _ = NNX.mlp()
    layer.eval_max_steps = 0
    with pytest.raises(ValueError, match="DEQ: eval_max_steps must be >= 1"):
        layer(x)
    layer.eval_max_steps, layer.jac_reg_weight = 60, "always"
    with pytest.raises(ValueError, match="DEQ: jac_reg_weight must be"):
        layer(x)


class _NoisyCell(nn.Module):
    @nn.compact
    def __call__(self, z, x):
        noise = jax.random.normal(self.make_rng("noise"), z.shape)
        return jnp.tanh(nn.Dense(3)(z) + x + 0.01 * noise)


def test_linen_cell_that_draws_random_numbers_is_rejected_by_name():
    layer, x = deq.linen.DEQ(cell=_NoisyCell()), jnp.ones((2, 3))
    with pytest.raises(ValueError, match="has no fixed point") as err:
        # The user passes the rng the cell asks for: the cell is still not a fixed map.
        layer.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x)
    assert "deq.linen.DEQ" in str(err.value) and "make_rng('noise')" in str(err.value)


# ---- a state wider than x -------------------------------------------------------------------

class _WideNNX(nnx.Module):
    """State of width 5 driven by x of width 3, and no state_shape method."""

    def __init__(self, rngs):
        self.w = nnx.Linear(5, 5, rngs=rngs)
        self.u = nnx.Linear(3, 5, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(self.w(z) + self.u(x))


class _WideLinen(nn.Module):
    @nn.compact
    def __call__(self, z, x):
        return jnp.tanh(nn.Dense(5)(z) + nn.Dense(5)(x))


@pytest.mark.parametrize("api, make, match", [
    pytest.param(NNX, lambda: _WideNNX(nnx.Rngs(0)), "z0 of shape", id="nnx"),
    pytest.param(LINEN, _WideLinen, "returned a state of shape \\(2, 5\\)", id="linen"),
])
def test_state_wider_than_x_without_z_init_names_shapes_and_ways_out(api, make, match):
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=match) as err:
        api.start(api.layer(make()), x)
    msg = str(err.value)
    assert f"deq.{api.name}.DEQ" in msg and "(2, 3)" in msg and "z_init" in msg, msg
    assert "state_shape" in msg, msg
    # The first way out works.
    _, z = api.start(api.layer(make(), z_init=lambda x: jnp.zeros((x.shape[0], 5))), x)
    assert z.shape == (2, 5)


# ---- transforms around the NNX layer --------------------------------------------------------

def test_jax_grad_closed_over_the_model_inside_nnx_jit():
    layer, x, _ = NNX.mlp()

    @nnx.jit
    def input_grad(model, x):
        return jax.grad(lambda x: jnp.sum(model(x)))(x)

    @nnx.jit
    def reference(model, x):
        return nnx.grad(lambda model, x: jnp.sum(model(x)), argnums=1)(model, x)

    np.testing.assert_allclose(input_grad(layer, x), reference(layer, x), rtol=1e-5, atol=1e-6)
    assert int(layer.stats.get_value().num_steps) > 0  # written by the nnx transform's call


def test_nnx_vmap_with_the_layer_broadcast():
    layer, x, _ = NNX.mlp()
    single = NNX.clone(layer, batched=False)
    z = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(single, x)
    np.testing.assert_allclose(z, NNX.forward(layer, x)[0], rtol=1e-4, atol=1e-5)
    # Per-sample stats cannot live in the broadcast layer: they are left as they were.
    assert int(single.stats.get_value().num_steps) == 0


# ---- eager calls reuse one compilation ------------------------------------------------------

class _TracedCell(MLPCell):
    traces = 0

    def __call__(self, z, x):
        type(self).traces += 1  # runs only while JAX traces the cell
        return super().__call__(z, x)


class _TracedLinenCell(linen_cells.MLPCell):
    @nn.compact
    def __call__(self, z, x):
        _TracedCell.traces += 1
        return super().__call__(z, x)


@pytest.mark.parametrize("api, make", [
    pytest.param(NNX, lambda: _TracedCell(3, 4, norm=True, rngs=nnx.Rngs(0)), id="nnx"),
    pytest.param(LINEN, lambda: _TracedLinenCell(4, norm=True), id="linen"),
])
def test_eager_calls_after_the_first_do_not_retrace(api, make):
    x = randn((2, 3), 1)
    before = _TracedCell.traces
    # Without the warning and the stabiliser (whose penalty Linen's init does not compute),
    # Linen's init and its training calls share one compilation too.
    h, z1 = api.start(api.layer(make(), warn_unconverged_after=None, jac_reg_samples=0),
                      x)  # NNX: call; Linen: init
    after_first = _TracedCell.traces
    assert after_first > before
    _, stats = api.call(h, x)
    assert int(stats.num_steps) > 1
    z2, _ = api.call(h, x + 1.0)
    # The same layer with other weights shares the compilation.
    api.call(api.with_params(h, perturbed(api.params(h))), x)
    assert _TracedCell.traces == after_first
    assert not np.allclose(z1, z2)


# ---- evaluation-time settings and the unconverged warning -----------------------------------

@pytest.mark.parametrize("api", APIS)
def test_eval_settings_are_used_in_eval_mode(api):
    h, x, _ = api.mlp(max_steps=2, eval_max_steps=40, warn_unconverged_after=None)
    _, stats = api.call(h, x)
    # Training: the budget of 2, and 2 more for the default Broyden fallback.
    assert int(stats.num_steps) == 4 and not bool(stats.converged)
    # The longest budget: evaluation's, doubled by its default Broyden fallback.
    assert stats.abs_trace.shape == (80,)
    z, stats = api.call(api.evaluating(h), x)  # NNX: model.eval(); Linen: deterministic=True
    assert int(stats.num_steps) > 2 and bool(stats.converged) and z.shape == (2, 4)
    assert stats.abs_trace.shape == (80,)  # same shape: a jitted function does not retrace


def test_linen_deterministic_may_be_passed_to_the_call():
    h, x, _ = LINEN.mlp(max_steps=2, eval_max_steps=40, warn_unconverged_after=None)
    steps = lambda **call: int(LINEN.call(h, x, **call)[1].num_steps)
    assert steps(deterministic=False) == 4  # 2, and 2 for the training fallback
    assert steps(deterministic=True) > 4


def test_warns_once_when_training_solves_keep_failing():
    _unconverged.unconverged_counts.clear()
    layer, x, _ = NNX.mlp(solver=deq.FixedPointIteration(), max_steps=2,
                          warn_unconverged_after=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            jax.block_until_ready(NNX.forward(layer, x))
    found = [w for w in caught if issubclass(w.category, deq.nnx.UnconvergedWarning)]
    assert len(found) == 1, [str(w.message) for w in caught]
    message = str(found[0].message)
    assert "3 training solves" in message and "max_steps" in message and "Jacobian" in message
    # Evaluation calls are not counted (only training solves are watched).
    _unconverged.unconverged_counts.clear()
    layer = NNX.evaluating(layer)
    for _ in range(4):
        jax.block_until_ready(NNX.forward(layer, x))
    assert not _unconverged.unconverged_counts
    # Unrolled backprop runs a fixed number of steps: its solves are not watched either.
    layer, x, _ = NNX.mlp(solver=deq.FixedPointIteration(), adjoint=deq.UnrolledAdjoint(),
                          max_steps=2, warn_unconverged_after=1)
    for _ in range(3):
        jax.block_until_ready(NNX.forward(layer, x))
    assert not _unconverged.unconverged_counts


def test_watchers_leave_a_jitted_training_step_effect_free_and_still_warn():
    # A host callback with an effect (jax.debug.callback) would send every call of a jitted
    # step through JAX's Python dispatch path; the layer's and the adjoint's watchers are
    # effect-free, and still report when the only output used is the loss.
    _unconverged.unconverged_counts.clear()
    adjoint = deq.ImplicitAdjoint(solver=deq.FixedPointIteration(), max_steps=1)
    # Without the stabiliser the step's only outputs, the gradients, do not read the
    # solution's value: the watcher must survive through its derivative.
    for api, samples in [(NNX, 1), (LINEN, 1), (NNX, 0), (LINEN, 0)]:
        _unconverged.unconverged_counts.clear()
        h, x, c = api.mlp(solver=deq.FixedPointIteration(), max_steps=2, adjoint=adjoint,
                          warn_unconverged_after=2, jac_reg_samples=samples)
        if api is NNX:
            graphdef, params, rest = nnx.split(h, nnx.Param, ...)

            def loss(params, graphdef=graphdef, rest=rest, x=x, c=c):
                return jnp.sum(c * nnx.merge(graphdef, params, rest, copy=True)(x))
        else:
            params = h.params

            def loss(params, module=h.module, x=x, c=c):
                return jnp.sum(c * module.apply({"params": params}, x))
        step = jax.jit(jax.grad(loss))
        assert not jax.make_jaxpr(jax.grad(loss))(params).effects
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                jax.block_until_ready(step(params))
        messages = [str(w.message) for w in caught]
        assert any(issubclass(w.category, deq.nnx.UnconvergedWarning) for w in caught), messages
        assert any("backward (adjoint) solve did not converge" in m for m in messages), messages


# ---- options --------------------------------------------------------------------------------

@pytest.mark.parametrize("api", APIS)
def test_int_options_take_numpy_ints_and_reject_floats_and_bools(api):
    make = api.layer
    layer = make(max_steps=np.int64(5), eval_max_steps=np.int32(7), jac_reg_samples=np.int8(0))
    assert common.trace_length(layer) == 14  # 7, doubled by the eval fallback
    for field, value in [("max_steps", 5.0), ("max_steps", True), ("eval_max_steps", 2.5),
                         ("jac_reg_samples", False), ("warn_unconverged_after", 1.5)]:
        with pytest.raises(TypeError, match=f"DEQ: {field} must be an integer"):
            make(**{field: value})
    with pytest.raises(ValueError, match="eval_max_steps must be >= 1"):
        make(eval_max_steps=0)
    with pytest.raises(TypeError, match="eval_solver"):
        make(eval_solver=deq.ImplicitAdjoint())
    with pytest.raises(TypeError, match="batched must be True or False"):
        make(batched=1)
    with pytest.raises(ValueError, match="DEQ: precision must be None, 'default'"):
        make(precision="bogus")
    with pytest.raises(ValueError, match="max_steps=2147483648 is more steps"):
        make(max_steps=2**31)
    make(precision=jax.lax.Precision.HIGHEST)  # JAX's enum is accepted too


@pytest.mark.parametrize("api", APIS)
def test_z_init_of_the_wrong_shape_is_named(api):
    layer, x, _ = api.mlp(z_init=lambda x: jnp.zeros((x.shape[0], 7)))
    with pytest.raises(ValueError, match=r"z0 of shape \(2, 7\) \(z_init=<function"):
        api.forward(layer, x)


def test_flax_linen_weightnorm_in_a_cell_works():
    # Linen's nn.WeightNorm computes the normalised kernel on each call (nothing written):
    # it works inside a cell, gradients included. (NNX's writes in place: rejected above.)
    class Cell(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            return jnp.tanh(0.5 * nn.WeightNorm(nn.Dense(3))(z) + x)

    layer = deq.linen.DEQ(cell=Cell())
    x = randn((2, 3), 1)
    params = layer.init(jax.random.key(0), x)["params"]
    grads = jax.grad(lambda p: layer.apply({"params": p}, x).sum())(params)
    assert all(np.isfinite(g).all() and np.abs(g).sum() > 0
               for g in jax.tree_util.tree_leaves(grads))

"""DEQ layers (NNX and Linen) met as a user meets their faults: stateful cells, a state wider
than x, transforms around the layer, eager calls, evaluation settings, solves that keep
failing, and bad options. Tiny MLP cells keep each test to a few compilations."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_layers import randn

import deq
import deq.linen
import deq.nnx
from deq import _layer_common as common
from deq.cells import linen as linen_cells
from deq.cells.nnx import MLPCell

_forward = nnx.jit(lambda m, x: m(x))


def _layer(**options):
    return deq.nnx.DEQ(MLPCell(3, 4, norm=True, rngs=nnx.Rngs(0)), **options)


# ---- stateful cells -------------------------------------------------------------------------

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


@pytest.mark.parametrize("make, what", [
    (_CountingCell, "a _Counter variable that its call updates at 'calls'"),
    (_CachingCell, "a Variable variable created by its call at 'last'"),
], ids=["updates", "creates"])
def test_nnx_cell_that_writes_its_own_variable_is_rejected_by_name(make, what):
    layer = deq.nnx.DEQ(make(nnx.Rngs(0)))
    with pytest.raises(ValueError, match="cannot be used inside a fixed-point solve") as err:
        layer(jnp.ones((2, 3)))
    assert "deq.nnx.DEQ" in str(err.value) and what in str(err.value)


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


def _check_shape_message(err, name):
    msg = str(err.value)
    assert name in msg and "(2, 3)" in msg and "z_init" in msg and "state_shape" in msg, msg


def test_state_wider_than_x_without_z_init_names_shapes_and_ways_out():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="z0 of shape") as err:
        deq.nnx.DEQ(_WideNNX(nnx.Rngs(0)))(x)
    _check_shape_message(err, "deq.nnx.DEQ")
    with pytest.raises(ValueError, match="returned a state of shape \\(2, 5\\)") as err:
        deq.linen.DEQ(cell=_WideLinen()).init(jax.random.key(0), x)
    _check_shape_message(err, "deq.linen.DEQ")
    # The first way out works.
    z = deq.nnx.DEQ(_WideNNX(nnx.Rngs(0)), z_init=lambda x: jnp.zeros((x.shape[0], 5)))(x)
    assert z.shape == (2, 5)


# ---- transforms around the NNX layer --------------------------------------------------------

def test_jax_grad_closed_over_the_model_inside_nnx_jit():
    layer, x = _layer(), randn((2, 3), 1)

    @nnx.jit
    def input_grad(model, x):
        return jax.grad(lambda x: jnp.sum(model(x)))(x)

    @nnx.jit
    def reference(model, x):
        return nnx.grad(lambda model, x: jnp.sum(model(x)), argnums=1)(model, x)

    np.testing.assert_allclose(input_grad(layer, x), reference(layer, x), rtol=1e-5, atol=1e-6)
    assert int(layer.stats.get_value().num_steps) > 0  # written by the nnx transform's call


def test_nnx_vmap_with_the_layer_broadcast():
    layer = _layer()
    single = deq.nnx.DEQ(layer.cell, batched=False)
    x = randn((2, 3), 1)
    z = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(single, x)
    np.testing.assert_allclose(z, _forward(layer, x), rtol=1e-4, atol=1e-5)
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


def test_second_eager_call_does_not_retrace():
    x = randn((2, 3), 1)
    layer = deq.nnx.DEQ(_TracedCell(3, 4, norm=True, rngs=nnx.Rngs(0)))
    z1 = layer(x)
    after_first = _TracedCell.traces
    assert after_first > 0 and int(layer.stats.get_value().num_steps) > 1
    z2 = layer(x + 1.0)
    # Another layer of the same structure with other weights shares the compilation.
    other = deq.nnx.DEQ(_TracedCell(3, 4, norm=True, rngs=nnx.Rngs(5)))
    other(x)
    assert _TracedCell.traces == after_first
    assert not np.allclose(z1, z2)

    # Without the warning, init and training calls share one compilation too.
    linen_layer = deq.linen.DEQ(cell=_TracedLinenCell(4, norm=True), warn_unconverged_after=None)
    params = linen_layer.init(jax.random.key(0), x)
    after_first = _TracedCell.traces
    linen_layer.apply(params, x)
    linen_layer.apply(params, x + 1.0)
    assert _TracedCell.traces == after_first


# ---- evaluation-time settings and the unconverged warning -----------------------------------

def test_eval_settings_are_used_in_eval_mode():
    layer, x = _layer(max_steps=2, eval_max_steps=40), randn((2, 3), 1)
    assert layer.stats.get_value().abs_trace.shape == (40,)
    _forward(layer, x)
    stats = layer.stats.get_value()
    assert int(stats.num_steps) == 2 and not bool(stats.converged)
    layer.eval()
    _forward(layer, x)
    stats = layer.stats.get_value()
    assert int(stats.num_steps) > 2 and bool(stats.converged)
    assert stats.abs_trace.shape == (40,)  # same shape: the jitted function does not retrace

    linen_layer = deq.linen.DEQ(cell=linen_cells.MLPCell(4, norm=True), max_steps=2,
                                eval_max_steps=40, warn_unconverged_after=None)
    params = linen_layer.init(jax.random.key(0), x)  # compiles the training solve

    def steps(**call):
        _, state = linen_layer.apply(params, x, mutable=["intermediates"], **call)
        return int(state["intermediates"]["deq_stats"][0].num_steps)

    assert steps() == 2 and steps(deterministic=False) == 2
    assert steps(deterministic=True) > 2
    assert linen_layer.clone(deterministic=True).apply(params, x).shape == (2, 4)


def test_warns_once_when_training_solves_keep_failing():
    common._unconverged_counts.clear()
    layer = _layer(solver=deq.FixedPointIteration(), max_steps=2, warn_unconverged_after=3)
    x = randn((2, 3), 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            _forward(layer, x)
        jax.effects_barrier()
    found = [w for w in caught if issubclass(w.category, deq.nnx.UnconvergedWarning)]
    assert len(found) == 1, [str(w.message) for w in caught]
    message = str(found[0].message)
    assert "3 training solves" in message and "max_steps" in message and "Jacobian" in message
    # Evaluation calls are not counted (only training solves are watched).
    common._unconverged_counts.clear()
    layer.eval()
    for _ in range(4):
        _forward(layer, x)
    jax.effects_barrier()
    assert not common._unconverged_counts


# ---- options --------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda **o: deq.nnx.DEQ(MLPCell(3, 4, rngs=nnx.Rngs(0)), **o),
    lambda **o: deq.linen.DEQ(cell=linen_cells.MLPCell(4), **o),
], ids=["nnx", "linen"])
def test_int_options_take_numpy_ints_and_reject_floats_and_bools(make):
    layer = make(max_steps=np.int64(5), eval_max_steps=np.int32(7), jac_reg_samples=np.int8(0))
    assert common.trace_length(layer) == 7
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

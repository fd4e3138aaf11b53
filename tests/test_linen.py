"""What only deq.linen.DEQ has: parameter scoping in setup and compact models, stats sown to
"intermediates", the Jacobian penalty sown to "losses". The behaviour both layers share is
tested once for both in test_layers.py; the faults a user meets, in test_layers_faults.py."""

from functools import partial

import flax.linen as nn
import jax
import pytest
from helpers_layers import LINEN, randn

import deq.linen
from deq.cells import linen as linen_cells


def test_classifier_parameters_of_the_cell_live_under_the_layer():
    params = LINEN.trained_classifier().model
    assert set(params["DEQ_0"]) == {"cell"}


class _Setup(nn.Module):
    def setup(self):
        self.deq = deq.linen.DEQ(cell=linen_cells.MLPCell(4))
        self.head = nn.Dense(2)

    def __call__(self, x):
        return self.head(self.deq(x))


class _Compact(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(deq.linen.DEQ(cell=linen_cells.MLPCell(4))(x))


@pytest.mark.parametrize("model, path", [(_Setup(), "deq"), (_Compact(), "DEQ_0")])
def test_cell_parameters_live_under_the_layer_in_setup_and_compact_models(model, path):
    x = randn((2, 3), 1)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert set(params[path]) == {"cell"} and set(params[path]["cell"]) == {"W", "U"}
    assert not any(k.startswith("MLPCell") for k in params)


def test_without_mutable_intermediates_the_output_is_just_z():
    h, x, _ = LINEN.mlp()
    out = jax.eval_shape(h.module.apply, {"params": h.params}, x)
    assert out.shape == (2, 4)


def test_jacobian_penalty_is_not_computed_unless_losses_are_mutable():
    # Not asked for: not computed, and no rng needed (shapes suffice to see that).
    h, x = LINEN.with_penalty()
    _, state = jax.eval_shape(partial(h.module.apply, mutable=["intermediates"]),
                              {"params": h.params}, x)
    assert "losses" not in state

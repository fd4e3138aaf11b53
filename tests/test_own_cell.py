"""A user's own NNX cell, built with the recipe of the README ("Your own cell"), trains and its
solves converge -- at training and at evaluation. CI-sized: 8x8 digits, 4 channels, 40 steps.

The recipe (each item is needed: without the weight-normalised, down-scaled recurrent conv the
untrained cell is not contractive, and without the Jacobian penalty the solves drift to the
step cap as training goes on; see experiments/bench_own_cell.py for the contrast):

1. the recurrent map's convolution wrapped in ``deq.cells.nnx.WeightNorm(..., init_scale=0.25)``;
2. ``deq.cells.nnx.Conv`` instead of ``nnx.Conv`` inside the cell (fast gradient on CPU);
3. a per-sample normalisation (GroupNorm) after adding the injected input;
4. the layer's stabiliser, on by default (a Jacobian penalty with an adaptive weight that the
   layer adds to the gradient itself: nothing in the loss);
5. a solver budget that the solves meet (Anderson, ``max_steps=30``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import deq.nnx
from deq.cells.nnx import Conv, WeightNorm


class MyCell(nnx.Module):
    """z -> relu(GroupNorm(conv(z) + x)): the user's cell, with the recipe's tools."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = WeightNorm(Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs),
                               init_scale=0.25)
        self.norm = nnx.GroupNorm(channels, num_groups=2, rngs=rngs)

    def __call__(self, z, x):
        return jax.nn.relu(self.norm(self.conv(z) + x))


class Model(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, channels, (3, 3), rngs=rngs)
        self.deq = deq.nnx.DEQ(MyCell(channels, rngs=rngs), max_steps=30)
        self.head = nnx.Linear(channels * 64, 10, rngs=rngs)

    def features(self, images):
        return jax.nn.relu(self.stem(images))

    def __call__(self, images):
        z = self.deq(self.features(images))
        return self.head(z.reshape(z.shape[0], -1))


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[..., None] / 16.0 - 0.3).astype(np.float32), d.target.astype(np.int32)


def _relative_residuals(model, images):
    """Per-sample |f(z) - z| / |f(z)| at the layer's output, computed from the cell itself."""
    x = model.features(images)
    z = model.deq(x)
    fz = model.deq.cell(z, x)
    return jnp.sqrt(jnp.sum((fz - z) ** 2, axis=(1, 2, 3)) / jnp.sum(fz ** 2, axis=(1, 2, 3)))


def test_own_cell_with_the_recipe_trains_and_its_solves_converge():
    images, labels = _digits()
    model = Model(4, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce, ce

        (_, ce), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return ce, _relative_residuals(model, x)

    rng = np.random.default_rng(0)
    losses, train_res = [], []
    for _ in range(40):
        idx = rng.choice(1400, 32, replace=False)
        ce, res = train_step(model, optimizer, images[idx], labels[idx])
        losses.append(float(ce))
        train_res.append(float(jnp.max(res)))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    # Training solves meet the solver's tolerance (rtol 1e-4, with float32 slack) all along.
    assert max(train_res) < 1e-3, train_res
    # Evaluation on held-out digits: every sample's solve converged.
    res = nnx.jit(_relative_residuals)(model, images[1400:1528])
    assert float(jnp.max(res)) < 1e-3, float(jnp.max(res))

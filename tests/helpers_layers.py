"""Tiny models and data shared by the layer tests (NNX and Linen built to mirror each other)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import deq
import deq.linen
import deq.nnx
from deq.cells import linen as linen_cells
from deq.cells import nnx as nnx_cells

CHANNELS = 4
CLASSES = 3


def randn(shape, seed=0, dtype=jnp.float32):
    """Test data from NumPy: ``jax.random`` would compile a sampler for every new shape."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def image_batch(n=8, size=6, seed=0):
    """A fixed random batch of ``(n, size, size, 1)`` images whose mean depends on the label."""
    y = jnp.asarray(np.random.default_rng(seed).integers(0, CLASSES, n), jnp.int32)
    return randn((n, size, size, 1), seed) + (y - 1.0)[:, None, None, None], y


def to_float64(params):
    """Cast a pytree of float32 parameters to float64 (cheaper than initialising in float64)."""
    return jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)


def tight():
    """Solver and adjoint options tight enough for float64 gradient checks."""
    return dict(
        solver=deq.Anderson(rtol=1e-12, atol=1e-12, stall_patience=None),
        adjoint=deq.ImplicitAdjoint(solver=deq.Anderson(rtol=1e-10, atol=1e-10), max_steps=200),
        max_steps=200,
    )


def unrolled(steps=300):
    """A long unrolled run of plain iteration: the reference gradient at convergence."""
    return dict(solver=deq.FixedPointIteration(), adjoint=deq.UnrolledAdjoint(), max_steps=steps)


class NNXClassifier(nnx.Module):
    """conv stem -> DEQ(MDEQ cell) -> global average pool -> linear head."""

    def __init__(self, *, rngs: nnx.Rngs, **deq_options):
        self.stem = nnx.Conv(1, CHANNELS, (3, 3), rngs=rngs)
        cell = nnx_cells.MDEQCell(CHANNELS, CHANNELS, num_groups=2, rngs=rngs)
        self.deq = deq.nnx.DEQ(cell, **deq_options)
        self.head = nnx.Linear(CHANNELS, CLASSES, rngs=rngs)

    def __call__(self, x):
        z = self.deq(nnx.relu(self.stem(x)))
        return self.head(jnp.mean(z, axis=(1, 2)))


class LinenClassifier(nn.Module):
    """The Linen twin of :class:`NNXClassifier`."""

    max_steps: int = 30

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(CHANNELS, (3, 3))(x))
        cell = linen_cells.MDEQCell(CHANNELS, num_groups=2)
        z = deq.linen.DEQ(cell=cell, max_steps=self.max_steps)(x)
        return nn.Dense(CLASSES)(jnp.mean(z, axis=(1, 2)))


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def check_directional_derivatives(loss, grads, params, *, seed=0, num_directions=3, eps=1e-4,
                                  rtol=1e-5, atol=1e-7):
    """Compare ``grads`` with central finite differences of ``loss`` along random directions.

    The reverse-mode check of ``jax.test_util.check_grads``, written out so that ``loss`` can
    be any already-compiled function (each evaluation then costs no compilation). ``params``
    and ``grads`` are pytrees of the same structure.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    g_leaves = jax.tree_util.tree_leaves(grads)
    assert len(g_leaves) == len(leaves)
    rng = np.random.default_rng(seed)
    for _ in range(num_directions):
        v = [rng.standard_normal(np.shape(p)) for p in leaves]

        def shifted(s, v=v):
            return jax.tree_util.tree_unflatten(
                treedef, [p + s * d for p, d in zip(leaves, v, strict=True)]
            )

        numeric = (loss(shifted(eps)) - loss(shifted(-eps))) / (2 * eps)
        analytic = sum(np.vdot(g, d) for g, d in zip(g_leaves, v, strict=True))
        assert abs(float(numeric) - float(analytic)) <= atol + rtol * abs(float(analytic)), (
            float(numeric), float(analytic)
        )

"""Pytree states as ``(batch, dim)`` matrices: what the solvers and the adjoint work on.

The solve loops and the solvers see one matrix with a row per sample, so that residual norms,
tolerances and solver updates are per sample; :class:`Flattener` maps a pytree of
floating-point arrays to that matrix (concatenating the leaves' flattened trailing axes) and
back, restoring each leaf's shape and dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


class Flattener:
    """Maps a pytree state to a ``(batch, dim)`` matrix and back.

    With ``batched=True`` every leaf must share its leading axis, which becomes ``batch``;
    otherwise ``batch == 1``.
    """

    def __init__(self, tree, batched: bool, what: str = "z0"):
        leaves, self.treedef = jax.tree_util.tree_flatten(tree)
        if not leaves:
            raise ValueError(f"{what} has no array leaves; there is nothing to solve for.")
        for leaf in leaves:
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                raise TypeError(
                    f"every leaf of {what} must be a floating-point array; got dtype "
                    f"{jnp.result_type(leaf)} with shape {jnp.shape(leaf)}."
                )
        self.shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
        self.dtypes = [jnp.result_type(leaf) for leaf in leaves]
        if batched:
            if any(len(s) == 0 for s in self.shapes):
                raise ValueError(
                    f"batched=True needs a leading batch axis on every leaf of {what}; "
                    f"got shapes {self.shapes}."
                )
            sizes = {s[0] for s in self.shapes}
            if len(sizes) != 1:
                raise ValueError(
                    f"batched=True needs the same leading (batch) size on every leaf of "
                    f"{what}; got shapes {self.shapes}."
                )
            self.batch = self.shapes[0][0]
            self.sizes = [math.prod(s[1:]) for s in self.shapes]
        else:
            self.batch = 1
            self.sizes = [math.prod(s) for s in self.shapes]
        self.dtype = jnp.result_type(*self.dtypes)
        self.dim = sum(self.sizes)

    def flatten(self, tree):
        """The ``(batch, dim)`` matrix of a pytree shaped like the one given at construction."""
        leaves = jax.tree_util.tree_leaves(tree)
        # Explicit sizes: a -1 cannot be inferred for an empty batch.
        mats = [jnp.reshape(leaf, (self.batch, size)).astype(self.dtype)
                for leaf, size in zip(leaves, self.sizes)]
        return mats[0] if len(mats) == 1 else jnp.concatenate(mats, axis=1)

    def unflatten(self, mat):
        """The pytree of a ``(batch, dim)`` matrix, with the original shapes and dtypes."""
        if len(self.sizes) == 1:
            parts = [mat]
        else:
            parts = jnp.split(mat, np.cumsum(self.sizes)[:-1].tolist(), axis=1)
        leaves = [
            jnp.reshape(p, s).astype(dt) for p, s, dt in zip(parts, self.shapes, self.dtypes)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def on_matrices(self, fn):
        """``fn`` (pytree -> pytree shaped like the state) as a map of ``(batch, dim)`` matrices."""
        return lambda mat: self.flatten(fn(self.unflatten(mat)))

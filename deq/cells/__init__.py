"""Equilibrium cells ``f(z, x) -> z`` for the DEQ layers, in NNX and Linen.

* :class:`deq.cells.nnx.MLPCell` / :class:`deq.cells.linen.MLPCell`: fully connected
  ``z -> act(z W + x U + b)`` with optional LayerNorm and weight normalisation.
* :class:`deq.cells.nnx.MDEQCell` / :class:`deq.cells.linen.MDEQCell`: the MDEQ convolutional
  residual cell with input injection, GroupNorm and weight-normalised convolutions.
* :class:`deq.cells.nnx.MultiscaleMDEQCell` / :class:`deq.cells.linen.MultiscaleMDEQCell`:
  multiscale MDEQ (a tuple state at 2 or more resolutions, fused by strided convs and
  upsampling).

Tools for a cell of your own (NNX and Linen, same parameter layouts):

* :class:`deq.cells.nnx.Conv` / :class:`deq.cells.linen.Conv`: drop-ins for Flax's ``Conv``
  (stride 1, SAME) whose gradient is 5-15x faster on CPU inside the DEQ's loops.
* :class:`deq.cells.nnx.WeightNorm` / :class:`deq.cells.linen.WeightNorm`: weight
  normalisation of any ``Conv``/``Linear``/``Dense`` (``kernel = g * v / |v|`` per output).
* :func:`fast_conv_general_dilated`: the convolution function behind ``Conv``, to pass as
  ``conv_general_dilated=`` to Flax's own ``Conv``; :func:`conv_same` / :func:`conv2d_same`:
  the stride-1 SAME convolution with the fast gradient on CPU only / on every backend.

The NNX and Linen versions share their forward math and have the same parameter layout, so
weights move between them without renaming::

  linen_params = deq.cells.to_linen_params(nnx_cell)     # {"W": {"kernel": ...}, ...}
  deq.cells.load_linen_params(nnx_cell, linen_params)    # in place

The two helpers work on any NNX module whose ``nnx.Param`` tree mirrors a Linen ``params``
dict, e.g. ``deq.nnx.DEQ(cell)`` and ``deq.linen.DEQ(cell=...)`` (both keep the cell's
parameters under ``"cell"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Not imported as ``nnx``: that name is this package's submodule ``deq.cells.nnx``.
from flax import nnx as _nnx

from deq.cells import linen, nnx
from deq.cells._conv import conv2d_same, conv_same, fast_conv_general_dilated


def to_linen_params(module: _nnx.Module) -> dict:
    """The ``nnx.Param`` values of ``module`` as a plain nested dict (a Linen ``params``)."""
    return _nnx.to_pure_dict(_nnx.state(module, _nnx.Param))


def load_linen_params(module: _nnx.Module, params: dict) -> None:
    """Overwrite the ``nnx.Param`` values of ``module`` in place from a Linen ``params`` dict.

    Raises:
      ValueError: if the key paths or shapes differ.
    """
    state = _nnx.state(module, _nnx.Param)
    ref = jax.tree_util.tree_map(jnp.shape, _nnx.to_pure_dict(state))
    got = jax.tree_util.tree_map(jnp.shape, dict(params))
    if ref != got:
        raise ValueError(
            f"parameter layouts differ: the NNX module has {ref}, the params have {got}."
        )
    _nnx.replace_by_pure_dict(state, params)
    _nnx.update(module, state)


__all__ = [
    "conv2d_same", "conv_same", "fast_conv_general_dilated", "linen", "load_linen_params", "nnx",
    "to_linen_params",
]

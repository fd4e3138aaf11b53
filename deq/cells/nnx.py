"""Equilibrium cells ``f(z, x) -> z`` as Flax NNX modules.

The math lives in :mod:`deq.cells._functional` and is shared with :mod:`deq.cells.linen`;
the parameter layout is identical, so ``nnx.state(cell, nnx.Param).to_pure_dict()`` *is* the
``params`` dict of the Linen cell with the same options (see :func:`deq.cells.to_linen_params`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from deq.cells import _functional as F


def _as_nnx(tree) -> nnx.Dict:
    """A nested dict of arrays as an ``nnx.Dict`` of ``nnx.Param``s (same key paths)."""
    return nnx.Dict({
        k: _as_nnx(v) if isinstance(v, dict) else nnx.Param(v) for k, v in tree.items()
    })


class _ParamCell(nnx.Module):
    """Stores the parameter groups of a ``_functional`` cell as ``nnx.Dict`` attributes."""

    def _create(self, inits: dict[str, Callable], rngs: nnx.Rngs) -> None:
        clash = [name for name in inits if hasattr(type(self), name)]
        assert not clash, f"parameter groups {clash} would hide methods"
        for name, init in inits.items():
            setattr(self, name, _as_nnx(init(rngs.params())))

    def _params(self) -> dict:
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))


class MLPCell(_ParamCell):
    r"""Fully connected cell :math:`z \mapsto \mathrm{act}(z W + x U + b)`, optionally normed.

    With ``norm=True`` a LayerNorm is applied to the output, which bounds the state and keeps
    the fixed-point map well conditioned when the activation is unbounded (e.g. ``relu``).
    ``W`` starts with spectral radius about 1/2 so that the untrained cell is contractive.
    Parameters: ``W`` (``kernel``, with ``weight_norm`` also ``scale``), ``U`` (``kernel``,
    ``bias``), ``norm`` (``scale``, ``bias``).

    Args:
      in_features: size of the last axis of ``x``.
      features: size of the last axis of ``z``.
      activation: elementwise nonlinearity.
      norm: LayerNorm on the output.
      weight_norm: weight-normalise ``W`` and ``U``.
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` with a ``params`` (or default) stream.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deq.nnx
      >>> from deq.cells.nnx import MLPCell
      >>> layer = deq.nnx.DEQ(MLPCell(3, 8, rngs=nnx.Rngs(0)))
      >>> layer(jnp.ones((2, 3))).shape
      (2, 8)
    """

    def __init__(self, in_features: int, features: int, *, activation: Callable = jnp.tanh,
                 norm: bool = False, weight_norm: bool = False, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.features = features
        self.activation = activation
        self._create(F.mlp_param_inits(in_features, features, weight_norm=weight_norm,
                                       norm=norm, dtype=param_dtype), rngs)

    def state_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``z`` for an input of shape ``x_shape``."""
        return (*x_shape[:-1], self.features)

    def inject(self, x: jax.Array) -> jax.Array:
        """The input injection ``x U + b`` (a starting point: ``DEQ(..., z_init="inject")``)."""
        return F.mlp_inject(self._params(), x)

    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        return F.mlp_cell(self._params(), z, x, self.activation)


class MDEQCell(_ParamCell):
    r"""MDEQ-style convolutional residual cell (Bai et al., 2020), channels last.

    .. math:: z \mapsto \mathrm{GN}_3\big(\mathrm{relu}(z + \mathrm{GN}_2(\mathrm{conv}_2(
       \mathrm{relu}(\mathrm{GN}_1(\mathrm{conv}_1 z)))) + \mathrm{inject}(x))\big)

    GroupNorm statistics are per sample (no batch statistics), so the cell is safe inside a
    batched fixed-point solve; weight normalisation of the convolutions (default on) keeps the
    cell's Lipschitz constant under control as in MDEQ. The gain of ``GN_2`` starts at zero
    (the residual branch starts switched off, as in zero-init residual networks): with unit
    gain the untrained cell is often not contractive and solves stagnate. Parameters:
    ``conv1``, ``conv2`` (``kernel``, ``scale``), ``inject_conv`` (``kernel``, ``bias``,
    ``scale``), ``norm1..3`` (``scale``, ``bias``).

    Args:
      in_channels: channels of ``x``.
      channels: channels of ``z``.
      hidden_channels: channels between the two convolutions (default ``channels``).
      kernel_size: size of the square kernels.
      num_groups: GroupNorm groups; must divide ``channels`` and ``hidden_channels``.
      weight_norm: weight-normalise the convolutions.
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` with a ``params`` (or default) stream.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deq.nnx
      >>> from deq.cells.nnx import MDEQCell
      >>> cell = MDEQCell(1, 8, num_groups=2, rngs=nnx.Rngs(0))
      >>> deq.nnx.DEQ(cell, z_init="inject")(jnp.ones((2, 6, 6, 1))).shape
      (2, 6, 6, 8)
    """

    def __init__(self, in_channels: int, channels: int, *, hidden_channels: int | None = None,
                 kernel_size: int = 3, num_groups: int = 4, weight_norm: bool = True,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        hidden_channels = channels if hidden_channels is None else hidden_channels
        F.check_groups(channels, num_groups, "MDEQCell")
        F.check_groups(hidden_channels, num_groups, "MDEQCell")
        self.channels = channels
        self.num_groups = num_groups
        self._create(F.mdeq_param_inits(in_channels, channels, hidden_channels,
                                        kernel_size=kernel_size, weight_norm=weight_norm,
                                        dtype=param_dtype), rngs)

    def state_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``z`` for an input of shape ``x_shape``."""
        return (*x_shape[:-1], self.channels)

    def inject(self, x: jax.Array) -> jax.Array:
        """The input injection ``conv(x)`` (a starting point: ``DEQ(..., z_init="inject")``)."""
        return F.mdeq_inject(self._params(), x)

    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        return F.mdeq_cell(self._params(), z, x, self.num_groups)


__all__ = ["MDEQCell", "MLPCell"]

"""Equilibrium cells ``f(z, x) -> z`` as Flax Linen modules.

Same math and parameter layout as :mod:`deq.cells.nnx` (both call
:mod:`deq.cells._functional`); input sizes are inferred at ``init`` as usual in Linen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deq._docs import with_shared_doc
from deq.cells import _functional as F


def _create(module: nn.Module, inits: dict[str, Callable]) -> dict:
    return {name: module.param(name, init) for name, init in inits.items()}


class MLPCell(nn.Module):
    r"""Fully connected cell :math:`z \mapsto \mathrm{act}(z W + x U + b)`, optionally normed.

    See :class:`deq.cells.nnx.MLPCell` for the details; parameters have the same names and
    shapes (``W``, ``U``, ``norm``).

    Attributes:
      features: size of the last axis of ``z``.
      activation: elementwise nonlinearity.
      norm: LayerNorm on the output.
      weight_norm: weight-normalise ``W`` and ``U``.
      param_dtype: dtype of the parameters.

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> import deq.linen
      >>> from deq.cells.linen import MLPCell
      >>> layer = deq.linen.DEQ(cell=MLPCell(8))
      >>> x = jnp.ones((2, 3))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> layer.apply(variables, x).shape
      (2, 8)
    """

    features: int
    activation: Callable = jnp.tanh
    norm: bool = False
    weight_norm: bool = False
    param_dtype: Any = jnp.float32

    def state_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``z`` for an input of shape ``x_shape``."""
        return (*x_shape[:-1], self.features)

    def inject(self, x: jax.Array) -> jax.Array:
        """The input injection ``x U + b`` (needs initialised parameters)."""
        return F.mlp_inject(self.variables["params"], x)

    @nn.compact
    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        p = _create(self, F.mlp_param_inits(x.shape[-1], self.features,
                                            weight_norm=self.weight_norm, norm=self.norm,
                                            dtype=self.param_dtype))
        return F.mlp_cell(p, z, x, self.activation)


@with_shared_doc(mdeq_options=F.MDEQ_OPTIONS_DOC)
class MDEQCell(nn.Module):
    r"""MDEQ-style convolutional residual cell (Bai et al., 2020), channels last.

    .. math:: z \mapsto \mathrm{GN}_3\big(\mathrm{relu}(z + \mathrm{GN}_2(\mathrm{conv}_2(
       \mathrm{relu}(\mathrm{GN}_1(\mathrm{conv}_1 z)))) + \mathrm{inject}(x))\big)

    See :class:`deq.cells.nnx.MDEQCell`; parameters have the same names and shapes.

    Attributes:
      {mdeq_options}

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> import deq.linen
      >>> from deq.cells.linen import MDEQCell
      >>> layer = deq.linen.DEQ(cell=MDEQCell(8, num_groups=2), z_init="inject")
      >>> x = jnp.ones((2, 6, 6, 1))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> layer.apply(variables, x).shape
      (2, 6, 6, 8)
    """

    channels: int
    hidden_channels: int | None = None
    kernel_size: int = 3
    num_groups: int = 4
    weight_norm: bool = True
    param_dtype: Any = jnp.float32

    def state_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``z`` for an input of shape ``x_shape``."""
        return (*x_shape[:-1], self.channels)

    def inject(self, x: jax.Array) -> jax.Array:
        """The input injection ``conv(x)`` (needs initialised parameters)."""
        return F.mdeq_inject(self.variables["params"], x)

    @nn.compact
    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        hidden = self.channels if self.hidden_channels is None else self.hidden_channels
        F.check_groups(self.channels, self.num_groups, "MDEQCell")
        F.check_groups(hidden, self.num_groups, "MDEQCell")
        p = _create(self, F.mdeq_param_inits(x.shape[-1], self.channels, hidden,
                                             kernel_size=self.kernel_size,
                                             weight_norm=self.weight_norm,
                                             dtype=self.param_dtype))
        return F.mdeq_cell(p, z, x, self.num_groups)


@with_shared_doc(multiscale_options=F.MULTISCALE_OPTIONS_DOC)
class MultiscaleMDEQCell(nn.Module):
    r"""Multiscale MDEQ cell (Bai et al., 2020): a tuple state at 2 or more resolutions.

    See :class:`deq.cells.nnx.MultiscaleMDEQCell`; parameters have the same names and shapes.

    Attributes:
      {multiscale_options}

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> import deq.linen
      >>> from deq.cells.linen import MultiscaleMDEQCell
      >>> layer = deq.linen.DEQ(cell=MultiscaleMDEQCell((4, 8), num_groups=2), z_init="inject")
      >>> x = jnp.ones((2, 7, 7, 1))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> [a.shape for a in layer.apply(variables, x)]
      [(2, 7, 7, 4), (2, 4, 4, 8)]
    """

    channels: tuple[int, ...] = (16, 32)
    hidden_channels: tuple[int, ...] | None = None
    kernel_size: int = 3
    num_groups: int = 4
    weight_norm: bool = True
    fuse_scale: float = 0.25
    param_dtype: Any = jnp.float32

    def state_shape(self, x_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """The tuple of the branches' shapes for an input of shape ``x_shape``."""
        return F.multiscale_state_shapes(x_shape, tuple(self.channels))

    def inject(self, x: jax.Array) -> tuple:
        """The injection of every branch (needs initialised parameters)."""
        return F.multiscale_inject(self.variables["params"], x, len(self.channels))

    @nn.compact
    def __call__(self, z: tuple, x: jax.Array) -> tuple:
        from deq.cells.nnx import _multiscale_options

        channels, hidden = _multiscale_options(self.channels, self.hidden_channels,
                                               self.num_groups)
        p = _create(self, F.multiscale_param_inits(
            x.shape[-1], channels, hidden, kernel_size=self.kernel_size,
            weight_norm=self.weight_norm, fuse_scale=self.fuse_scale, dtype=self.param_dtype))
        return F.multiscale_cell(p, tuple(z), x, self.num_groups)


# --------------------------------------------------------------------------------------------
# Tools for a user's own cell: a drop-in Conv with the fast CPU gradient, and weight norm.


class Conv(nn.Conv):
    """``nn.Conv`` whose gradient is fast on CPU inside a DEQ's loops (stride 1, SAME).

    A drop-in for ``nn.Conv`` in a cell: same attributes and parameters, same values and
    gradients; see :class:`deq.cells.nnx.Conv`. Raises ``ValueError`` for configurations the
    fast path does not cover (strides, dilation, groups, padding other than SAME, even or
    non-2-D kernels).

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> from deq.cells.linen import Conv
      >>> x = jnp.ones((2, 6, 6, 4))
      >>> Conv(8, (3, 3)).init_with_output(jax.random.key(0), x)[0].shape
      (2, 6, 6, 8)
    """

    conv_general_dilated: Any = F.fast_conv_general_dilated

    def __post_init__(self):
        from deq.cells.nnx import _check_fast_conv

        _check_fast_conv("deq.cells.linen.Conv", self.kernel_size, self.strides, self.padding,
                         self.input_dilation, self.kernel_dilation, self.feature_group_count)
        if self.conv_general_dilated is not F.fast_conv_general_dilated:
            raise TypeError("deq.cells.linen.Conv sets conv_general_dilated itself.")
        super().__post_init__()


class WeightNorm(nn.Module):
    r"""Weight normalisation of any layer with a ``kernel``: ``W = g * v / |v|`` per output.

    Wraps ``nn.Dense``, ``nn.Conv``, :class:`Conv` (any module with a ``kernel`` parameter
    whose last axis is the output one); see :class:`deq.cells.nnx.WeightNorm`. Parameters:
    ``layer`` (the wrapped layer's own: ``kernel`` -- the direction ``v`` -- and ``bias``) and
    ``scale`` (``g``, initialised to ``|v|``), the same layout as the NNX wrapper, wherever the
    wrapped layer was constructed (it is re-homed under this module as ``layer``).

    Attributes:
      layer: the layer to wrap.
      init_scale: ``g`` starts at ``init_scale * |v|`` (see the NNX wrapper).

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> from deq.cells.linen import Conv, WeightNorm
      >>> conv = WeightNorm(Conv(4, (3, 3), use_bias=False))
      >>> variables = conv.init(jax.random.key(0), jnp.ones((2, 6, 6, 4)))
      >>> sorted(variables["params"])
      ['layer', 'scale']
    """

    layer: nn.Module
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        def normalise(variables):
            params = dict(variables["params"])
            if "kernel" not in params:
                raise TypeError(
                    f"WeightNorm wraps a layer with a 'kernel' parameter (nn.Dense, nn.Conv, "
                    f"deq.cells.linen.Conv); {type(self.layer).__name__} has "
                    f"{sorted(params)}."
                )
            v = params["kernel"]
            g = self.param("scale", lambda key: F.weight_norm_scale(v, self.init_scale))
            params["kernel"] = F.weight_norm_kernel(v, g)
            return {**variables, "params": params}

        # One layout wherever the layer was built: a layer constructed inside the user's
        # compact method belongs to the user's module; re-home a copy under this one.
        layer = self.layer if self.layer.parent is self else self.layer.copy(name="layer")
        return nn.map_variables(
            lambda mdl, *a, **k: mdl(*a, **k), "params", trans_in_fn=normalise,
            init=self.is_initializing(),
        )(layer, x, *args, **kwargs)


__all__ = ["Conv", "MDEQCell", "MLPCell", "MultiscaleMDEQCell", "WeightNorm"]

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

from deq._docs import with_shared_doc
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


@with_shared_doc(mdeq_options=F.MDEQ_OPTIONS_DOC)
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
      {mdeq_options}
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


def _multiscale_options(channels, hidden_channels, num_groups):
    channels = tuple(channels)
    if len(channels) < 2:
        raise ValueError(f"MultiscaleMDEQCell: needs 2 or more resolutions, got {channels}.")
    hidden = channels if hidden_channels is None else tuple(hidden_channels)
    if len(hidden) != len(channels):
        raise ValueError(
            f"MultiscaleMDEQCell: hidden_channels={hidden} needs one entry per branch "
            f"(channels={channels})."
        )
    for c in (*channels, *hidden):
        F.check_groups(c, num_groups, "MultiscaleMDEQCell")
    return channels, hidden


@with_shared_doc(multiscale_options=F.MULTISCALE_OPTIONS_DOC)
class MultiscaleMDEQCell(_ParamCell):
    r"""Multiscale MDEQ cell (Bai et al., 2020): a tuple state at 2 or more resolutions.

    Branch ``i`` has ``channels[i]`` channels at spatial size ``ceil(size / 2**i)``. One call:

    1. per branch, MDEQ's residual block
       :math:`b_i = \mathrm{GN}_3(\mathrm{relu}(z_i + \mathrm{GN}_2(\mathrm{conv}_2(
       \mathrm{relu}(\mathrm{GN}_1(\mathrm{conv}_1 z_i)))) + \mathrm{inj}_i))`, where the
       input is injected into every branch, :math:`\mathrm{inj}_i = \mathrm{conv}_i(
       \mathrm{pool}^i(x))` (2x2 average pooling; MDEQ injects into branch 0 only, but a
       branch without injection is close to neutrally stable and its solves crawl);
    2. fusion: :math:`z_i' = \mathrm{GN}(b_i + \sum_{j \ne i} T_{ij} b_j)`
       with :math:`T_{ij}` for a finer branch ``j < i`` a chain of ``i - j`` stride-2 3x3
       convs with GroupNorm (relu between), and for a coarser ``j > i`` a 1x1 conv with
       GroupNorm then nearest upsampling by :math:`2^{j-i}`.

    All convolutions are weight-normalised (``weight_norm``); the GroupNorms are per sample,
    so samples stay independent in a batched solve. The residual branch's gain starts at zero
    and the cross-resolution terms' gains at ``fuse_scale``, which keeps the untrained cell
    contractive. Parameters: ``branch{i}``, ``inject{i}``, ``down{j}_{i}``, ``up{j}_{i}``,
    ``post{i}`` (see :func:`deq.cells._functional.multiscale_param_inits`), the same as
    :class:`deq.cells.linen.MultiscaleMDEQCell`. Use it with ``z_init="inject"`` (or a
    callable): the state is a tuple.

    Args:
      in_channels: channels of ``x`` (which has the resolution of branch 0).
      {multiscale_options}
      rngs: ``nnx.Rngs`` with a ``params`` (or default) stream.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import deq.nnx
      >>> from deq.cells.nnx import MultiscaleMDEQCell
      >>> cell = MultiscaleMDEQCell(1, (4, 8), num_groups=2, rngs=nnx.Rngs(0))
      >>> z = deq.nnx.DEQ(cell, z_init="inject")(jnp.ones((2, 7, 7, 1)))
      >>> [a.shape for a in z]
      [(2, 7, 7, 4), (2, 4, 4, 8)]
    """

    def __init__(self, in_channels: int, channels=(16, 32), *, hidden_channels=None,
                 kernel_size: int = 3, num_groups: int = 4, weight_norm: bool = True,
                 fuse_scale: float = 0.25, param_dtype=jnp.float32, rngs: nnx.Rngs):
        channels, hidden = _multiscale_options(channels, hidden_channels, num_groups)
        self.channels = channels
        self.num_groups = num_groups
        self._create(F.multiscale_param_inits(in_channels, channels, hidden,
                                              kernel_size=kernel_size, weight_norm=weight_norm,
                                              fuse_scale=fuse_scale, dtype=param_dtype), rngs)

    def state_shape(self, x_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """The tuple of the branches' shapes for an input of shape ``x_shape``."""
        return F.multiscale_state_shapes(x_shape, self.channels)

    def inject(self, x: jax.Array) -> tuple:
        """The injection of every branch, a starting point (``z_init="inject"``)."""
        return F.multiscale_inject(self._params(), x, len(self.channels))

    def __call__(self, z: tuple, x: jax.Array) -> tuple:
        return F.multiscale_cell(self._params(), tuple(z), x, self.num_groups)


# --------------------------------------------------------------------------------------------
# Tools for a user's own cell: a drop-in Conv with the fast CPU gradient, and weight norm.


def _check_fast_conv(owner: str, kernel_size, strides, padding, input_dilation,
                     kernel_dilation, feature_group_count) -> None:
    why = F.fast_conv_supported(kernel_size, strides, padding, input_dilation, kernel_dilation,
                                feature_group_count)
    if why is not None:
        raise ValueError(
            f"{owner} is the stride-1 'SAME' 2-D convolution of DEQ cells and needs {why}; "
            "use flax's Conv for other convolutions (e.g. a strided stem outside the DEQ)."
        )


class Conv(nnx.Conv):
    """``nnx.Conv`` whose gradient is fast on CPU inside a DEQ's loops (stride 1, SAME).

    A drop-in for ``nnx.Conv`` in a cell: same constructor, same parameters (``kernel`` in
    ``HWIO``, ``bias``), same values and gradients. Only the convolution function differs
    (:func:`deq.cells.fast_conv_general_dilated`): on CPU its gradient avoids the transposed
    and backward-filter convolutions that XLA:CPU runs 5-15x slower inside ``while`` loops
    (the adjoint solve, unrolled backprop); on GPU/TPU it is ``lax.conv_general_dilated``
    (chosen per platform when the computation is lowered). Restricted to what that fast path
    covers -- a 2-D odd kernel, ``strides=1``, ``padding='SAME'`` (or the equivalent
    symmetric padding), no dilation, ``feature_group_count=1`` -- and raises ``ValueError``
    for anything else.

    The derivative is a custom JVP that JAX transposes for reverse mode: ``jax.grad``,
    ``nnx.grad``, ``jax.jvp``, ``jax.jacfwd`` and ``jax.hessian`` all work.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.cells.nnx import Conv
      >>> Conv(4, 8, (3, 3), rngs=nnx.Rngs(0))(jnp.ones((2, 6, 6, 4))).shape
      (2, 6, 6, 8)
    """

    def __init__(self, in_features: int, out_features: int, kernel_size, strides=1, *,
                 padding="SAME", input_dilation=1, kernel_dilation=1,
                 feature_group_count: int = 1, **kwargs):
        _check_fast_conv("deq.cells.nnx.Conv", kernel_size, strides, padding, input_dilation,
                         kernel_dilation, feature_group_count)
        if "conv_general_dilated" in kwargs:
            raise TypeError("deq.cells.nnx.Conv sets conv_general_dilated itself.")
        super().__init__(in_features, out_features, kernel_size, strides, padding=padding,
                         input_dilation=input_dilation, kernel_dilation=kernel_dilation,
                         feature_group_count=feature_group_count,
                         conv_general_dilated=F.fast_conv_general_dilated, **kwargs)


class WeightNorm(nnx.Module):
    r"""Weight normalisation of any layer with a ``kernel``: ``W = g * v / |v|`` per output.

    Wraps ``nnx.Linear``, ``nnx.Conv``, :class:`Conv` (or any module holding an ``nnx.Param``
    named ``kernel`` whose last axis is the output one) and calls it with the kernel
    :math:`g \, v / \|v\|`, the norm taken per output channel over all other axes (Salimans &
    Kingma, 2016; as MDEQ does). Each output channel's kernel then has norm :math:`|g|`
    whatever the optimiser does to ``v``: this bounds the layer's Lipschitz constant by what
    ``g`` allows, the main thing that keeps a DEQ cell contractive through training. ``g``
    starts at :math:`\|v\|`, so wrapping does not change the initial function.

    Parameters: ``layer`` (the wrapped layer's own, e.g. ``kernel`` -- the direction ``v`` --
    and ``bias``) and ``scale`` (``g``, shape ``(out,)``), all ``nnx.Param``: optimisers and
    ``deq.nnx.DEQ`` see them as usual. The stored ``kernel`` is never overwritten (unlike
    ``nnx.WeightNorm``, which writes the normalised kernel back into the layer and keeps its
    scales outside ``nnx.Param``). Same layout as :class:`deq.cells.linen.WeightNorm`.

    Args:
      layer: the layer to wrap (its own state is used as is; only ``kernel`` is replaced in
        the call).
      init_scale: ``g`` starts at ``init_scale * |v|``: the layer starts as ``init_scale``
        times the wrapped layer's linear map (bias unchanged). For the recurrent convolution
        of a cell ``z -> relu(norm(conv(z) + x))``, 0.25 makes the untrained cell contractive
        where 1 (Flax's default initialisation kept as is) does not.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from deq.cells.nnx import Conv, WeightNorm
      >>> conv = WeightNorm(Conv(4, 4, (3, 3), use_bias=False, rngs=nnx.Rngs(0)))
      >>> conv(jnp.ones((2, 6, 6, 4))).shape
      (2, 6, 6, 4)
      >>> sorted(nnx.to_pure_dict(nnx.state(conv, nnx.Param)))
      ['layer', 'scale']
    """

    def __init__(self, layer: nnx.Module, *, init_scale: float = 1.0):
        kernel = getattr(layer, "kernel", None)
        if not isinstance(kernel, nnx.Param):
            raise TypeError(
                f"WeightNorm wraps a layer with an nnx.Param named 'kernel' (nnx.Linear, "
                f"nnx.Conv, deq.cells.nnx.Conv); {type(layer).__name__} has none."
            )
        self.layer = layer
        self.scale = nnx.Param(F.weight_norm_scale(kernel[...], init_scale))

    def kernel(self) -> jax.Array:
        """The normalised kernel the layer is called with."""
        return F.weight_norm_kernel(self.layer.kernel[...], self.scale[...])

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        graphdef, state = nnx.split(self.layer)
        state = nnx.State(dict(state))
        state["kernel"] = nnx.Param(self.kernel())
        return nnx.merge(graphdef, state)(x, *args, **kwargs)


__all__ = ["Conv", "MDEQCell", "MLPCell", "MultiscaleMDEQCell", "WeightNorm"]

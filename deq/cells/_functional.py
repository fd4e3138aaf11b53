"""The forward math of the cells as pure functions of parameter dicts, shared by NNX and Linen.

Both frameworks hold exactly the dicts built here (same names, shapes and initialisers), so an
NNX cell and a Linen cell with the same parameters compute the same function: only parameter
*storage* differs between ``deq.cells.nnx`` and ``deq.cells.linen``.

Layouts (``F`` features, ``C`` channels, ``H`` hidden channels, ``k`` kernel size)::

  dense: {"kernel": (in, out), ["bias": (out,)], ["scale": (out,)]}
  conv:  {"kernel": (k, k, in, out), ["bias": (out,)], ["scale": (out,)]}
  norm:  {"scale": (features,), "bias": (features,)}

A ``"scale"`` entry in a dense/conv dict means weight normalisation (Salimans & Kingma, 2016):
the kernel used is :math:`g \\, v / \\|v\\|` with the norm over all axes but the output one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from deq.cells._conv import (  # noqa: F401 - the cells' modules reach them through this one
    _NHWC,
    conv2d_same,
    conv_same,
    fast_conv_general_dilated,
    fast_conv_supported,
)

Params = dict

# The options of MDEQCell and MultiscaleMDEQCell that their NNX and Linen classes document.
MDEQ_OPTIONS_DOC = """\
channels: channels of ``z``.
hidden_channels: channels between the two convolutions (default ``channels``).
kernel_size: size of the square kernels.
num_groups: GroupNorm groups; must divide ``channels`` and ``hidden_channels``.
weight_norm: weight-normalise the convolutions.
param_dtype: dtype of the parameters.
"""
MULTISCALE_OPTIONS_DOC = """\
channels: channels per branch, finest first, e.g. ``(16, 32)``.
hidden_channels: channels inside each branch's block (default ``channels``).
kernel_size: kernel of the blocks' convolutions and of the injection.
num_groups: GroupNorm groups; must divide every channel count.
weight_norm: weight-normalise the convolutions.
fuse_scale: initial gain of the fusion's GroupNorms.
param_dtype: dtype of the parameters.
"""


def weight_norm_scale(v: jax.Array, init_scale: float = 1.0) -> jax.Array:
    """``init_scale`` times the per-output-channel norm of a kernel (all axes but the last).

    The initial gain ``g`` of weight normalisation: with ``g = |v|`` the normalised kernel
    starts equal to ``v`` itself, so wrapping a layer does not change its initial function;
    ``init_scale < 1`` starts it as ``init_scale * v`` (a more contractive cell).
    """
    return init_scale * jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(v.ndim - 1))))


def weight_norm_kernel(v: jax.Array, g: jax.Array) -> jax.Array:
    """The weight-normalised kernel ``g * v / |v|`` (Salimans & Kingma, 2016), per output channel.

    ``v``: any kernel whose last axis is the output one (``(in, out)`` dense, ``HWIO`` conv);
    ``g``: ``(out,)``. Each output channel's kernel then has norm ``|g|`` whatever ``v``.
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(v.ndim - 1)), keepdims=True))
    return g * v / jnp.maximum(norm, jnp.finfo(v.dtype).tiny)


def _weight_normed(p: Params) -> jax.Array:
    return weight_norm_kernel(p["kernel"], p["scale"]) if "scale" in p else p["kernel"]


def _kernel_init(key, shape, dtype, scale):
    return jax.nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")(
        key, shape, dtype
    )


def dense_init(key, in_features, out_features, *, use_bias=True, weight_norm=False, scale=1.0,
               dtype=jnp.float32) -> Params:
    """Parameters of :func:`dense`; ``scale`` is the variance scale of the kernel (fan-in)."""
    p = {"kernel": _kernel_init(key, (in_features, out_features), dtype, scale)}
    if use_bias:
        p["bias"] = jnp.zeros((out_features,), dtype)
    if weight_norm:  # g = |v| so that the initial kernel is v itself
        p["scale"] = weight_norm_scale(p["kernel"])
    return p


def dense(p: Params, x: jax.Array) -> jax.Array:
    """``x @ W + b`` over the last axis."""
    y = x @ _weight_normed(p)
    return y + p["bias"] if "bias" in p else y


def conv_init(key, kernel_size, in_channels, out_channels, *, use_bias=True, weight_norm=False,
              scale=1.0, dtype=jnp.float32) -> Params:
    """Parameters of :func:`conv` (kernel in ``HWIO`` layout, as ``flax`` uses)."""
    shape = (kernel_size, kernel_size, in_channels, out_channels)
    p = {"kernel": _kernel_init(key, shape, dtype, scale)}
    if use_bias:
        p["bias"] = jnp.zeros((out_channels,), dtype)
    if weight_norm:
        p["scale"] = weight_norm_scale(p["kernel"])
    return p


def conv(p: Params, x: jax.Array) -> jax.Array:
    """Stride-1 'SAME' 2-D convolution of ``(..., height, width, channels)`` inputs."""
    lead = x.shape[:-3]
    x4 = x.reshape((-1, *x.shape[-3:]))
    kernel = _weight_normed(p).astype(x.dtype)
    y = conv_same(x4, kernel)
    y = y.reshape((*lead, *y.shape[1:]))
    return y + p["bias"] if "bias" in p else y


def norm_init(features, dtype=jnp.float32, scale=1.0) -> Params:
    """Parameters of :func:`group_norm`; ``scale`` is the initial value of the gain."""
    return {"scale": jnp.full((features,), scale, dtype), "bias": jnp.zeros((features,), dtype)}


def group_norm(p: Params, x: jax.Array, num_groups: int, num_axes: int, eps: float = 1e-5):
    """GroupNorm over the last ``num_axes`` axes (channels last), per leading index.

    Statistics are taken per sample (never across the batch), so the cell treats samples
    independently, as a batched fixed-point solve requires. ``num_groups=1, num_axes=1`` is
    LayerNorm over features; ``num_axes=3`` normalises ``(height, width, channels in group)``.
    """
    c = x.shape[-1]
    xg = x.reshape((*x.shape[:-1], num_groups, c // num_groups))
    # Reduce over the spatial axes and the within-group channel axis.
    axes = tuple(range(x.ndim - num_axes, x.ndim - 1)) + (x.ndim,)
    dt = jnp.promote_types(x.dtype, jnp.float32)
    mean = jnp.mean(xg.astype(dt), axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg.astype(dt) - mean), axis=axes, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype).reshape(x.shape)
    return y * p["scale"] + p["bias"]


def check_groups(channels: int, num_groups: int, what: str) -> None:
    if channels % num_groups:
        raise ValueError(
            f"{what}: num_groups={num_groups} must divide the number of channels ({channels})."
        )


# --------------------------------------------------------------------------------------------
# MLP cell: z -> [LayerNorm] act(z W + x U + b)


def mlp_param_inits(in_features: int, features: int, *, weight_norm: bool, norm: bool,
                    dtype) -> dict[str, Callable]:
    """``{name: init(key) -> params}`` of :func:`mlp_cell`, in the order they are created."""
    inits = {
        # Variance scale 1/4: the recurrent map starts with spectral radius ~1/2 (contractive).
        "W": partial(dense_init, in_features=features, out_features=features, use_bias=False,
                     weight_norm=weight_norm, scale=0.25, dtype=dtype),
        "U": partial(dense_init, in_features=in_features, out_features=features,
                     weight_norm=weight_norm, dtype=dtype),
    }
    if norm:
        inits["norm"] = lambda key: norm_init(features, dtype)
    return inits


def mlp_inject(p: Params, x: jax.Array) -> jax.Array:
    return dense(p["U"], x)


def mlp_cell(p: Params, z: jax.Array, x: jax.Array, activation: Callable) -> jax.Array:
    h = activation(dense(p["W"], z) + mlp_inject(p, x))
    return group_norm(p["norm"], h, 1, 1) if "norm" in p else h


# --------------------------------------------------------------------------------------------
# MDEQ residual cell: z -> GN3(relu(z + GN2(conv2(relu(GN1(conv1(z))))) + inject(x)))


def mdeq_param_inits(in_channels: int, channels: int, hidden_channels: int, *, kernel_size: int,
                     weight_norm: bool, dtype) -> dict[str, Callable]:
    """``{name: init(key) -> params}`` of :func:`mdeq_cell`."""
    conv_ = partial(conv_init, kernel_size=kernel_size, weight_norm=weight_norm, dtype=dtype)
    return {
        # No conv bias before a GroupNorm: the norm's shift makes it redundant.
        "conv1": partial(conv_, in_channels=channels, out_channels=hidden_channels,
                         use_bias=False),
        "norm1": lambda key: norm_init(hidden_channels, dtype),
        "conv2": partial(conv_, in_channels=hidden_channels, out_channels=channels,
                         use_bias=False),
        # Zero gain: the residual branch starts switched off (as in zero-init residual
        # networks), which makes the untrained cell contractive on typical inputs; with unit
        # gain it often is not (spectral radius of df/dz above 1, solves stagnate).
        "norm2": lambda key: norm_init(channels, dtype, scale=0.0),
        "inject_conv": partial(conv_, in_channels=in_channels, out_channels=channels,
                               use_bias=True),
        "norm3": lambda key: norm_init(channels, dtype),
    }


def mdeq_inject(p: Params, x: jax.Array) -> jax.Array:
    return conv(p["inject_conv"], x)


def residual_block(p: Params, z: jax.Array, injection, num_groups: int) -> jax.Array:
    """``GN3(relu(z + GN2(conv2(relu(GN1(conv1(z))))) + injection))``: MDEQ's residual block."""
    h = jax.nn.relu(group_norm(p["norm1"], conv(p["conv1"], z), num_groups, 3))
    h = group_norm(p["norm2"], conv(p["conv2"], h), num_groups, 3)
    return group_norm(p["norm3"], jax.nn.relu(z + h + injection), num_groups, 3)


def mdeq_cell(p: Params, z: jax.Array, x: jax.Array, num_groups: int) -> jax.Array:
    return residual_block(p, z, mdeq_inject(p, x), num_groups)


# --------------------------------------------------------------------------------------------
# Multiscale MDEQ cell (Bai et al., 2020): a state at several resolutions, one residual block
# per resolution, then every branch receives every other (strided convs down, 1x1 conv and
# nearest upsampling up). Branch i has spatial size ceil(size / 2**i).


def _grouped(inits: dict[str, Callable]) -> Callable:
    """One ``init(key)`` for a group of named inits (the key split over the names, in order)."""
    def init(key):
        keys = jax.random.split(key, len(inits))
        return {name: f(k) for (name, f), k in zip(inits.items(), keys, strict=True)}
    return init


def _block_inits(channels: int, hidden: int, conv_: Callable, dtype) -> dict[str, Callable]:
    return {
        "conv1": partial(conv_, in_channels=channels, out_channels=hidden, use_bias=False),
        "norm1": lambda key: norm_init(hidden, dtype),
        "conv2": partial(conv_, in_channels=hidden, out_channels=channels, use_bias=False),
        "norm2": lambda key: norm_init(channels, dtype, scale=0.0),  # see mdeq_param_inits
        "norm3": lambda key: norm_init(channels, dtype),
    }


def multiscale_param_inits(in_channels: int, channels: tuple[int, ...],
                           hidden_channels: tuple[int, ...], *, kernel_size: int,
                           weight_norm: bool, fuse_scale: float, dtype) -> dict[str, Callable]:
    """``{name: init(key) -> params}`` of :func:`multiscale_cell`.

    ``branch{i}``: the residual block of resolution ``i`` (``conv1, norm1, conv2, norm2,
    norm3``); ``inject{i}``: the input injection into branch ``i`` (a conv of ``x`` average-
    pooled to that branch's resolution); ``down{j}_{i}`` (``j < i``):
    ``i - j`` stride-2 convs with their GroupNorms (``conv0, norm0, ...``) from branch ``j``
    to branch ``i``; ``up{j}_{i}`` (``j > i``): a 1x1 conv and its GroupNorm from branch ``j``
    to ``i``, followed by nearest upsampling; ``post{i}``: the GroupNorm after fusion. The
    fusion GroupNorms start with gain ``fuse_scale`` (small: the cross-resolution terms start
    weak, which keeps the untrained cell contractive).
    """
    conv_ = partial(conv_init, weight_norm=weight_norm, dtype=dtype)
    conv_k = partial(conv_, kernel_size=kernel_size)
    inits: dict[str, Callable] = {}
    for i, (c, h) in enumerate(zip(channels, hidden_channels, strict=True)):
        inits[f"branch{i}"] = _grouped(_block_inits(c, h, conv_k, dtype))
    for i, c in enumerate(channels):
        inits[f"inject{i}"] = partial(conv_k, in_channels=in_channels, out_channels=c,
                                      use_bias=True)
    n = len(channels)
    for i in range(n):
        for j in range(n):
            if j < i:  # down: i - j stride-2 3x3 convs, channels c_j ... c_j, c_i
                steps = {}
                for s in range(i - j):
                    out = channels[i] if s == i - j - 1 else channels[j]
                    steps[f"conv{s}"] = partial(conv_, kernel_size=3, in_channels=channels[j],
                                                out_channels=out, use_bias=False)
                    sc = fuse_scale if s == i - j - 1 else 1.0
                    steps[f"norm{s}"] = lambda key, out=out, sc=sc: norm_init(out, dtype, sc)
                inits[f"down{j}_{i}"] = _grouped(steps)
            elif j > i:  # up: 1x1 conv c_j -> c_i, GroupNorm, nearest upsampling
                inits[f"up{j}_{i}"] = _grouped({
                    "conv": partial(conv_, kernel_size=1, in_channels=channels[j],
                                    out_channels=channels[i], use_bias=False),
                    "norm": lambda key, c=channels[i]: norm_init(c, dtype, fuse_scale),
                })
    for i, c in enumerate(channels):
        inits[f"post{i}"] = lambda key, c=c: norm_init(c, dtype)
    return inits


def multiscale_state_shapes(x_shape: tuple[int, ...], channels: tuple[int, ...]):
    """Shapes of the branches for an input ``(..., height, width, in_channels)``."""
    *lead, h, w, _ = x_shape
    shapes = []
    for c in channels:
        shapes.append((*lead, h, w, c))
        h, w = -(-h // 2), -(-w // 2)
    return tuple(shapes)


def conv_down(p: Params, x: jax.Array) -> jax.Array:
    """Stride-2 convolution with padding ``(k - 1) // 2`` (output ``ceil(size / 2)``).

    Written as the stride-1 SAME convolution sampled at every other position, which is the
    same function: on CPU it keeps :func:`conv2d_same`'s fast gradient inside loops, at 4x the
    multiply-adds of this one convolution -- still about 2x faster there than the gradient
    of the strided ``lax`` convolution (batch 128, 14x14x16, 3x3, in a ``scan``, 2-core
    CPU); elsewhere the strided convolution itself.
    """
    kernel = _weight_normed(p)
    k = kernel.shape[0]
    lead = x.shape[:-3]
    x4 = x.reshape((-1, *x.shape[-3:]))

    def strided(a, b):
        pad = [((k - 1) // 2, (k - 1) // 2)] * 2
        return jax.lax.conv_general_dilated(a, b, (2, 2), pad, dimension_numbers=_NHWC)

    y = jax.lax.platform_dependent(
        x4, kernel.astype(x.dtype), cpu=lambda a, b: conv2d_same(a, b)[:, ::2, ::2],
        default=strided,
    )
    y = y.reshape((*lead, *y.shape[1:]))
    return y + p["bias"] if "bias" in p else y


def _upsample(x: jax.Array, factor: int, shape: tuple[int, int]) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, factor, axis=-3), factor, axis=-2)
    return x[..., : shape[0], : shape[1], :]


def _pool2(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2, zero padding at the far edge (output ``ceil(size / 2)``)."""
    window = (1,) * (x.ndim - 3) + (2, 2, 1)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "SAME") / 4.0


def multiscale_inject(p: Params, x: jax.Array, num_branches: int) -> tuple:
    """The input injection of every branch: ``conv_i(pool^i(x))``."""
    out = []
    for i in range(num_branches):
        out.append(conv(p[f"inject{i}"], x))
        if i + 1 < num_branches:
            x = _pool2(x)
    return tuple(out)


def multiscale_cell(p: Params, z: tuple, x: jax.Array, num_groups: int) -> tuple:
    n = len(z)
    injection = multiscale_inject(p, x, n)
    blocks = [residual_block(p[f"branch{i}"], z[i], injection[i], num_groups) for i in range(n)]
    out = []
    for i in range(n):
        y = blocks[i]
        for j in range(n):
            if j < i:
                d, q = blocks[j], p[f"down{j}_{i}"]
                for s in range(i - j):
                    d = group_norm(q[f"norm{s}"], conv_down(q[f"conv{s}"], d), num_groups, 3)
                    if s < i - j - 1:
                        d = jax.nn.relu(d)
                y = y + d
            elif j > i:
                q = p[f"up{j}_{i}"]
                u = group_norm(q["norm"], conv(q["conv"], blocks[j]), num_groups, 3)
                y = y + _upsample(u, 2 ** (j - i), blocks[i].shape[-3:-1])
        # No relu before this norm: b_i already went through one, and a second relu + norm
        # made the untrained cell markedly less contractive (solves 25-40% longer).
        out.append(group_norm(p[f"post{i}"], y, num_groups, 3))
    return tuple(out)

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

Params = dict


def _weight_normed(p: Params) -> jax.Array:
    v = p["kernel"]
    if "scale" not in p:
        return v
    axes = tuple(range(v.ndim - 1))
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))
    return p["scale"] * v / jnp.maximum(norm, jnp.finfo(v.dtype).tiny)


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
        p["scale"] = jnp.sqrt(jnp.sum(jnp.square(p["kernel"]), axis=0))
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
        p["scale"] = jnp.sqrt(jnp.sum(jnp.square(p["kernel"]), axis=(0, 1, 2)))
    return p


def _conv_nhwc(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@jax.custom_vjp
def conv2d_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 'SAME' convolution, NHWC input, HWIO kernel with odd spatial sizes.

    Same values and gradients as ``lax.conv_general_dilated``; only the input cotangent is
    written differently: as a plain convolution of the cotangent with the spatially flipped,
    in/out-swapped kernel. JAX's own transpose rule produces a convolution with an ``OIHW``-
    style kernel layout that XLA:CPU runs 10-15x slower when it sits inside a ``while`` or
    ``scan`` body -- exactly where a DEQ's adjoint solve and unrolled backprop put it. On GPU
    both forms compile to the same kernels.
    """
    return _conv_nhwc(x, kernel)


def _conv2d_same_fwd(x, kernel):
    return _conv_nhwc(x, kernel), (x, kernel)


def _conv2d_same_bwd(res, g):
    x, kernel = res
    gx = _conv_nhwc(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    # The kernel cotangent as one small matmul per kernel offset (x shifted against the
    # cotangent), one offset at a time: XLA:CPU's backward-filter convolution for these shapes
    # (a huge contraction into a tiny kernel) is several times slower inside loops, and
    # im2col patches would hold kh * kw copies of the activation at once.
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))

    acc = jnp.promote_types(kernel.dtype, jnp.float32)  # accumulate bf16 in f32, f64 in f64

    def offset(i, gk):
        dy, dx = i // kw, i % kw
        xs = jax.lax.dynamic_slice(xp, (0, dy, dx, 0), (n, h, w, cin))
        blk = jnp.einsum("nhwi,nhwo->io", xs, g, preferred_element_type=acc)
        return jax.lax.dynamic_update_slice(gk, blk[None, None], (dy, dx, 0, 0))

    gk = jax.lax.fori_loop(0, kh * kw, offset, jnp.zeros((kh, kw, cin, cout), acc))
    gk = gk.astype(kernel.dtype)
    return gx, gk


conv2d_same.defvjp(_conv2d_same_fwd, _conv2d_same_bwd)


def conv(p: Params, x: jax.Array) -> jax.Array:
    """Stride-1 'SAME' 2-D convolution of ``(..., height, width, channels)`` inputs."""
    lead = x.shape[:-3]
    x4 = x.reshape((-1, *x.shape[-3:]))
    kernel = _weight_normed(p).astype(x.dtype)
    if kernel.shape[0] % 2 and kernel.shape[1] % 2:
        y = conv2d_same(x4, kernel)
    else:  # even kernels pad asymmetrically: the flipped-kernel identity does not hold
        y = _conv_nhwc(x4, kernel)
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


def mdeq_cell(p: Params, z: jax.Array, x: jax.Array, num_groups: int) -> jax.Array:
    h = jax.nn.relu(group_norm(p["norm1"], conv(p["conv1"], z), num_groups, 3))
    h = group_norm(p["norm2"], conv(p["conv2"], h), num_groups, 3)
    return group_norm(p["norm3"], jax.nn.relu(z + h + mdeq_inject(p, x)), num_groups, 3)

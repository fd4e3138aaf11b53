"""Stride-1 'SAME' 2-D convolutions whose derivatives stay fast on CPU inside the solver's
loops (a custom JVP whose kernel tangent is itself a convolution), and the drop-in
``conv_general_dilated`` that Flax's ``Conv`` uses in ``deq.cells.{nnx,linen}.Conv``."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_nhwc(x, kernel, precision=None):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC, precision=precision
    )


def _conv_tangent_kernel(x, dkernel, precision):
    """``conv(x, dkernel)`` as one small matmul per kernel offset (x shifted against it).

    Linear in ``dkernel``: JAX's transpose is then one ``(cin, cout)`` contraction per offset,
    not XLA:CPU's backward-filter convolution (a huge contraction into a tiny kernel, several
    times slower inside loops). One offset at a time, each rematerialised: reverse mode keeps
    ``x``, never ``kh * kw`` shifted copies of it."""
    kh, kw, cin, cout = dkernel.shape
    n, h, w, _ = x.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    acc = jnp.promote_types(dkernel.dtype, jnp.float32)  # accumulate bf16 in f32

    @jax.checkpoint
    def offset(i, out):
        dy, dx = i // kw, i % kw
        xs = jax.lax.dynamic_slice(xp, (0, dy, dx, 0), (n, h, w, cin))
        k = jax.lax.dynamic_slice(dkernel, (dy, dx, 0, 0), (1, 1, cin, cout))[0, 0]
        return out + jnp.einsum("nhwi,io->nhwo", xs, k, precision=precision,
                                preferred_element_type=acc)

    out = jax.lax.fori_loop(0, kh * kw, offset, jnp.zeros((n, h, w, cout), acc))
    return out.astype(jnp.result_type(x, dkernel))


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv2d_same(x, kernel, precision):
    return _conv_nhwc(x, kernel, precision)


@partial(_conv2d_same.defjvp, symbolic_zeros=True)
def _conv2d_same_jvp(precision, primals, tangents):
    x, kernel = primals
    dx, dkernel = tangents
    out = _conv_nhwc(x, kernel, precision)
    tangent = jnp.zeros_like(out)  # JAX calls the rule with at least one tangent non-zero
    if not isinstance(dx, SymbolicZero):
        # conv(dx, kernel) on the (H, W, O, I) view of the kernel: the same values, and JAX's
        # transpose in dx is then a plain NHWC/HWIO convolution with the flipped kernel (JAX's
        # own rule gives a swapped kernel layout that XLA:CPU runs 5-15x slower in loops).
        tangent = jax.lax.conv_general_dilated(
            dx, kernel.swapaxes(2, 3), (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWOI", "NHWC"), precision=precision)
    if not isinstance(dkernel, SymbolicZero):  # e.g. not in the DEQ's z-direction solves
        tangent = tangent + _conv_tangent_kernel(x, dkernel, precision)
    return out, tangent.astype(out.dtype)


def conv2d_same(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """Stride-1 'SAME' convolution, NHWC input, HWIO kernel with odd spatial sizes.

    Same values and derivatives as ``lax.conv_general_dilated``, in every mode (a custom JVP
    that JAX transposes for reverse mode); only the derivative is written differently, so
    that its transpose is a plain convolution of the cotangent with the spatially flipped,
    in/out-swapped kernel (input cotangent) and one small matmul per kernel offset (kernel
    cotangent). JAX's own rules produce a transposed convolution with an ``OIHW``-style kernel
    layout and a backward-filter convolution, which XLA:CPU runs 5-15x slower when they sit
    inside a ``while`` or ``scan`` body -- exactly where a DEQ's adjoint solve and unrolled
    backprop put them. This function always uses the rewritten derivative; :func:`conv_same`
    uses it only on CPU.
    """
    return _conv2d_same(x, kernel, precision)


def conv_same(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """Stride-1 'SAME' NHWC/HWIO convolution whose gradient is fast on every backend.

    The backend is chosen when the computation is lowered (``jax.lax.platform_dependent``):
    on CPU the gradient of :func:`conv2d_same`; elsewhere (GPU, TPU) JAX's own gradient of
    ``lax.conv_general_dilated``, which cuDNN/XLA run well there and which the per-offset
    kernel cotangent would only slow down. Values and gradients are the same either way.
    Even kernel sizes pad asymmetrically (the flipped-kernel identity does not hold): they
    always take the plain convolution.
    """
    if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        return _conv_nhwc(x, kernel, precision)
    return jax.lax.platform_dependent(
        x, kernel,
        cpu=lambda a, b: conv2d_same(a, b, precision),
        default=lambda a, b: _conv_nhwc(a, b, precision),
    )


def _same_pads(kernel_shape) -> list[tuple[int, int]]:
    return [((k - 1) // 2, (k - 1) // 2) for k in kernel_shape]


def fast_conv_supported(kernel_size, strides, padding, input_dilation, kernel_dilation,
                        feature_group_count) -> str | None:
    """Why a Flax ``Conv`` configuration cannot use :func:`conv_same` (``None`` if it can)."""
    def ones(v):
        return v is None or v == 1 or (not isinstance(v, int) and all(s == 1 for s in v))

    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(kernel_size) != 2:
        return f"a 2-D kernel (got kernel_size={kernel_size})"
    if any(k % 2 == 0 for k in kernel_size):
        return f"odd kernel sizes (got kernel_size={kernel_size})"
    if not ones(strides):
        return f"strides=1 (got {strides!r})"
    if not (ones(input_dilation) and ones(kernel_dilation)):
        return (f"no dilation (got input_dilation={input_dilation!r}, "
                f"kernel_dilation={kernel_dilation!r})")
    if feature_group_count != 1:
        return f"feature_group_count=1 (got {feature_group_count})"
    pads = padding
    if isinstance(pads, int):
        pads = [(pads, pads)] * 2
    elif not isinstance(pads, str):
        pads = [(p, p) if isinstance(p, int) else tuple(p) for p in pads]
    if not (pads == "SAME" or pads == _same_pads(kernel_size)):
        return f"padding='SAME' (got {padding!r})"
    return None


def fast_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                              rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                              batch_group_count=1, precision=None, preferred_element_type=None,
                              **kwargs):
    """Drop-in for ``lax.conv_general_dilated`` that takes :func:`conv_same` where it applies.

    Pass it as ``conv_general_dilated=`` to ``nnx.Conv`` / ``nn.Conv`` (or use
    :class:`deq.cells.nnx.Conv` / :class:`deq.cells.linen.Conv`, which do): 2-D, stride 1,
    SAME (or the equivalent symmetric) padding, odd kernel, no dilation or groups, NHWC/HWIO
    layout, no ``preferred_element_type``. Any other call goes to ``lax.conv_general_dilated``
    unchanged.
    """
    dn = dimension_numbers
    nhwc = lhs.ndim == 4 and rhs.ndim == 4 and dn is not None and (
        jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )
    if (nhwc and preferred_element_type is None and batch_group_count == 1
            and not kwargs.get("out_sharding") and fast_conv_supported(
                rhs.shape[:2], window_strides, padding, lhs_dilation, rhs_dilation,
                feature_group_count) is None):
        return conv_same(lhs, rhs, precision)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type, **kwargs)

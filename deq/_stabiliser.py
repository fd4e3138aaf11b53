"""The layers' stabiliser: the Jacobian penalty (Bai et al., 2021) applied through the gradient
of the layer's output (:func:`penalty`, then :func:`attach`), with a fixed or an adaptive weight,
and the probe key derived from the call's input when no random stream is given
(:func:`input_key`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from deq._validate import is_hashable
from deq.regularization import AdaptiveWeight, jacobian_regularization


def _penalty_gradient(cell: Any, num_samples: int, sub_batch: int | None, weight: Any,
                      max_steps: int, with_grad: bool, z, state, x, key, num_steps):
    """The weighted penalty ``w R`` and its gradient in ``(state, x)`` (None without
    ``with_grad``), the fixed point held constant; zeros, and no work, when the weight is 0."""
    fn = lambda z, args: cell(args[0], z, args[1])
    zc = jax.lax.stop_gradient(z)
    if sub_batch is not None:
        zc = jax.tree_util.tree_map(lambda a: a[:sub_batch], zc)
    empty = jax.tree_util.tree_leaves(zc)[0].shape[:1] == (0,)

    def value(state, x):
        xs = x if sub_batch is None else x[:sub_batch]
        return jacobian_regularization(fn, zc, (state, xs), key, num_samples).astype(jnp.float32)

    def off(state, x):
        zeros = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)  # noqa: E731
        v = jnp.zeros((), jnp.float32)
        return (v, (zeros(state), zeros(x))) if with_grad else (v, None)

    def on(w):
        def run(state, x):
            if not with_grad:  # the value only, for logging: no second-order pass
                return w * value(state, x), None
            v, grads = jax.value_and_grad(value, argnums=(0, 1))(state, x)
            return w * v, jax.tree_util.tree_map(lambda g: (w * g).astype(g.dtype), grads)
        return run

    if empty:  # an empty batch: nothing to penalise
        return off(state, x)
    if not isinstance(weight, AdaptiveWeight):
        return off(state, x) if weight == 0 else on(jnp.float32(weight))(state, x)
    w = weight(num_steps, max_steps)
    # No penalty, and no work, while the solves stay within the weight's target.
    return jax.lax.cond(w > 0, on(w), off, state, x)


_penalty_gradient_jit = jax.jit(_penalty_gradient, static_argnums=(0, 1, 2, 3, 4, 5))


@jax.custom_vjp
def _attach(z, state, x, grads):
    """``z`` unchanged; its VJP adds the precomputed ``grads`` to the cotangents of
    ``(state, x)``: the penalty enters the gradient of whatever loss uses ``z``."""
    return z


def _attach_fwd(z, state, x, grads):
    return z, grads


def _attach_bwd(grads, g):
    return (g, *grads, None)


_attach.defvjp(_attach_fwd, _attach_bwd)
# Jitted: an eager custom-VJP call retraces its function every time (tens of ms for a conv
# cell's parameters); under an outer jit this inlines.
_attach_jit = jax.jit(_attach)


def penalty(cell: Any, options: Any, z: Any, state: Any, x: jax.Array, key: jax.Array,
            stats: Any, with_grad: bool = True):
    """The Jacobian penalty (Bai et al., 2021) of a layer's solve: ``(wR, grads)``, ``wR``
    (float32) for logging and ``grads = w dR/d(state, x)``, both without gradient, for
    :func:`attach` (None without ``with_grad``: a call that nothing can differentiate).
    ``R`` is :func:`jacobian_regularization` at the fixed point ``z`` (held constant) with
    ``jac_reg_samples`` probes, on the first ``jac_reg_batch`` samples if set (a per-sample
    mean, so still unbiased; its second-order pass -- the costly part -- shrinks with the
    batch); ``w`` is ``jac_reg_weight``, or with an :class:`AdaptiveWeight` a function of
    ``stats.num_steps`` (0: nothing computed)."""
    sub = options.jac_reg_batch if options.batched else None  # unbatched: no batch to subsample
    weight = options.jac_reg_weight  # a float or an AdaptiveWeight (CallOptions.make)
    args = (cell, int(options.jac_reg_samples), None if sub is None else int(sub), weight,
            int(options.max_steps), bool(with_grad))
    run = _penalty_gradient_jit if is_hashable(*args) else _penalty_gradient
    value, grads = run(*args, z, state, x, key, stats.num_steps)
    return jax.lax.stop_gradient(value), jax.lax.stop_gradient(grads)


def attach(z: Any, state: Any, x: jax.Array, grads: Any):
    """``z`` unchanged in value; reverse-mode differentiation of anything computed from it
    adds ``grads`` (from :func:`penalty`) to the gradient of ``(state, x)`` -- as if ``wR`` had
    been added to the loss, once per backward pass, with no change to the user's loss.
    Forward-mode transforms see ``z`` without it. Call it outside any ``jax.jit`` that a
    forward-mode transform may see whole (a custom VJP cannot be linearised)."""
    try:
        return _attach_jit(z, state, x, grads)
    except TypeError as e:
        # Forward mode (jvp, jacfwd, the outer pass of hessian) cannot go through a custom
        # VJP: it sees the layer without the stabiliser, which changes no value and only
        # ever adds to reverse-mode gradients.
        if "forward-mode" not in str(e):
            raise
        return z


def input_key(x: jax.Array) -> jax.Array:
    """A PRNG key for the penalty's probes derived from the call's input, when no random
    stream is given: it changes from batch to batch, and the layer keeps no random state."""
    total = jnp.sum(jnp.abs(x)).astype(jnp.float32)
    return jax.random.fold_in(jax.random.key(0), jax.lax.bitcast_convert_type(total, jnp.int32))

r"""Regularisers for deep equilibrium models: pure JAX, no Flax.

* :func:`jacobian_regularization` penalises :math:`\|\partial f / \partial z\|_F^2` at the fixed
  point (Bai et al., "Stabilizing Equilibrium Models by Jacobian Regularization", 2021). A smaller
  Jacobian keeps ``f`` contractive, so forward and backward solves take fewer steps and stay
  stable during training.
* :class:`AdaptiveWeight` sets the penalty's weight from the forward solve's steps: zero while
  solves finish well within their budget, rising to ``max_weight`` as they approach it.
* :func:`correction_iterates` and :func:`fixed_point_correction` build the fixed-point
  correction loss (Bai et al., "Deep Equilibrium Optical Flow Estimation", 2022): the task loss
  applied to a few differentiable iterates started at the fixed point.

The Flax layers (``deq.nnx.DEQ``, ``deq.linen.DEQ``) call :func:`jacobian_regularization` for
you when built with ``jac_reg_samples > 0``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from deq._validate import check_float, check_int, set_field


@dataclasses.dataclass(frozen=True)
class AdaptiveWeight:
    r"""A Jacobian-penalty weight that needs no tuning: set from how hard the solve was.

    .. math:: w = w_{\max}\, \mathrm{clip}\Big(\frac{n / N - t}{1 - t}, 0, 1\Big)

    where :math:`n` is the number of forward steps the solve took and :math:`N` its budget
    (``max_steps``). Solves that converge within the fraction :math:`t` of their budget get no
    penalty (and the layers skip computing it); a solve that spends its whole budget gets
    ``max_weight``. The weight is a function of the current step only, with no state: the same
    in NNX and Linen, under ``jit``, ``vmap`` and in checkpoints. Training settles where the
    solves take between :math:`tN` and :math:`N` steps, so they keep converging.

    Args:
      max_weight: the weight of a solve that spent its budget (>= 0), on the normalised
        estimate (``||J||_F^2 / d``, as in the DEQ papers). The default 3 was chosen on MNIST
        and digits: 1 left more training solves unconverged, 3 with ``target=0.25`` cost
        accuracy (0.4-1 points in short runs).
      target: :math:`t \in [0, 1)`, the fraction of the budget a solve may take unpenalised.
    """

    max_weight: float = 3.0
    target: float = 0.5

    def __post_init__(self):
        set_field(self, "max_weight", check_float(self, "max_weight", self.max_weight,
                                                  minimum=0.0))
        set_field(self, "target", check_float(self, "target", self.target, minimum=0.0,
                                              maximum=1.0, open_max=True))

    def __call__(self, num_steps, max_steps):
        """The weight (float32) for a solve of ``num_steps`` out of ``max_steps``."""
        frac = jnp.asarray(num_steps, jnp.float32) / max_steps
        return self.max_weight * jnp.clip((frac - self.target) / (1 - self.target), 0.0, 1.0)


def jacobian_regularization(
    fn: Callable[[Any, Any], Any],
    z_star: Any,
    args: Any,
    key: jax.Array,
    num_samples: int = 1,
) -> jax.Array:
    r"""Hutchinson estimate of :math:`\|\partial_z f(z^*, \text{args})\|_F^2 / d`.

    With Gaussian probes :math:`\epsilon \sim \mathcal{N}(0, I)`,
    :math:`\mathbb{E}\,\|\epsilon^\top J\|^2 = \|J\|_F^2`, so

    .. math:: \hat R = \frac{1}{S\, d} \sum_{s=1}^{S} \|\epsilon_s^\top J\|_2^2,
       \qquad J = \partial_z f(z^*, \text{args}),

    an unbiased estimate of :math:`\|J\|_F^2 / d`. Each sample costs one vector-Jacobian
    product; the Jacobian is never formed. As in the DEQ papers (and their reference code),
    the sum is normalised by the number of elements :math:`d` of ``z_star`` -- *all* of its
    elements, the batch axis included. For a batch of independent samples ``J`` is block
    diagonal, so the result is the batch mean of the per-sample
    :math:`\|J_i\|_F^2 / d_i`, a number whose scale does not depend on the width or the batch
    size.

    The estimate is differentiable with respect to ``args`` (the cell's parameters and input)
    and to ``z_star``; pass ``jax.lax.stop_gradient(z_star)`` to treat the fixed point as a
    constant, as the DEQ layers do.

    Args:
      fn: the cell ``f(z, args) -> z``.
      z_star: the point where the Jacobian is taken (normally the fixed point), a pytree of
        floating-point arrays.
      args: the second argument of ``fn``.
      key: PRNG key for the probes.
      num_samples: number of probes :math:`S`; the variance falls as :math:`1/S`.

    Returns:
      A scalar, in the dtype of ``z_star``.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from deq.regularization import jacobian_regularization
      >>> f = lambda z, w: jnp.tanh(w @ z)
      >>> w, z = 0.5 * jnp.eye(4), jnp.zeros(4)
      >>> r = jacobian_regularization(f, z, w, jax.random.key(0), num_samples=256)
      >>> bool(abs(r - 0.25) < 0.05)  # ||0.5 I||_F^2 / 4
      True
    """
    num_samples = check_int("jacobian_regularization", "num_samples", num_samples, minimum=1)
    leaves, treedef = jax.tree_util.tree_flatten(z_star)
    if not leaves:
        raise ValueError("z_star has no array leaves.")
    _, vjp = jax.vjp(lambda z: fn(z, args), z_star)
    keys = jax.random.split(key, len(leaves))
    probes = jax.tree_util.tree_unflatten(treedef, [
        jax.random.normal(k, (num_samples, *jnp.shape(leaf)), jnp.result_type(leaf))
        for k, leaf in zip(keys, leaves, strict=True)
    ])
    # One VJP per probe, vectorised over the probes (the linearisation is shared).
    (rows,) = jax.vmap(vjp)(probes)
    sq = sum(jnp.sum(jnp.square(r)) for r in jax.tree_util.tree_leaves(rows))
    dim = sum(jnp.size(leaf) for leaf in leaves)
    return sq / (num_samples * dim)


def correction_iterates(
    fn: Callable[[Any, Any], Any],
    z_star: Any,
    args: Any,
    *,
    num_iterates: int = 3,
    damping: float = 0.0,
) -> list[Any]:
    r"""Differentiable iterates started at the fixed point, for the fixed-point correction loss.

    .. math:: z_0 = \mathrm{sg}(z^*), \qquad
       z_{k+1} = \delta z_k + (1 - \delta) f(z_k, \text{args}), \quad k = 0..K-1 .

    At a converged fixed point every :math:`z_k` equals :math:`z^*` in value, while the
    gradient of :math:`z_k` with respect to ``args`` is the :math:`k`-step phantom gradient
    (Geng et al., 2021). Applying the task loss to each of them (:func:`fixed_point_correction`)
    gives the training signal of the fixed-point correction of Bai et al. (2022), which uses
    iterates of the solver trajectory; here they are taken at the fixed point, so that no
    solver internals are needed.

    Args:
      fn: the cell ``f(z, args) -> z``.
      z_star: the fixed point (any pytree of arrays); its gradient is stopped.
      args: the second argument of ``fn``; gradients flow to it.
      num_iterates: :math:`K \ge 1`.
      damping: :math:`\delta \in [0, 1)`.

    Returns:
      The list ``[z_1, ..., z_K]``.

    Example::

      >>> import jax.numpy as jnp
      >>> from deq.regularization import correction_iterates
      >>> zs = correction_iterates(lambda z, w: jnp.tanh(w * z + 1.0), jnp.ones(2), 0.5)
      >>> len(zs)
      3
    """
    num_iterates = check_int("correction_iterates", "num_iterates", num_iterates, minimum=1)
    damping = check_float("correction_iterates", "damping", damping, minimum=0.0, maximum=1.0,
                          open_max=True)
    z = jax.lax.stop_gradient(z_star)
    out = []
    for _ in range(num_iterates):
        fz = fn(z, args)
        z = fz if damping == 0 else jax.tree_util.tree_map(
            lambda a, b: damping * a + (1 - damping) * b, z, fz
        )
        out.append(z)
    return out


def fixed_point_correction(
    loss_fn: Callable[[Any], jax.Array],
    iterates: Sequence[Any],
    decay: float = 0.8,
) -> jax.Array:
    r"""Fixed-point correction loss :math:`\sum_{k=1}^{K} \gamma^{K-k}\, \ell(z_k)`.

    Later iterates weigh more (Bai et al., 2022). Add it to (or use it instead of) the task
    loss on :math:`z^*`.

    Args:
      loss_fn: the task loss as a function of the equilibrium state, e.g. head + cross-entropy.
      iterates: from :func:`correction_iterates`.
      decay: :math:`\gamma \in (0, 1]`.

    Returns:
      A scalar.

    Example::

      >>> import jax.numpy as jnp
      >>> from deq.regularization import fixed_point_correction
      >>> float(fixed_point_correction(jnp.sum, [jnp.ones(2), jnp.ones(2)], decay=0.5))
      3.0
    """
    if not iterates:
        raise ValueError("iterates is empty; build it with correction_iterates().")
    decay = check_float("fixed_point_correction", "decay", decay, minimum=0.0, maximum=1.0,
                        open_min=True)
    k = len(iterates)
    return sum(decay ** (k - 1 - i) * loss_fn(z) for i, z in enumerate(iterates))


__all__ = ["AdaptiveWeight", "correction_iterates", "fixed_point_correction",
           "jacobian_regularization"]

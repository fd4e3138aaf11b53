"""Models of the experiments: an ordinary Flax NNX classifier with a DEQ layer in the middle.

The DEQ and the unrolled baseline are the *same* model and cell; only the layer's solver and
adjoint differ (``config.mode``), so the comparison isolates the gradient method.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

import deq
import deq.nnx
from deq.cells.nnx import MDEQCell, MLPCell, MultiscaleMDEQCell

SOLVERS = ("anderson", "broyden", "iteration")
ADJOINTS = ("implicit", "phantom", "jfb")
ADJOINT_SOLVERS = ("anderson", "iteration", "broyden", "gmres")
MODES = ("deq", "unrolled")
CELLS = ("mlp", "mdeq", "mdeq_multiscale")
HEADS = ("pool", "flatten")


def _solver(name: str, cfg: ml_collections.ConfigDict, rtol: float,
            damping: float | None = None):
    common = dict(rtol=rtol, atol=cfg.atol)
    if name == "anderson":
        return deq.Anderson(history=cfg.history, **common)
    if name == "broyden":
        return deq.Broyden(**common)
    return deq.FixedPointIteration(damping=cfg.damping if damping is None else damping, **common)


def make_solver(cfg: ml_collections.ConfigDict, *, mode: str, evaluation: bool = False):
    """The forward solver and step budget for training, with the ``solver.fallback`` solver
    for the samples the first one leaves unconverged (at evaluation: ``solver.eval_fallback``)."""
    rtol = cfg.eval_rtol if evaluation and cfg.eval_rtol else cfg.rtol
    max_steps = cfg.eval_max_steps if evaluation and cfg.eval_max_steps else cfg.max_steps
    if mode == "unrolled":
        # The baseline: plain iteration, a fixed number of steps (the unrolled adjoint never
        # stops early), so its forward budget equals the DEQ's max_steps.
        return deq.FixedPointIteration(rtol=rtol, atol=cfg.atol, damping=cfg.damping), max_steps
    solver = _solver(cfg.name, cfg, rtol)
    if evaluation and cfg.get("eval_fallback", ""):
        solver = dataclasses.replace(solver, fallback=_solver(cfg.eval_fallback, cfg, rtol))
    elif not evaluation and cfg.get("fallback", ""):
        solver = dataclasses.replace(solver, fallback=_solver(
            cfg.fallback, cfg, rtol, damping=cfg.get("fallback_damping", None)))
    return solver, max_steps


def make_adjoint(config: ml_collections.ConfigDict, *, evaluation: bool = False):
    if config.mode == "unrolled":
        return deq.UnrolledAdjoint()
    a = config.adjoint
    if evaluation:
        # No gradient is taken at evaluation; the cheapest mode keeps the eval graph small.
        return deq.JacobianFreeAdjoint()
    if a.name == "phantom":
        return deq.PhantomAdjoint(steps=a.phantom_steps, damping=a.phantom_damping)
    if a.name == "jfb":
        return deq.JacobianFreeAdjoint()
    make = {
        "anderson": lambda: deq.Anderson(rtol=a.rtol, atol=1e-8),
        "iteration": lambda: deq.FixedPointIteration(rtol=a.rtol, atol=1e-8),
        "broyden": lambda: deq.Broyden(rtol=a.rtol, atol=1e-8),
        "gmres": lambda: deq.GMRES(rtol=a.rtol, atol=1e-8),
    }
    solver = make[a.solver]()
    if a.get("fallback", "") and a.solver != "gmres":
        # The adjoint system's samples the solver leaves unconverged go on from their best
        # iterates with the fallback, for up to max_steps more steps (same tolerances).
        solver = dataclasses.replace(solver, fallback=make[a.fallback]())
    # The training loop counts failed solves itself (the step's metrics): no host callback
    # in the compiled step, which then keeps JAX's fast dispatch path.
    return deq.ImplicitAdjoint(solver=solver, max_steps=a.max_steps, on_failure="ignore")


def multiscale_channels(m: ml_collections.ConfigDict) -> tuple[int, ...]:
    """``model.multiscale_channels``: the channels of the full- and the half-resolution
    branch (default, when empty: ``features`` then twice as many)."""
    channels = m.get("multiscale_channels", None) or (m.features, 2 * m.features)
    if len(channels) != 2:
        raise ValueError(
            f"model.multiscale_channels={tuple(channels)!r}: the multiscale classifier has two "
            "branches (full and half resolution), so give two channel counts, e.g. (16, 32)."
        )
    return tuple(int(c) for c in channels)


class Classifier(nnx.Module):
    """stem -> DEQ(cell) -> pool -> linear head.

    * ``cell='mlp'``: the image is flattened and injected into a fully connected cell.
    * ``cell='mdeq'``: a conv stem (optionally stride 2) maps the image to ``features``
      channels, the MDEQ residual conv cell finds the equilibrium, then GroupNorm, an optional
      strided conv, and the linear head on either the globally average-pooled features
      (``model.head='pool'``) or all of them flattened (``'flatten'``: keeps where a stroke is,
      which pooling throws away).
    * ``cell='mdeq_multiscale'``: as ``'mdeq'`` with the multiscale MDEQ cell (a state at the
      stem's resolution and at half of it, ``model.multiscale_channels``); the head sees the
      full-resolution branch (normed, through the strided conv if any) concatenated with the
      normed half-resolution branch.
    """

    def __init__(self, config: ml_collections.ConfigDict, image_shape, num_classes: int, *,
                 evaluation: bool = False, rngs: nnx.Rngs):
        m = config.model
        solver, max_steps = make_solver(config.solver, mode=config.mode, evaluation=evaluation)
        self.kind = m.cell
        h, w, c = image_shape
        if m.cell == "mlp":
            self.stem = None
            cell = MLPCell(h * w * c, m.features, norm=m.norm, weight_norm=m.weight_norm,
                           rngs=rngs)
            self.out_norm = None
        else:
            self.stem = nnx.Conv(c, m.features, (3, 3), strides=m.stem_stride, rngs=rngs)
            self.stem_norm = nnx.GroupNorm(m.features, num_groups=m.num_groups, rngs=rngs)
            width = m.features  # channels of the (full-resolution) state the head sees
            coarse_norm = None
            if m.cell == "mdeq_multiscale":
                channels = multiscale_channels(m)
                hidden = (tuple(m.hidden * ch // channels[0] for ch in channels)
                          if m.hidden else None)
                cell = MultiscaleMDEQCell(m.features, channels, hidden_channels=hidden,
                                          num_groups=m.num_groups, weight_norm=m.weight_norm,
                                          rngs=rngs)
                width = channels[0]
                coarse_norm = nnx.GroupNorm(channels[1], num_groups=m.num_groups, rngs=rngs)
            else:
                cell = MDEQCell(m.features, m.features, hidden_channels=m.hidden or None,
                                num_groups=m.num_groups, weight_norm=m.weight_norm, rngs=rngs)
            self.coarse_norm = nnx.data(coarse_norm)
            self.out_norm = nnx.GroupNorm(width, num_groups=m.num_groups, rngs=rngs)
            # An optional strided conv before pooling: cheap (it runs once, outside the
            # solve) and gives the linear head more than `features` pooled numbers.
            self.head_conv = (
                nnx.Conv(width, m.head_channels, (3, 3), strides=2, rngs=rngs)
                if m.head_channels else None
            )
        self.deq = deq.nnx.DEQ(
            cell, solver=solver, adjoint=make_adjoint(config, evaluation=evaluation),
            max_steps=max_steps, z_init=m.z_init,
            precision=config.solver.precision or None,
            # The penalty's estimator is a per-sample mean: a sub-batch (reg.jac_batch) keeps
            # its second-order backward pass from dominating the step's memory.
            jac_reg_samples=config.reg.jac_samples if config.reg.jac_weight > 0 else 0,
            jac_reg_batch=config.reg.jac_batch or None,
            jac_reg_weight=(deq.regularization.AdaptiveWeight(
                max_weight=config.reg.jac_weight, target=config.reg.jac_target)
                if config.reg.get("jac_auto", False) else config.reg.jac_weight),
            # The evaluation model is built with its solver and budget as the training ones.
            eval_solver=solver, eval_max_steps=max_steps,
            warn_unconverged_after=None,  # counted by the training loop (see make_adjoint)
            deterministic=evaluation, rngs=rngs,
        )
        conv = m.cell != "mlp"
        self.flatten = conv and m.head == "flatten"
        head_in = m.head_channels if (conv and m.head_channels) else m.features
        if m.cell == "mdeq_multiscale":
            channels = multiscale_channels(m)
            head_in = m.head_channels or channels[0]
            if self.flatten and not m.head_channels:
                raise ValueError(
                    "model.head='flatten' with the multiscale cell needs model.head_channels "
                    "(a strided conv that brings the full-resolution branch to the coarse one's "
                    "size)."
                )
            head_in += channels[1]
        if self.flatten:
            # SAME-padded strided convs: ceil(size / stride) per spatial dimension.
            down = m.stem_stride * (2 if m.head_channels else 1)
            head_in *= -(-h // down) * -(-w // down)
        self.head = nnx.Linear(head_in, num_classes, rngs=rngs)

    def deq_input(self, images: jax.Array) -> jax.Array:
        """The input ``x`` the DEQ layer's cell sees for these images."""
        if self.kind == "mlp":
            return images.reshape(images.shape[0], -1)
        return jax.nn.relu(self.stem_norm(self.stem(images)))

    def __call__(self, images: jax.Array, *, probe: jax.Array | None = None,
                 key: jax.Array | None = None) -> jax.Array:
        return self.head_logits(self.deq(self.deq_input(images), probe=probe, rngs=key))

    def with_residuals(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Logits and each sample's relative residual ``|f(z) - z| / |f(z)|`` at the returned
        state (one more cell evaluation): how far each test sample is from equilibrium."""
        x = self.deq_input(images)
        z = self.deq(x)
        fz = self.deq.cell(z, x)
        sq = lambda t: sum(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=1)  # noqa: E731
                           for a in jax.tree_util.tree_leaves(t))
        diff = jax.tree_util.tree_map(lambda a, b: a - b, fz, z)
        return self.head_logits(z), jnp.sqrt(sq(diff) / jnp.maximum(sq(fz), 1e-30))

    def head_logits(self, z) -> jax.Array:
        """The classifier's head on the equilibrium state ``z``."""
        if self.kind == "mlp":
            return self.head(z)
        coarse = None
        if self.kind == "mdeq_multiscale":
            z, coarse = z[0], self.coarse_norm(z[1])
        z = self.out_norm(z)
        if self.head_conv is not None:
            z = jax.nn.relu(self.head_conv(z))
        if coarse is not None:
            if self.flatten:  # both at the coarse resolution: concatenate the channels
                z = jnp.concatenate([z, coarse], axis=-1)
            else:
                z = jnp.concatenate([jnp.mean(z, axis=(1, 2)), jnp.mean(coarse, axis=(1, 2))],
                                    axis=-1)
                return self.head(z)
        if self.flatten:
            return self.head(z.reshape(z.shape[0], -1))
        return self.head(jnp.mean(z, axis=(1, 2)))

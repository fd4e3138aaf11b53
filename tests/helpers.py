"""Small contractive fixed-point problems shared by the core tests.

Each builder returns ``(fn, z0, args)`` with ``fn(z, args) -> z`` contractive in ``z``, in the
default dtype of the moment (float64 under the ``x64`` fixture).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_tanh(key=0, dim=5, batch=None, scale=0.7):
    """z -> tanh(W z + U x + b); ||W||_2 <= scale < 1, so the map is a contraction."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(key), 4)
    w = jax.random.normal(k1, (dim, dim))
    w = scale * w / jnp.linalg.norm(w, 2)
    u = jax.random.normal(k2, (dim, dim)) / jnp.sqrt(dim)
    b = 0.1 * jax.random.normal(k3, (dim,))
    x = jax.random.normal(k4, (dim,) if batch is None else (batch, dim))

    def fn(z, args):
        w, u, b, x = args
        return jnp.tanh(z @ w.T + x @ u.T + b)

    z0 = jnp.zeros_like(x)
    return fn, z0, (w, u, b, x)


def conv_cell(key=0, channels=2, size=5, batch=2, scale=0.6):
    """z -> tanh(conv3x3(z) + x), with the kernel scaled so the map contracts."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    kern = jax.random.normal(k1, (channels, channels, 3, 3))
    # Sum of |entries| bounds the operator norm of the convolution.
    kern = scale * kern / jnp.sum(jnp.abs(kern)) * channels
    x = jax.random.normal(k2, (batch, channels, size, size))

    def fn(z, args):
        kern, x = args
        y = jax.lax.conv_general_dilated(z, kern, (1, 1), "SAME")
        return jnp.tanh(y + x)

    return fn, jnp.zeros_like(x), (kern, x)


def pytree_state(key=0, dim=3):
    """A state that is a dict of two arrays coupled through a contractive map."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
    a = 0.4 * jax.random.normal(k1, (dim, dim)) / jnp.sqrt(dim)
    c = 0.4 * jax.random.normal(k2, (dim, 2 * dim)) / jnp.sqrt(2 * dim)
    x = jax.random.normal(k3, (dim,))

    def fn(z, args):
        a, c, x = args
        h, m = z["h"], z["m"]
        h_new = jnp.tanh(a @ h + c @ m.reshape(-1) + x)
        m_new = 0.5 * jnp.sin(jnp.outer(h, jnp.ones(2)))
        return {"h": h_new, "m": m_new}

    z0 = {"h": jnp.zeros(dim), "m": jnp.zeros((dim, 2))}
    return fn, z0, (a, c, x)


PROBLEMS = {"dense_tanh": dense_tanh, "conv": conv_cell, "pytree": pytree_state}

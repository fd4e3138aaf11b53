"""Eager vs jitted call time of a small DEQ model (NNX and Linen), first and second call.

The model is the drop-in case of the README: a conv stem, ``DEQ(MDEQCell)`` and a linear head
on a batch of images. An eager call is ``model(x)`` (NNX) or ``model.apply(params, x)`` (Linen)
outside any ``jit``; a jitted call goes through ``nnx.jit`` / ``jax.jit``. For each: the first
call (compilation included, from empty compilation caches) and the median of ``--repeats`` later
calls, each with fresh input values of the same shape, timed to ``block_until_ready`` and taken
round-robin with the jitted mode so that both see the same machine load. A benchmark, not a
test: the figures depend on the machine and its load.

    python -m experiments.bench_eager                      # writes experiments/results/bench_eager
    python -m experiments.bench_eager --quick --out /tmp/b # tiny smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import deq.linen
import deq.nnx
from deq.cells import linen as linen_cells
from deq.cells import nnx as nnx_cells
from experiments.provenance import provenance, write_results
from experiments.train import machine_description

DEFAULTS = dict(batch=32, size=14, channels=8, max_steps=20, repeats=15)
QUICK = dict(batch=4, size=6, channels=4, max_steps=8, repeats=2)
REPEATS = [DEFAULTS["repeats"]]
OUT = Path(__file__).resolve().parent / "results" / "bench_eager"


class NNXModel(nnx.Module):
    def __init__(self, channels: int, max_steps: int, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, channels, (3, 3), rngs=rngs)
        cell = nnx_cells.MDEQCell(channels, channels, num_groups=2, rngs=rngs)
        self.deq = deq.nnx.DEQ(cell, max_steps=max_steps)
        self.head = nnx.Linear(channels, 10, rngs=rngs)

    def __call__(self, x):
        z = self.deq(nnx.relu(self.stem(x)))
        return self.head(jnp.mean(z, axis=(1, 2)))


class LinenModel(nn.Module):
    channels: int
    max_steps: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
        cell = linen_cells.MDEQCell(self.channels, num_groups=2)
        z = deq.linen.DEQ(cell=cell, max_steps=self.max_steps)(x)
        return nn.Dense(10)(jnp.mean(z, axis=(1, 2)))


def _timed(call, x) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call(x))
    return time.perf_counter() - start


def _compare(framework: str, calls: dict, fresh) -> list[tuple]:
    """First call of each mode (from empty compilation caches), then the later calls taken
    round-robin, so that both modes see the same machine load."""
    first = {}
    for mode, call in calls.items():
        jax.clear_caches()
        first[mode] = _timed(call, fresh())
    for call in calls.values():  # compile again what the last clear_caches dropped
        jax.block_until_ready(call(fresh()))
    later = {mode: [] for mode in calls}
    for _ in range(REPEATS[0]):
        x = fresh()
        for mode, call in calls.items():
            later[mode].append(_timed(call, x))
    return [(framework, m, first[m], statistics.median(later[m])) for m in calls]


def run(o: dict) -> list[dict]:
    rng = np.random.default_rng(0)
    shape = (o["batch"], o["size"], o["size"], 1)
    fresh = lambda: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    REPEATS[0] = o["repeats"]
    # Each mode gets its own model object (nothing shared but the definition).
    eager_model = NNXModel(o["channels"], o["max_steps"], rngs=nnx.Rngs(0))
    jit_model = NNXModel(o["channels"], o["max_steps"], rngs=nnx.Rngs(0))
    jitted = nnx.jit(lambda m, x: m(x))
    rows = _compare("nnx", {"eager": eager_model, "nnx.jit": lambda x: jitted(jit_model, x)},
                    fresh)
    linen_model = LinenModel(o["channels"], o["max_steps"])
    params = jax.jit(linen_model.init)(jax.random.key(0), jnp.zeros(shape))
    apply = jax.jit(linen_model.apply)
    rows += _compare("linen", {"eager": lambda x: linen_model.apply(params, x),
                               "jax.jit": lambda x: apply(params, x)}, fresh)
    return [dict(framework=f, mode=m, first_s=a, later_s=b) for f, m, a, b in rows]


def to_markdown(res: dict) -> str:
    o = res["options"]
    lines = [
        "# Eager vs jitted call of a small DEQ model",
        "",
        f"Machine: {res['machine']}. Model: conv stem -> DEQ(MDEQCell, {o['channels']} "
        f"channels, max_steps={o['max_steps']}) -> head, batch {o['batch']} of "
        f"{o['size']}x{o['size']} images. Later call: median of {o['repeats']}.",
        "",
        "| framework | mode | first call (s) | later call (s) | later / jitted later |",
        "| --- | --- | --- | --- | --- |",
    ]
    jitted = {r["framework"]: r["later_s"] for r in res["rows"] if r["mode"] != "eager"}
    for r in res["rows"]:
        ratio = r["later_s"] / jitted[r["framework"]]
        lines.append(f"| {r['framework']} | {r['mode']} | {r['first_s']:.2f} | "
                     f"{r['later_s']:.4f} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    for k, v in DEFAULTS.items():
        parser.add_argument(f"--{k.replace('_', '-')}", type=int, default=None,
                            help=f"default {v}")
    a = parser.parse_args(argv)
    o = dict(QUICK if a.quick else DEFAULTS)
    o.update({k: v for k, v in vars(a).items() if k in o and v is not None})
    res = dict(options=o, machine=machine_description(), rows=run(o),
               provenance=provenance(["python", "-m", "experiments.bench_eager", *argv]))
    write_results(a.out, "results", to_markdown(res), res, res["provenance"])


if __name__ == "__main__":
    main()

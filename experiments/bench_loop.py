"""Per-iteration overhead of the solve loops of ``deq`` against a bare ``lax.scan`` of the cell.

Two cells: (a) the digits config's MLP cell (64 units, LayerNorm, weight norm; batch 64 of
flattened 8x8 inputs) and (b) the conv ``MDEQCell`` (16 channels, 4 groups; batch 32 of
14x14 feature maps). Inputs and parameters are random. For each loop the jitted call is
timed at ``--n1`` and ``--n2`` iterations (median of ``--repeats`` calls after warm-up, taken
round-robin so both see the same machine load; a sample averages enough back-to-back calls to
last ~20 ms); the per-iteration cost is the slope
``(t(n2) - t(n1)) / (n2 - n1)`` and the fixed overhead the intercept ``t(n1) - n1 * slope``.
Loops:

* ``scan fwd``: ``lax.scan`` of the cell, the reference of the forward loops;
* ``scan fwd+bwd``: ``jax.grad`` through that scan (cell forward + its VJP per iteration);
* ``scan vjp``: ``lax.scan`` of ``u -> g + J^T u`` (one VJP of the cell at a fixed point per
  iteration), the reference of the implicit adjoint's backward loop;
* ``fixed_point <solver> [batched|unbatched]``: the forward solve of ``deq.fixed_point``
  (``deq._loop.solve``: a ``while_loop`` with per-sample stopping, best-iterate tracking,
  residual traces and stall test), at exactly n steps (tolerance out of reach, no stall test;
  ``stats.num_steps`` is checked);
* ``implicit bwd <solver> [batched|unbatched]``: ``jax.grad`` through ``deq.fixed_point``
  with ``ImplicitAdjoint``, the forward at ``--bwd-forward-steps``, the adjoint solve's
  budget at n steps (the layers solve batched: per-sample systems).

A benchmark, not a test: the figures depend on the machine and its load.

    python -m experiments.bench_loop                      # writes experiments/results/bench_loop
    python -m experiments.bench_loop --quick --out /tmp/b # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

DEFAULTS = dict(n1=10, n2=40, repeats=7, mlp_batch=64, conv_batch=32, conv_size=14,
                bwd_forward_steps=5)
QUICK = dict(n1=4, n2=12, repeats=3, mlp_batch=64, conv_batch=4, conv_size=8,
             bwd_forward_steps=3)
OUT = Path(__file__).resolve().parent / "results" / "bench_loop"
# A tolerance no solve meets, and no stall test: every solve runs its whole budget.
UNREACHABLE = dict(rtol=0.0, atol=1e-30, stall_patience=None)


def _cells(o: dict):
    """(name, f(z, (params, x)), params, x, z0) of the two cells."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from deq.cells import _functional as F
    from deq.cells.nnx import MDEQCell, MLPCell

    rng = np.random.default_rng(0)
    mlp = MLPCell(64, 64, norm=True, weight_norm=True, rngs=nnx.Rngs(0))
    conv = MDEQCell(16, 16, num_groups=4, weight_norm=True, rngs=nnx.Rngs(0))
    s = o["conv_size"]
    mlp_x = jnp.asarray(rng.standard_normal((o["mlp_batch"], 64)), jnp.float32)
    conv_x = jnp.asarray(rng.standard_normal((o["conv_batch"], s, s, 16)), jnp.float32)
    return [
        (f"mlp (digits: 64 units, batch {o['mlp_batch']})",
         lambda z, a: F.mlp_cell(a[0], z, a[1], jnp.tanh), jax.device_put(mlp._params()),
         mlp_x, jnp.zeros((o["mlp_batch"], 64), jnp.float32)),
        (f"mdeq conv (16 ch, batch {o['conv_batch']}, {s}x{s})",
         lambda z, a: F.mdeq_cell(a[0], z, a[1], 4), jax.device_put(conv._params()),
         conv_x, jnp.zeros((o["conv_batch"], s, s, 16), jnp.float32)),
    ]


def _loops(f, o: dict) -> dict:
    """name -> (make(n) -> jitted fn(params, x, z0) -> output, solve steps fn or None)."""
    import jax
    import jax.numpy as jnp

    import deq

    def scan_fwd(n):
        def run(p, x, z0):
            return jax.lax.scan(lambda z, _: (f(z, (p, x)), None), z0, None, length=n)[0]
        return jax.jit(run)

    def scan_grad(n):
        def loss(p, x, z0):
            z = jax.lax.scan(lambda z, _: (f(z, (p, x)), None), z0, None, length=n)[0]
            return jnp.sum(z)
        return jax.jit(jax.grad(loss))

    def scan_vjp(n):
        def run(p, x, z0):
            # As the implicit adjoint builds its VJP: linearise at z0, transpose the JVP.
            _, jvp = jax.linearize(lambda z: f(z, (p, x)), z0)
            vjp = jax.linear_transpose(jvp, z0)
            g = jnp.ones_like(z0)
            return jax.lax.scan(lambda u, _: (g + vjp(u)[0], None), g, None, length=n)[0]
        return jax.jit(run)

    def fixed_point(solver, batched):
        def make(n):
            def run(p, x, z0):
                sol = deq.fixed_point(f, z0, (p, x), solver=solver, max_steps=n,
                                      batched=batched)
                return sol.value, sol.stats.num_steps
            return jax.jit(run)
        return make

    def implicit_bwd(solver, batched):
        def make(n):
            adjoint = deq.ImplicitAdjoint(solver=solver, max_steps=n, on_failure="ignore")

            def loss(p, x, z0):
                sol = deq.fixed_point(f, z0, (p, x), solver=deq.FixedPointIteration(
                    **UNREACHABLE), adjoint=adjoint, max_steps=o["bwd_forward_steps"],
                    batched=batched)
                return jnp.sum(sol.value)
            return jax.jit(jax.grad(loss))
        return make

    fpi = deq.FixedPointIteration(**UNREACHABLE)
    anderson = deq.Anderson(**UNREACHABLE)
    return {
        "scan fwd": scan_fwd,
        "scan fwd+bwd": scan_grad,
        "scan vjp": scan_vjp,
        "fixed_point iteration batched": fixed_point(fpi, True),
        "fixed_point iteration unbatched": fixed_point(fpi, False),
        "fixed_point anderson batched": fixed_point(anderson, True),
        "fixed_point anderson unbatched": fixed_point(anderson, False),
        "implicit bwd iteration batched": implicit_bwd(fpi, True),
        "implicit bwd iteration unbatched": implicit_bwd(fpi, False),
        "implicit bwd anderson batched": implicit_bwd(anderson, True),
        "implicit bwd anderson unbatched": implicit_bwd(anderson, False),
    }


def _reference(name: str) -> str:
    if name.startswith("fixed_point"):
        return "scan fwd"
    if name.startswith("implicit bwd"):
        return "scan vjp"
    return "scan fwd"


def _time(fn, args, calls: int = 1) -> float:
    """Seconds per call, over ``calls`` back-to-back calls."""
    import jax

    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def run(o: dict, only: list[str] | None = None) -> list[dict]:
    import jax

    rows = []
    n1, n2 = o["n1"], o["n2"]
    for cell_name, f, p, x, z0 in _cells(o):
        for loop, make in _loops(f, o).items():
            if only and not any(s in loop for s in only):
                continue
            fns = {n: make(n) for n in (n1, n2)}
            args = (p, x, z0)
            compile_s = {}
            for n, fn in fns.items():
                compile_s[n] = _time(fn, args)  # compile + first call
                out = fn(*args)
                if loop.startswith("fixed_point"):
                    steps = int(jax.device_get(out[1]))
                    if steps != n:
                        print(f"warning: {cell_name} / {loop}: {steps} steps, not {n}",
                              file=sys.stderr)
            # A sample is enough back-to-back calls to last ~20 ms: call jitter averages out.
            calls = max(1, min(200, int(0.02 / max(_time(fns[n1], args), 1e-5))))
            times = {n: [] for n in fns}
            for _ in range(o["repeats"]):
                for n, fn in fns.items():
                    times[n].append(_time(fn, args, calls))
            t1, t2 = statistics.median(times[n1]), statistics.median(times[n2])
            slope = (t2 - t1) / (n2 - n1)
            rows.append(dict(cell=cell_name, loop=loop, t_n1_s=t1, t_n2_s=t2,
                             per_iter_s=slope, intercept_s=t1 - n1 * slope,
                             compile_s=compile_s[n2]))
            print(f"{cell_name:40s} {loop:34s} {slope * 1e6:9.1f} us/iter "
                  f"intercept {(t1 - n1 * slope) * 1e3:7.3f} ms", file=sys.stderr)
    for r in rows:
        ref = next((q for q in rows if q["cell"] == r["cell"]
                    and q["loop"] == _reference(r["loop"])), None)
        r["reference"] = _reference(r["loop"]) if ref else None
        r["ratio"] = r["per_iter_s"] / ref["per_iter_s"] if ref and ref["per_iter_s"] > 0 \
            else None
    return rows


def to_markdown(res: dict) -> str:
    o = res["options"]
    lines = [
        "# Per-iteration cost of the deq solve loops vs a bare lax.scan of the cell",
        "",
        f"Machine: {res['machine']}. Commit {res['provenance']['git_commit'][:10]}"
        f"{' (dirty)' if res['provenance']['dirty'] else ''}. Slope between {o['n1']} and "
        f"{o['n2']} iterations, median of {o['repeats']} jitted calls; implicit backward: "
        f"forward at {o['bwd_forward_steps']} steps. Ratio: per-iteration cost over that "
        "of the reference loop.",
        "",
        "| cell | loop | per iteration (us) | ratio | reference | intercept (ms) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['cell']} | {r['loop']} | {r['per_iter_s'] * 1e6:.1f} | {ratio} | "
                     f"{r['reference'] or ''} | {r['intercept_s'] * 1e3:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only the loops whose name contains one of these strings")
    for k, v in DEFAULTS.items():
        parser.add_argument(f"--{k.replace('_', '-')}", type=int, default=None,
                            help=f"default {v}")
    a = parser.parse_args(argv)
    o = dict(QUICK if a.quick else DEFAULTS)
    o.update({k: v for k, v in vars(a).items() if k in o and v is not None})
    if not 1 <= o["n1"] < o["n2"]:
        parser.error("need 1 <= n1 < n2")

    from experiments.provenance import machine, machine_name, provenance, write_results

    res = dict(options=o, machine=machine_name(machine()), rows=run(o, a.only),
               provenance=provenance(["python", "-m", "experiments.bench_loop", *argv]))
    write_results(a.out, "results", to_markdown(res), res, res["provenance"])


if __name__ == "__main__":
    main()

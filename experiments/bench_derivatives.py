"""Benchmark of derivatives beyond the gradient: forward mode, input gradients ("forces") and
Hessian-vector products through a DEQ, implicit against unrolled differentiation.

The conv DEQ cell of ``experiments.bench_core`` (same calibration, same batch), loss
``L(params, x) = mean((z*(params, x) - target)^2)``. For each method and each derivative:
the jitted time (median, round-robin), XLA's compiled temporary memory, and the relative L2
error against a tight implicit reference (Anderson forward and GMRES at 1e-6, precision
'highest'). Derivatives:

* ``grad params``: the training gradient (reverse mode);
* ``force``: ``dL/dx``, the input gradient (reverse mode);
* ``jvp x``: the tangent of ``z*`` along a random input direction (forward mode);
* ``hvp params``: ``H v`` for the parameter Hessian of ``L`` (forward over reverse).

Implicit derivatives solve one linear system at ``z*`` per mode (two for the HVP); unrolled
ones differentiate every step. E.g. ``--quick --out /tmp/d`` (smoke run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import deq
from experiments.bench_core import (
    CONVS,
    LABELS,
    _flat,
    _mib,
    calibrate_scale,
    compile_fn,
    deq_solve,
    make_problem,
    md_table,
    parse_problem_args,
    problem_parser,
    run_and_save,
    solver,
    time_interleaved,
)
from experiments.provenance import provenance

DEFAULTS = dict(batch=32, channels=16, size=28, repeats=5, max_steps=100, unroll=(16, 32, 64))
QUICK = dict(DEFAULTS, batch=2, channels=4, size=8, repeats=2, unroll=(8, 16))
DERIVATIVES = ("grad params", "force", "jvp x", "hvp params")


def derivative_fns(p, solve):
    """``{name: fn(params, x, v_params, v_x)}`` for every derivative of ``DERIVATIVES``."""
    def loss(params, x):
        return jnp.mean((solve(params, x)[0] - p.target) ** 2)

    grad_params = jax.grad(loss)
    return {
        "grad params": lambda params, x, vp, vx: grad_params(params, x),
        "force": lambda params, x, vp, vx: jax.grad(loss, argnums=1)(params, x),
        "jvp x": lambda params, x, vp, vx: jax.jvp(
            lambda xx: solve(params, xx)[0], (x,), (vx,))[1],
        "hvp params": lambda params, x, vp, vx: jax.jvp(
            lambda pp: grad_params(pp, x), (params,), (vp,))[1],
    }


def methods(p, a):
    """``(name, solve)`` of every method measured."""
    n = a.max_steps
    out = [(f"implicit: fwd anderson, ImplicitAdjoint({LABELS[b]})",
            deq_solve(p, solver("anderson"), deq.ImplicitAdjoint(solver(b), max_steps=n), n))
           for b in ("anderson", "gmres")]
    out += [(f"unrolled: {k} steps of {LABELS['iteration']}",
             deq_solve(p, solver("iteration"), deq.UnrolledAdjoint(), k)) for k in a.unroll]
    return out


def run(a, log=print) -> dict:
    t0 = time.perf_counter()
    prov = provenance(["python", "-m", "experiments.bench_derivatives", *a.argv])
    p = make_problem(a.batch, a.channels, a.size, conv=CONVS[a.conv_vjp],
                     precision=None if a.precision == "default" else a.precision)
    exact = p._replace(precision="highest")
    with jax.default_matmul_precision("highest"):
        scale = a.scale or calibrate_scale(exact, a.max_steps)[0]
    p, exact = p.rescale(scale), exact.rescale(scale)
    log(f"{prov['machine']}, {a.conv_vjp} conv VJP, {a.precision} precision: scale {scale:.4f}")
    kp, kx = jax.random.split(jax.random.key(1))
    leaves, treedef = jax.tree.flatten(p.params)
    keys = jax.random.split(kp, len(leaves))
    vp = jax.tree.unflatten(treedef, [jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])
    vx = jax.random.normal(kx, p.x.shape)
    args = (p.params, p.x, vp, vx)

    with jax.default_matmul_precision("highest"):
        ref_solve = deq_solve(exact, solver("anderson", 1e-6, stall_patience=None),
                              deq.ImplicitAdjoint(deq.GMRES(rtol=1e-6, atol=0.0),
                                                  max_steps=2000, on_failure="ignore"), 500)
        ref = {k: _flat(jax.jit(f)(*args)) for k, f in derivative_fns(exact, ref_solve).items()}

    rows, timed = [], []
    for name, solve in methods(p, a):
        for d, fn in derivative_fns(p, solve).items():
            log(f"[{d}] {name}")
            row = dict(method=name, derivative=d)
            rows.append(row)
            c, row["compile_s"], row["temp_bytes"] = compile_fn(fn, *args)
            out = _flat(c(*args))
            row["rel_error"] = float(np.linalg.norm(out - ref[d]) / np.linalg.norm(ref[d]))
            timed.append((row, c))
    for (row, _), ts in zip(timed, time_interleaved([(c, args) for _, c in timed], a.repeats),
                            strict=True):
        row["times_ms"] = [1e3 * t for t in ts]
        row["time_ms"] = statistics.median(row["times_ms"])
    return {"provenance": prov, "config": {k: v for k, v in vars(a).items() if k != "argv"},
            "scale": scale, "rows": rows, "wall_s": time.perf_counter() - t0}


def to_markdown(res: dict) -> str:
    c, pv = res["config"], res["provenance"]
    m = pv["machine"]
    by = {(r["method"], r["derivative"]): r for r in res["rows"]}
    names = list(dict.fromkeys(r["method"] for r in res["rows"]))
    implicit = next(n for n in names if n.startswith("implicit"))
    table = []
    for n in names:
        for d in DERIVATIVES:
            r = by[(n, d)]
            base = by[(implicit, d)]
            table.append([n, d, f"{r['time_ms']:.1f} ms",
                          f"{r['time_ms'] / base['time_ms']:.2f}x", _mib(r["temp_bytes"]),
                          f"{r['temp_bytes'] / base['temp_bytes']:.2f}x"
                          if r["temp_bytes"] and base["temp_bytes"] else "-",
                          f"{r['rel_error']:.1e}"])
    return "\n".join([
        "# deq derivatives benchmark: forward mode, forces and Hessian-vector products", "",
        f"Machine: {m['cpu']}, {m['cores']} cores; GPU {m['gpu'] or 'none'}; backend "
        f"{m['backend']}; jax {pv['jax']}; {pv['date']}, commit {pv['git_commit'][:10]}"
        f"{' (uncommitted changes)' if pv['dirty'] else ''}.", "",
        f"The conv cell of the core benchmark (batch {c['batch']}, {c['channels']} channels, "
        f"{c['size']}x{c['size']}, float32, precision '{c['precision']}', conv VJP "
        f"'{c['conv_vjp']}', kernel scale {res['scale']:.4f}), loss mean((z* - target)^2). "
        "`grad params`: training gradient; `force`: dL/dx; `jvp x`: tangent of z* along a "
        "random input direction (forward mode); `hvp params`: Hessian-vector product of the "
        "loss in the parameters (forward over reverse). Error: relative L2 distance to a tight "
        "implicit reference (Anderson forward and GMRES at 1e-6, precision 'highest'). Times: "
        f"median of {c['repeats']} jitted calls, round-robin; memory: XLA's compiled temporary "
        "buffers; ratios against the first implicit row of the same derivative.", "",
        md_table(["method", "derivative", "time", "time / implicit", "temp memory",
                  "memory / implicit", "error"], table), "",
        f"Total benchmark wall time {res['wall_s']:.0f} s.", ""])


def parse_args(argv=None) -> argparse.Namespace:
    ap = problem_parser("python -m experiments.bench_derivatives", __doc__, DEFAULTS,
                        "experiments/results/bench_derivatives")
    return parse_problem_args(ap, argv, DEFAULTS, QUICK)


def main(argv=None) -> dict:
    return run_and_save(parse_args(argv), "bench_derivatives", run, to_markdown)


if __name__ == "__main__":
    main()

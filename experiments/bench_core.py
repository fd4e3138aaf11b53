"""Benchmark of the deq core on a conv DEQ cell: forward solvers, training steps, memory, peers.

Cell ``z -> tanh(conv3x3(relu(conv3x3(z))) + conv3x3(x))`` (NHWC), kernels scaled to ~30 plain
iteration steps at rtol 1e-4; the peers (jaxopt, optimistix) get the matching absolute L2
tolerance on the batch. E.g. ``--conv-vjp hwio`` (CPU), ``--batch 128 --channels 64 --precision
default|highest`` (GPU), ``--quick --out /tmp/b`` (smoke run); the tables are in the markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import deq
from deq.cells import conv2d_same
from experiments.models import make_solver
from experiments.provenance import provenance, write_results

RTOL, TARGET_STEPS = 1e-4, 30  # tolerance; plain-iteration steps the kernel scale is set to
DAMPING, HISTORY = 0.5, 5  # of the damped iteration; Anderson's history (deq and jaxopt)
FLAT_BUDGETS = (10, 100)  # forward budgets of the memory-flatness check
DENSE_LIMIT_BYTES = 1 << 30  # skip optimistix's dense default adjoint above this Jacobian size
DEFAULTS = dict(batch=32, channels=16, size=28, repeats=5, max_steps=100, unroll=(8, 16, 32, 64),
                phantom_forwards=("iteration", "anderson"), flat_forwards=("iteration", "anderson"))
QUICK = dict(DEFAULTS, batch=2, channels=4, size=8, repeats=2, unroll=(8, 16),
             phantom_forwards=("iteration",), flat_forwards=("iteration",))
LABELS = {"iteration": "FixedPointIteration", "damped": f"FixedPointIteration(damping={DAMPING})",
          "anderson": f"Anderson(history={HISTORY})", "broyden": "Broyden(memory=20)",
          "gmres": "GMRES"}
HWIO_NOTE = (" (deq.cells.conv2d_same: the same gradient, written as plain convolutions and "
             "per-offset matmuls, which XLA:CPU runs fast inside loops; for every library)")
CONVS = {"jax": lambda x, w: jax.lax.conv_general_dilated(  # --conv-vjp: how convs differentiate
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), "hwio": conv2d_same}


def solver(name: str, rtol: float = RTOL, **overrides):
    """A solver of ``LABELS`` by short name (all but GMRES built by ``models.make_solver``)."""
    if name == "gmres":
        return deq.GMRES(rtol=rtol, atol=0.0)
    cfg = ml_collections.ConfigDict(dict(
        name="iteration" if name == "damped" else name, rtol=rtol, atol=0.0, history=HISTORY,
        damping=DAMPING if name == "damped" else 0.0, max_steps=0, eval_rtol=0, eval_max_steps=0))
    return dataclasses.replace(make_solver(cfg, mode="deq")[0], **overrides)


class Problem(NamedTuple):
    """The cell's parameters, one batch and a loss target; the conv and matmul precision."""
    params: dict  # w1, b1, w2, b2: the recurrent convs; wx, bx: the injection
    x: jax.Array
    target: jax.Array
    conv: Callable = CONVS["jax"]
    precision: str | None = None  # of deq.fixed_point; None: JAX's default

    def split(self, params, x):  # (cell parameters, inject(x)): the args of cell
        cp = {k: params[k] for k in ("w1", "b1", "w2", "b2")}
        return cp, self.conv(x, params["wx"]) + params["bx"]

    def cell(self, z, args):
        cp, u = args
        return jnp.tanh(self.conv(jax.nn.relu(self.conv(z, cp["w1"]) + cp["b1"]), cp["w2"])
                        + cp["b2"] + u)

    def rescale(self, s: float) -> Problem:  # recurrent kernels times s
        return self._replace(params={**self.params, "w1": s * self.params["w1"],
                                     "w2": s * self.params["w2"]})


def make_problem(batch, channels, size, **kw) -> Problem:
    """Images uniform in [0, 1], kernels ``N(0, 1) / sqrt(fan_in)``, zero biases."""
    kp, kx, kt = jax.random.split(jax.random.key(0), 3)
    k1, k2, k3 = jax.random.split(kp, 3)
    rec = lambda k: jax.random.normal(k, (3, 3, channels, channels)) / math.sqrt(9 * channels)
    zero = jnp.zeros(channels)
    params = dict(w1=rec(k1), b1=zero, w2=rec(k2), b2=zero, bx=zero,
                  wx=jax.random.normal(k3, (3, 3, 1, channels)) / 3.0)
    return Problem(params, jax.random.uniform(kx, (batch, size, size, 1)),
                   0.5 * jax.random.normal(kt, (batch, size, size, channels)), **kw)


def deq_solve(p: Problem, fwd, adjoint=None, max_steps=100):
    """``(params, x, probe) -> (z*, info)`` through ``deq.fixed_point``."""
    def solve(params, x, probe=None):
        cp, u = p.split(params, x)
        sol = deq.fixed_point(p.cell, jnp.zeros_like(u), (cp, u), solver=fwd, adjoint=adjoint,
                              max_steps=max_steps, batched=True, precision=p.precision,
                              probe=probe)
        return sol.value, {"steps": sol.stats.num_steps, "ok": sol.stats.converged,
                           "stats": sol.stats}
    return solve


def calibrate_scale(p: Problem, max_steps: int, target: int = TARGET_STEPS, lo: float = 0.25,
                    hi: float = 4.0, iters: int = 20) -> tuple[float, int]:
    """Bisect the kernel scale to ``target`` plain-iteration steps (non-convergence counts as
    too many); returns ``(scale, steps)``."""
    steps, best = jax.jit(lambda s: (lambda i: (i["steps"], i["ok"]))(deq_solve(
        p, solver("iteration"), None, max_steps)(p.rescale(s).params, p.x)[1])), None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        n, ok = (int(v) for v in steps(mid))
        if ok and (best is None or abs(n - target) < abs(best[1] - target)):
            best = (mid, n)
        if ok and n == target:
            break
        lo, hi = (lo, mid) if not ok or n > target else (mid, hi)
    if best is None:
        raise RuntimeError("calibrate_scale: plain iteration never converged")
    return best


def jaxopt_solve(p: Problem, kind: str, tol: float, max_steps: int):
    """jaxopt's fixed point with ``implicit_diff``: CG on the normal equations at ``RTOL``."""
    import jaxopt
    cls = jaxopt.FixedPointIteration if kind == "iteration" else partial(
        jaxopt.AndersonAcceleration, history_size=HISTORY)
    s = cls(fixed_point_fun=lambda z, cp, u: p.cell(z, (cp, u)), maxiter=max_steps, tol=tol,
            implicit_diff=True,
            implicit_diff_solve=partial(jaxopt.linear_solve.solve_normal_cg, tol=RTOL))
    def solve(params, x, probe=None):
        cp, u = p.split(params, x)
        z, state = s.run(jnp.zeros_like(u), cp, u)
        return z, {"steps": state.iter_num, "ok": state.error <= tol}
    return solve


def optx_solve(p: Problem, tol: float, bwd_tol: float | None, max_steps: int):
    """optimistix ImplicitAdjoint with lineax GMRES, or the default (dense) if bwd_tol is None."""
    import lineax as lx
    import optimistix as optx
    fwd = optx.FixedPointIteration(rtol=0.0, atol=tol, norm=optx.two_norm)
    adjoint = optx.ImplicitAdjoint(**({} if bwd_tol is None else {
        "linear_solver": lx.GMRES(rtol=0.0, atol=bwd_tol, norm=optx.two_norm)}))
    def solve(params, x, probe=None):
        cp, u = p.split(params, x)
        sol = optx.fixed_point(p.cell, fwd, jnp.zeros_like(u), (cp, u), adjoint=adjoint,
                               max_steps=max_steps, throw=False)
        return sol.value, {"steps": sol.stats["num_steps"],
                           "ok": sol.result == optx.RESULTS.successful}
    return solve


def train_step(solve, keep_z=False):
    """``(params, probe, x, target) -> ((loss, info), (grads, probe_ct))``."""
    def loss(params, probe, x, target):
        z, info = solve(params, x, probe)
        return jnp.mean((z - target) ** 2), {"steps": info["steps"], "ok": info["ok"],
                                              **({"z": z} if keep_z else {})}
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def compile_fn(fn, *args):
    """``(compiled, compile seconds, XLA's temporary bytes or None)``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()  # None where the backend does not implement it
    return compiled, time.perf_counter() - t0, getattr(mem, "temp_size_in_bytes", None)


def time_interleaved(calls, repeats: int) -> list[list[float]]:
    """Seconds of each warm ``fn(*args)`` in ``calls``, timed round-robin ``repeats`` times."""
    times = [[] for _ in calls]
    for _ in range(repeats):
        for ts, (fn, args) in zip(times, calls, strict=True):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t0)
    return times


# group: deq, unrolled, jaxopt or optimistix; depth: unrolled steps; bwd_steps: deq adjoint's
StepRow = dataclasses.make_dataclass("StepRow", ["group", "name", "forward", "backward", *(
    (k, object, dataclasses.field(default=v)) for k, v in dict(
        implicit=False, depth=None, note="", time_ms=None, times_ms=None, temp_bytes=None,
        compile_s=None, fwd_steps=None, bwd_steps=None, bwd_converged=None,
        grad_rel_diff=None).items())])


def methods(p: Problem, a, fwd_tol: float, bwd_tol: float) -> list[tuple[StepRow, object]]:
    """``(row, solve)`` of every training step measured (``solve`` None: not run, see note)."""
    n, out, it = a.max_steps, [], LABELS["iteration"]
    for f in ("iteration", "anderson"):
        out += [(StepRow("deq", f"deq implicit: fwd {f}, adjoint {b}", LABELS[f],
                         f"ImplicitAdjoint({LABELS[b]})", implicit=True),
                 deq_solve(p, solver(f), deq.ImplicitAdjoint(solver(b), max_steps=n), n))
                for b in ("iteration", "anderson", "gmres")]
    for f in a.phantom_forwards:
        out += [(StepRow("deq", f"deq {short}: fwd {f}", LABELS[f], label),
                 deq_solve(p, solver(f), adjoint, n)) for short, adjoint, label in (
            ("phantom", deq.PhantomAdjoint(), "PhantomAdjoint(steps=5, damping=0.5)"),
            ("JFB", deq.JacobianFreeAdjoint(), "JacobianFreeAdjoint()"))]
    out += [(StepRow("unrolled", f"deq unrolled: {k} steps", it, "UnrolledAdjoint()", depth=k),
             deq_solve(p, solver("iteration"), deq.UnrolledAdjoint(), k)) for k in a.unroll]
    if not a.missing["jaxopt"]:
        out += [(StepRow("jaxopt", f"jaxopt {label}, implicit_diff", label,
                         "implicit_diff (normal CG)", implicit=True),
                 jaxopt_solve(p, kind, fwd_tol, n)) for kind, label in (
            ("iteration", "FixedPointIteration"),
            ("anderson", f"AndersonAcceleration(history_size={HISTORY})"))]
    if not a.missing["optimistix"]:
        dim = a.batch * a.size * a.size * a.channels
        dense = 4 * dim * dim <= DENSE_LIMIT_BYTES
        out += [(StepRow("optimistix", "optimistix FixedPointIteration + ImplicitAdjoint(GMRES)",
                         it, "ImplicitAdjoint(lx.GMRES)", implicit=True),
                 optx_solve(p, fwd_tol, bwd_tol, n)),
                (StepRow("optimistix", "optimistix FixedPointIteration + default "
                         "ImplicitAdjoint", it, "ImplicitAdjoint() (AutoLinearSolver, dense)",
                         implicit=True, note="" if dense else "skipped: the default adjoint "
                         f"materialises a dense {dim}x{dim} Jacobian ({4 * dim * dim / 2**30:.0f}"
                         " GiB)"), optx_solve(p, fwd_tol, None, n) if dense else None)]
    return out


def run(a, log=print) -> dict:
    """Every measurement of the module docs for the options ``a``, as a JSON-able dict."""
    t0, load_start = time.perf_counter(), os.getloadavg()
    prov = provenance(["python", "-m", "experiments.bench_core", *a.argv])
    p = make_problem(a.batch, a.channels, a.size, conv=CONVS[a.conv_vjp],
                     precision=None if a.precision == "default" else a.precision)
    exact = p._replace(precision="highest")  # calibration and reference: highest precision
    with jax.default_matmul_precision("highest"):
        scale = a.scale or calibrate_scale(exact, a.max_steps)[0]
    p, exact = p.rescale(scale), exact.rescale(scale)
    log(f"{prov['machine']}, {a.conv_vjp} conv VJP, {a.precision} precision: scale {scale:.4f}")

    # 1. Forward solvers.
    forward, calls = [], []
    for k in ("iteration", "damped", "anderson", "broyden"):
        c, secs, _ = compile_fn(deq_solve(p, solver(k), None, a.max_steps), p.params, p.x)
        st = c(p.params, p.x)[1]["stats"]
        forward.append(dict(key=k, solver=LABELS[k], steps=int(st.num_steps),
                            rel_residual=float(st.rel_residual),
                            result=deq.RESULTS.describe(st.result), compile_s=secs))
        calls.append((c, (p.params, p.x)))
    for r, ts in zip(forward, time_interleaved(calls, a.repeats), strict=True):
        r.update(ratio_vs_iteration=r["steps"] / forward[0]["steps"],
                 time_ms=1e3 * statistics.median(ts))

    # The reference gradient (tight forward and GMRES adjoint); it calibrates the peers' tols.
    args = (p.params, deq.backward_stats_probe(), p.x, p.target)
    with jax.default_matmul_precision("highest"):
        (_, ref), (grad_ref, _) = jax.jit(train_step(deq_solve(
            exact, solver("anderson", 1e-6, stall_patience=None), deq.ImplicitAdjoint(
                deq.GMRES(rtol=1e-6, atol=0.0), max_steps=2000, on_failure="ignore"), 500),
            keep_z=True))(*args)
    fwd_tol = RTOL * float(jnp.linalg.norm(ref["z"]))
    bwd_tol = RTOL * float(jnp.linalg.norm(2.0 * (ref["z"] - p.target) / p.target.size))
    flat_ref = _flat(grad_ref)

    # 2 and 4. Training steps: deq's adjoints, unrolled backprop, the peers.
    rows, timed = [], []
    for row, solve in methods(p, a, fwd_tol, bwd_tol):
        rows.append(row)
        log(f"[step] {row.name}")
        try:
            if solve is None:
                continue
            c, row.compile_s, row.temp_bytes = compile_fn(train_step(solve), *args)
            (_, info), (grads, probe_ct) = c(*args)
        except Exception as e:  # a peer that fails must not stop the benchmark
            row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        timed.append((row, c))
        row.fwd_steps = int(info["steps"])
        row.grad_rel_diff = float(np.linalg.norm(_flat(grads) - flat_ref)
                                  / np.linalg.norm(flat_ref))
        notes = [] if bool(info["ok"]) or row.depth else ["forward solve did not converge"]
        if row.implicit and row.group == "deq":
            bs = deq.backward_stats(probe_ct)
            row.bwd_steps, row.bwd_converged = int(bs.num_steps), bool(bs.converged)
            notes += [] if row.bwd_converged else ["adjoint solve did not converge"]
        row.note = "; ".join(notes)
    for (row, _), ts in zip(timed, time_interleaved([(c, args) for _, c in timed], a.repeats),
                            strict=True):
        row.times_ms = [1e3 * t for t in ts]
        row.time_ms = statistics.median(row.times_ms)

    # 3. Compiled memory of the implicit step at two forward budgets; unrolled's slope.
    flat = []
    for f in a.flat_forwards:
        mem = [compile_fn(train_step(deq_solve(
            p, solver(f, 1e-12, stall_patience=None),
            deq.ImplicitAdjoint(solver("gmres"), max_steps=a.max_steps), b)), *args)[2]
            for b in FLAT_BUDGETS]
        flat.append(dict(forward=LABELS[f], adjoint="GMRES", temp_bytes=mem,
                         growth=mem[1] / mem[0] - 1 if None not in mem and mem[0] else None))
    unrolled = [(r.depth, r.temp_bytes) for r in rows if r.depth and r.temp_bytes is not None]
    slope = np.polyfit(*np.array(unrolled, float).T, 1)[0] if len(unrolled) > 1 else None

    # 5. Ratios: deq's implicit steps vs the peers' (time) and vs unrolled (memory).
    peers = [r for r in rows if r.group in ("jaxopt", "optimistix") and r.time_ms]
    depth = {r.depth: r.temp_bytes for r in rows if r.depth}
    ratios = []
    for r in (r for r in rows if r.group == "deq" and r.implicit and r.time_ms):
        e = dict(name=r.name, time_ms=r.time_ms)
        for g in ("fastest_peer", "jaxopt", "optimistix"):
            ts = [q.time_ms for q in peers if g in ("fastest_peer", q.group)]
            e[f"speedup_vs_{g}"] = min(ts) / r.time_ms if ts else None
        for k in (32, 64):
            ok = depth.get(k) and r.temp_bytes is not None
            e[f"memory_vs_unrolled_{k}"] = r.temp_bytes / depth[k] if ok else None
        ratios.append(e)
    return {
        "provenance": prov,
        "versions": {k: _version(k) for k in ("deq", "jaxlib", "jaxopt", "optimistix", "lineax")},
        "config": {k: v for k, v in vars(a).items() if k not in ("argv", "missing")},
        "calibration": {"scale": scale, "target_steps": TARGET_STEPS},
        "tolerance": {"rtol": RTOL, "peer_forward_atol": fwd_tol, "peer_backward_atol": bwd_tol},
        "forward": forward, "steps": [dataclasses.asdict(r) for r in rows],
        "flatness": {"budgets": FLAT_BUDGETS, "implicit": flat,
                     "unrolled_slope_bytes_per_step": None if slope is None else float(slope),
                     "state_bytes": p.target.size * p.target.dtype.itemsize},
        "ratios": ratios, "peers_missing": {k: v for k, v in a.missing.items() if v},
        "load_average": [[round(x, 2) for x in la] for la in (load_start, os.getloadavg())],
        "wall_s": time.perf_counter() - t0,
    }


_flat = lambda tree: np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])
_f = lambda v, fmt="{}": "-" if v is None else fmt.format(v)
_mib = lambda b: _f(b) if b is None else f"{b / 2**10:.1f} KiB" if b < 2**20 else \
    f"{b / 2**20:.1f} MiB"
def _version(pkg: str) -> str | None:
    """The installed version of ``pkg``; its ``__version__`` when run from a source tree."""
    if not find_spec(pkg):
        return None
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return getattr(__import__(pkg), "__version__", None)


def md_table(headers, rows) -> str:
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def to_markdown(res: dict) -> str:
    c, t, fl, pv = res["config"], res["tolerance"], res["flatness"], res["provenance"]
    m, ms = pv["machine"], lambda v: _f(v, "{:.1f} ms")
    versions = ", ".join(f"{k} {v}" for k, v in {"jax": pv["jax"], **res["versions"]}.items())
    lines = [
        "# deq core benchmark: conv DEQ cell", "",
        f"Machine: {m['cpu']}, {m['cores']} cores; GPU {m['gpu'] or 'none'}; backend "
        f"{m['backend']}; {versions}; {pv['date']}, commit {pv['git_commit'][:10]}"
        f"{' (uncommitted changes)' if pv['dirty'] else ''}.", "",
        f"Cell `z -> tanh(conv3x3(relu(conv3x3(z))) + conv3x3(x))`, batch {c['batch']}, "
        f"{c['channels']} channels, {c['size']}x{c['size']} images (NHWC), float32, matmul "
        f"precision '{c['precision']}', conv VJP '{c['conv_vjp']}'"
        f"{HWIO_NOTE if c['conv_vjp'] == 'hwio' else ''}. Recurrent kernel scale "
        f"{res['calibration']['scale']:.4f} (calibrated to {TARGET_STEPS} plain-iteration steps at "
        f"precision 'highest')."
        f" Relative tolerance {t['rtol']:g} per sample (deq); peers: absolute L2 tolerances "
        f"{t['peer_forward_atol']:.3e} (forward) and {t['peer_backward_atol']:.3e} (backward) = "
        f"{t['rtol']:g} x the batch norm. Forward budget {c['max_steps']} steps. Times: median "
        f"of {c['repeats']} jitted calls after one warm-up, all methods timed round-robin; "
        f"memory: XLA's compiled temporary buffers. Load average (1, 5, 15 min) at start and "
        f"end: {res['load_average']}.", *([f"\nNote: {c['note']}"] if c["note"] else []), "",
        "## 1. Forward solvers: steps to tolerance on the same batch", "",
        md_table(["solver", "steps", "steps / iteration", "final rel. residual", "result",
                  "forward time"],
                 [[r["solver"], r["steps"], f"{r['ratio_vs_iteration']:.2f}",
                   f"{r['rel_residual']:.2e}", r["result"], ms(r["time_ms"])]
                  for r in res["forward"]]), "",
        "## 2 and 4. One training step (MSE loss of z*, gradient w.r.t. all parameters)", "",
        "`grad diff`: relative L2 distance of the gradient to a tight exact-IFT reference "
        "(Anderson forward at 1e-6, GMRES adjoint at 1e-6, precision 'highest').", "",
        md_table(["method", "forward", "backward", "step time", "compiled temp memory",
                  "forward steps", "adjoint steps", "grad diff", "compile", "note"],
                 [[r["name"], r["forward"], r["backward"], ms(r["time_ms"]),
                   _mib(r["temp_bytes"]), _f(r["fwd_steps"]), _f(r["bwd_steps"]),
                   _f(r["grad_rel_diff"], "{:.1e}"), _f(r["compile_s"], "{:.1f} s"), r["note"]]
                  for r in res["steps"]]),
        *[f"\n{k}: {v}" for k, v in res["peers_missing"].items()], "",
        "## 3. Memory flatness", "",
        md_table(["implicit step (GMRES adjoint)",
                  *(f"temp memory, forward budget {b}" for b in fl["budgets"]), "growth"],
                 [[f"fwd {r['forward']}", *map(_mib, r["temp_bytes"]),
                   _f(r["growth"], "{:+.2%}")] for r in fl["implicit"]]),
    ]
    if (s := fl["unrolled_slope_bytes_per_step"]) is not None:
        lines += ["", f"Unrolled backprop grows linearly: {_mib(s)} per step (least-squares "
                  f"fit over {', '.join(map(str, c['unroll']))} steps), "
                  f"{s / fl['state_bytes']:.1f} state-sized buffers per step."]
    lines += ["", "## 5. Ratios", "", md_table(
        ["deq implicit step", "time", "speed-up vs fastest peer", "vs jaxopt", "vs optimistix",
         "memory / unrolled 32", "memory / unrolled 64"],
        [[e["name"], ms(e["time_ms"]), *(_f(e[f"speedup_vs_{g}"], "{:.2f}x") for g in (
            "fastest_peer", "jaxopt", "optimistix")),
          *(_f(e[f"memory_vs_unrolled_{k}"], "{:.3f}") for k in (32, 64))]
         for e in res["ratios"]]), "", f"Total benchmark wall time {res['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def problem_parser(prog: str, doc: str, defaults: dict, out: str) -> argparse.ArgumentParser:
    """The options every benchmark of the conv problem takes (sizes, conv VJP, precision)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    for k in ("batch", "channels", "size", "repeats", "max_steps"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"default {defaults[k]}")
    ap.add_argument("--unroll", type=int, nargs="+", help="unrolled depths (default "
                    f"{' '.join(map(str, defaults['unroll']))})")
    ap.add_argument("--scale", type=float, help="recurrent kernel scale (default: calibrated)")
    ap.add_argument("--conv-vjp", choices=CONVS, default="jax",
                    help="how the convs are differentiated (hwio: deq.cells.conv2d_same)")
    ap.add_argument("--precision", choices=("default", "high", "highest"), default="highest",
                    help="JAX matmul and conv precision (default highest)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--out", type=Path, default=Path(out))
    return ap


def parse_problem_args(ap, argv, defaults: dict, quick: dict) -> argparse.Namespace:
    """Parse, filling unset sizes from ``defaults`` (``quick`` with --quick)."""
    a = ap.parse_args(argv)
    for k, v in (quick if a.quick else defaults).items():
        setattr(a, k, v if getattr(a, k, None) is None else getattr(a, k))
    a.argv = list(sys.argv[1:] if argv is None else argv)
    return a


def run_and_save(a, name: str, run, to_markdown) -> dict:
    """``run(a)`` at ``a.precision``, then its markdown, JSON and provenance under ``a.out``."""
    with jax.default_matmul_precision(a.precision), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # failed solves show in the tables
        res = run(a)
    stem = (f"{name}_{res['provenance']['machine']['backend']}_b{a.batch}_"
             f"c{a.channels}_s{a.size}_{a.conv_vjp}_{a.precision}")
    write_results(a.out, stem, to_markdown(res), res, res["provenance"])
    print(f"wrote {a.out / stem}.md and .json")
    return res


def parse_args(argv=None) -> argparse.Namespace:
    ap = problem_parser("python -m experiments.bench_core", __doc__, DEFAULTS,
                        "experiments/results/bench_core")
    ap.add_argument("--no-peers", action="store_true", help="skip jaxopt and optimistix")
    ap.add_argument("--note", default="", help="free text saved with the results")
    a = parse_problem_args(ap, argv, DEFAULTS, QUICK)
    a.missing = {k: "skipped (--no-peers)" if a.no_peers else None if all(map(find_spec, m))
                 else "not installed (pip install jaxopt optimistix)"
                 for k, m in (("jaxopt", ["jaxopt"]), ("optimistix", ["optimistix", "lineax"]))}
    return a


def main(argv=None) -> dict:
    return run_and_save(parse_args(argv), "bench_core", run, to_markdown)


if __name__ == "__main__":
    main()

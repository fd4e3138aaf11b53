"""Benchmark of the deq core on the conv cell of ANCHORS.md (issue #2).

The cell is ``z -> tanh(conv3x3(relu(conv3x3(z))) + inject(x))`` on NHWC images, with
``inject(x)`` a 3x3 convolution of the 1-channel input to ``C`` channels (computed once, outside
the solve). The recurrent kernels are scaled so that plain iteration needs about 30 steps to a
relative residual of 1e-4 (``calibrate_scale``). Everything runs under
``jax.default_matmul_precision("highest")``.

What is measured (printed, and saved as markdown + JSON in ``--out``):

1. steps to tolerance of each forward solver on the same batch, and the final relative residual;
2. time (median after warm-up) and compiled temporary memory of one training step (MSE loss of
   ``z*`` to a fixed random target, gradient w.r.t. all cell parameters) for every adjoint;
3. whether the implicit step's compiled memory stays flat in the forward step budget, and the
   per-step slope of unrolled backprop;
4. the same step through jaxopt and optimistix (optional imports: the ``bench`` extra);
5. ratios: deq's implicit step vs the peers, implicit memory vs unrolled 32/64 steps.

Tolerances across libraries. deq stops per sample (``batched=True``) when
``|f(z_i) - z_i| <= 1e-4 |f(z_i)|``. jaxopt's ``tol`` is absolute on the whole batch (L2) and
optimistix's is elementwise by default, so both get an absolute L2 tolerance calibrated on this
batch: ``1e-4 * ||z*||_2`` (forward) and ``1e-4 * ||dL/dz*||_2`` (backward); that is the same
relative rule on the whole batch, a weaker one than deq's per-sample rule.

Run::

    python -m experiments.bench_core                       # CPU defaults: batch 32, 16 channels
    python -m experiments.bench_core --batch 128 --channels 64   # the ANCHORS GPU setting
    python -m experiments.bench_core --quick --out /tmp/b  # tiny smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import deq
from deq.cells import conv2d_same

PRECISION = "highest"
RTOL = 1e-4
TARGET_STEPS = 30  # naive-iteration steps the kernel scale is calibrated to
DAMPING = 0.5  # of the damped-iteration forward row
ANDERSON_HISTORY = 5
BROYDEN_MEMORY = 20
UNROLL_STEPS = (8, 16, 32, 64)
FLAT_STEPS = (10, 100)  # forward budgets of the memory-flatness check
DENSE_LIMIT_BYTES = 1 << 30  # skip optimistix's dense default adjoint above this Jacobian size


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and options of one benchmark run."""

    batch: int = 32
    channels: int = 16
    size: int = 28
    repeats: int = 5
    max_steps: int = 100
    scale: float | None = None  # recurrent kernel scale; None: calibrate to TARGET_STEPS
    seed: int = 0
    unroll_steps: tuple[int, ...] = UNROLL_STEPS
    # forward solvers of the phantom/JFB rows and of the memory-flatness check
    phantom_forwards: tuple[str, ...] = ("iteration", "anderson")
    flat_forwards: tuple[str, ...] = ("iteration", "anderson")
    peers: bool = True
    conv_vjp: str = "jax"  # see ``conv_vjp_mode``
    note: str = ""  # free text saved with the results (e.g. "machine shared with other jobs")


# Tiny smoke configuration: every section, fewer compilations (compiling dominates here).
QUICK = Config(batch=2, channels=4, size=8, repeats=2, unroll_steps=(8, 16),
               phantom_forwards=("iteration",), flat_forwards=("iteration",))


# --------------------------------------------------------------------------------------------
# The cell


def _conv(x, w):
    dn = ("NHWC", "HWIO", "NHWC")
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)


# "hwio" mode: the library's conv2d_same (deq.cells), whose custom VJP writes the input
# cotangent as a plain conv with the flipped HWIO kernel and the kernel cotangent as per-offset
# matmuls, sidestepping XLA:CPU's slow transposed/backward-filter convs inside loops.
_conv_hwio_vjp = conv2d_same

CONV_VJP_MODES = ("jax", "hwio")
_conv_vjp = ["jax"]  # read at trace time; set with ``conv_vjp_mode``


@contextlib.contextmanager
def conv_vjp_mode(mode: str):
    """Choose how the cell's convolutions are differentiated while tracing inside the block.

    ``"jax"``: JAX's own transpose rules. ``"hwio"``: a custom VJP that writes both cotangents
    as plain NHWC/HWIO convolutions (flipped, transposed kernel for the input; transposed
    activations for the kernel). Same mathematics; it exists because XLA:CPU runs the convs
    JAX's transpose rules emit (dim labels ``b01f_01oi->b01f`` for the input cotangent,
    ``f01b_i01o->01bf`` for the kernel) about 10-15x slower than a plain conv when they sit
    inside a ``while``/``scan`` body; in straight-line code XLA inserts transposes and takes
    the fast path. Every implicit adjoint loop (input cotangent) and every unrolled backward
    (both) hits that path, whatever the library.
    """
    if mode not in CONV_VJP_MODES:
        raise ValueError(f"conv_vjp must be one of {CONV_VJP_MODES}, got {mode!r}")
    prev = _conv_vjp[0]
    _conv_vjp[0] = mode
    try:
        yield
    finally:
        _conv_vjp[0] = prev


def conv(x, w, b):
    """SAME-padded stride-1 convolution, NHWC activations, HWIO kernels (odd kernel sizes)."""
    y = _conv_hwio_vjp(x, w) if _conv_vjp[0] == "hwio" else _conv(x, w)
    return y + b


def init_params(key, channels: int, scale: float = 1.0) -> dict:
    """Parameters of the cell: two recurrent 3x3 convs (``w1``, ``w2``) and the injection.

    Recurrent kernels are ``scale * N(0, 1) / sqrt(fan_in)``; ``scale`` sets how contractive
    the cell is, hence how many iterations it needs.
    """
    k1, k2, k3 = jax.random.split(key, 3)
    fan = 9 * channels
    return {
        "w1": scale * jax.random.normal(k1, (3, 3, channels, channels)) / math.sqrt(fan),
        "b1": jnp.zeros((channels,)),
        "w2": scale * jax.random.normal(k2, (3, 3, channels, channels)) / math.sqrt(fan),
        "b2": jnp.zeros((channels,)),
        "wx": jax.random.normal(k3, (3, 3, 1, channels)) / 3.0,
        "bx": jnp.zeros((channels,)),
    }


def rescale(params: dict, scale: float) -> dict:
    """``params`` with the recurrent kernels multiplied by ``scale``."""
    return {**params, "w1": params["w1"] * scale, "w2": params["w2"] * scale}


def cell_params(params: dict) -> dict:
    return {k: params[k] for k in ("w1", "b1", "w2", "b2")}


def inject(params: dict, x):
    """``inject(x)``: 3x3 conv of the 1-channel image to ``C`` channels."""
    return conv(x, params["wx"], params["bx"])


def cell(z, cp: dict, u):
    """``f(z) = tanh(conv3x3(relu(conv3x3(z))) + u)`` with ``u = inject(x)``."""
    return jnp.tanh(conv(jax.nn.relu(conv(z, cp["w1"], cp["b1"])), cp["w2"], cp["b2"]) + u)


def cell_fn(z, args):
    """``cell`` in the ``fn(z, args)`` form of ``deq.fixed_point`` and optimistix."""
    cp, u = args
    return cell(z, cp, u)


@dataclasses.dataclass
class Problem:
    params: dict
    x: jax.Array
    target: jax.Array
    scale: float


def make_problem(cfg: Config) -> Problem:
    """Random images in [0, 1], unit-scale parameters, a fixed random target for the loss."""
    kp, kx, kt = jax.random.split(jax.random.key(cfg.seed), 3)
    x = jax.random.uniform(kx, (cfg.batch, cfg.size, cfg.size, 1))
    target = 0.5 * jax.random.normal(kt, (cfg.batch, cfg.size, cfg.size, cfg.channels))
    return Problem(init_params(kp, cfg.channels), x, target, 1.0)


# --------------------------------------------------------------------------------------------
# Forward solves


def forward_solver(name: str, rtol: float = RTOL, **kw) -> deq.ForwardSolver:
    """The deq forward solvers compared here, by short name."""
    if name == "iteration":
        return deq.FixedPointIteration(rtol=rtol, atol=0.0, **kw)
    if name == "damped":
        return deq.FixedPointIteration(rtol=rtol, atol=0.0, damping=DAMPING, **kw)
    if name == "anderson":
        return deq.Anderson(history=ANDERSON_HISTORY, rtol=rtol, atol=0.0, **kw)
    if name == "broyden":
        return deq.Broyden(memory=BROYDEN_MEMORY, rtol=rtol, atol=0.0, **kw)
    raise ValueError(f"unknown forward solver {name!r}")


FORWARD_LABELS = {
    "iteration": "FixedPointIteration",
    "damped": f"FixedPointIteration(damping={DAMPING})",
    "anderson": f"Anderson(history={ANDERSON_HISTORY})",
    "broyden": f"Broyden(memory={BROYDEN_MEMORY})",
}


def make_forward(solver: deq.ForwardSolver, max_steps: int) -> Callable:
    """``(params, x) -> (z*, stats)``: a forward solve only, no gradient."""

    def forward(params, x):
        u = inject(params, x)
        sol = deq.fixed_point(
            cell_fn, jnp.zeros_like(u), (cell_params(params), u), solver=solver,
            max_steps=max_steps, batched=True, precision=PRECISION,
        )
        return sol.value, sol.stats

    return forward


def calibrate_scale(problem: Problem, max_steps: int, target: int = TARGET_STEPS,
                    lo: float = 0.25, hi: float = 4.0, iters: int = 20) -> tuple[float, int]:
    """Bisect the recurrent kernel scale until plain iteration needs ``target`` steps.

    Steps grow with the scale while the iteration converges; beyond the contraction limit it
    stagnates or diverges, which counts as "too many". Returns ``(scale, steps)``.
    """
    fwd = make_forward(forward_solver("iteration"), max_steps)

    @jax.jit
    def steps(scale):
        _, st = fwd(rescale(problem.params, scale), problem.x)
        return st.num_steps, st.converged

    best = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        n, ok = steps(mid)
        n, ok = int(n), bool(ok)
        if ok and (best is None or abs(n - target) < abs(best[1] - target)):
            best = (mid, n)
        if n == target and ok:
            break
        if not ok or n > target:
            hi = mid
        else:
            lo = mid
    if best is None:
        raise RuntimeError("calibrate_scale: plain iteration never converged")
    return best


# --------------------------------------------------------------------------------------------
# Training steps: loss of z* + gradient w.r.t. all parameters

SolveFn = Callable[..., tuple[jax.Array, dict]]


def make_train_step(solve: SolveFn) -> Callable:
    """``(params, probe, x, target) -> ((loss, info), (grads, probe_ct))``.

    ``solve(cell_params, u, probe)`` returns ``z*`` and ``info`` (forward steps at least);
    ``info`` is auxiliary output, so one timed call gives both. ``probe`` is a
    :func:`deq.backward_stats_probe`: its cotangent carries the statistics of deq's implicit
    backward solve (other solves ignore it and get a zero cotangent).
    """

    def loss(params, probe, x, target):
        u = inject(params, x)
        z, info = solve(cell_params(params), u, probe)
        return jnp.mean((z - target) ** 2), info

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def deq_solve(solver: deq.ForwardSolver, adjoint: deq.Adjoint, max_steps: int) -> SolveFn:
    def solve(cp, u, probe):
        sol = deq.fixed_point(
            cell_fn, jnp.zeros_like(u), (cp, u), solver=solver, adjoint=adjoint,
            max_steps=max_steps, batched=True, precision=PRECISION, probe=probe,
        )
        return sol.value, {"steps": sol.stats.num_steps, "ok": sol.stats.converged}

    return solve


def adjoint_solver(name: str, rtol: float = RTOL):
    """Solvers of the implicit adjoint system, by short name."""
    if name == "gmres":
        return deq.GMRES(rtol=rtol, atol=0.0)
    return forward_solver(name, rtol=rtol)


def jaxopt_solve(kind: str, tol: float, max_steps: int, cg_tol: float = RTOL) -> SolveFn:
    """jaxopt's FixedPointIteration / AndersonAcceleration with ``implicit_diff=True``.

    The backward is jaxopt's default linear solver (conjugate gradient on the normal
    equations), with its relative tolerance set to ours.
    """
    import jaxopt

    lin = partial(jaxopt.linear_solve.solve_normal_cg, tol=cg_tol)

    def fp(z, cp, u):
        return cell(z, cp, u)

    if kind == "iteration":
        s = jaxopt.FixedPointIteration(fixed_point_fun=fp, maxiter=max_steps, tol=tol,
                                       implicit_diff=True, implicit_diff_solve=lin)
    elif kind == "anderson":
        s = jaxopt.AndersonAcceleration(fixed_point_fun=fp, history_size=ANDERSON_HISTORY,
                                        maxiter=max_steps, tol=tol, implicit_diff=True,
                                        implicit_diff_solve=lin)
    else:
        raise ValueError(kind)

    def solve(cp, u, probe):
        del probe
        z, state = s.run(jnp.zeros_like(u), cp, u)
        return z, {"steps": state.iter_num, "ok": state.error <= tol}

    return solve


def optx_solve(tol: float, bwd_tol: float | None, max_steps: int) -> SolveFn:
    """optimistix FixedPointIteration with ImplicitAdjoint: lineax GMRES, or (``bwd_tol`` None)
    the default adjoint (``AutoLinearSolver``, dense for a square Jacobian)."""
    import lineax as lx
    import optimistix as optx

    solver = optx.FixedPointIteration(rtol=0.0, atol=tol, norm=optx.two_norm)
    if bwd_tol is None:
        adjoint = optx.ImplicitAdjoint()
    else:
        adjoint = optx.ImplicitAdjoint(
            linear_solver=lx.GMRES(rtol=0.0, atol=bwd_tol, norm=optx.two_norm)
        )

    def solve(cp, u, probe):
        del probe
        sol = optx.fixed_point(cell_fn, solver, jnp.zeros_like(u), (cp, u), adjoint=adjoint,
                               max_steps=max_steps, throw=False)
        ok = sol.result == optx.RESULTS.successful
        return sol.value, {"steps": sol.stats["num_steps"], "ok": ok}

    return solve


# --------------------------------------------------------------------------------------------
# Measurement


def compile_step(fn: Callable, *args):
    """Lower and compile ``fn`` for ``args``; returns ``(compiled, seconds, temp_bytes)``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    secs = time.perf_counter() - t0
    temp = None
    try:
        mem = compiled.memory_analysis()
        temp = None if mem is None else getattr(mem, "temp_size_in_bytes", None)
    except Exception:  # not every backend implements it
        temp = None
    return compiled, secs, (None if temp is None else int(temp))


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


def grad_rel_diff(g, g_ref) -> float:
    a, b = _flat(g), _flat(g_ref)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@dataclasses.dataclass
class StepRow:
    """One measured training step."""

    group: str  # "deq", "unrolled", "jaxopt", "optimistix"
    name: str
    forward: str
    backward: str
    time_ms: float | None = None
    times_ms: list[float] = dataclasses.field(default_factory=list)
    temp_bytes: int | None = None
    compile_s: float | None = None
    fwd_steps: int | None = None
    bwd_steps: int | None = None  # deq implicit rows: adjoint iterations / GMRES matvecs
    bwd_converged: bool | None = None
    loss: float | None = None
    grad_rel_diff: float | None = None  # vs the tight exact-IFT reference gradient
    note: str = ""


def prepare_step(row: StepRow, solve: SolveFn, problem: Problem, grad_ref=None):
    """Compile one training step, run it once and record what it reports (not its time).

    Fills ``row`` in place; returns ``(compiled, args)`` for :func:`time_interleaved`, or
    ``None`` if the step failed to build or run (the reason goes to ``row.note``).
    """
    step = make_train_step(solve)
    args = (problem.params, deq.backward_stats_probe(), problem.x, problem.target)
    try:
        compiled, row.compile_s, row.temp_bytes = compile_step(step, *args)
        (loss, info), (grads, probe_ct) = jax.block_until_ready(compiled(*args))
    except Exception as e:  # a peer that fails must not kill the whole benchmark
        row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return None
    row.loss = float(loss)
    row.fwd_steps = int(info["steps"])
    if row.backward.startswith("ImplicitAdjoint") and row.group == "deq":
        bs = deq.backward_stats(probe_ct)
        row.bwd_steps, row.bwd_converged = int(bs.num_steps), bool(bs.converged)
        if not row.bwd_converged:
            row.note = (row.note + " adjoint solve did not converge").strip()
    if not bool(info["ok"]) and row.group != "unrolled":
        row.note = (row.note + " forward solve did not meet its tolerance").strip()
    if grad_ref is not None:
        row.grad_rel_diff = grad_rel_diff(grads, grad_ref)
    return compiled, args


def time_interleaved(calls: list[tuple[Callable, tuple]], repeats: int) -> list[list[float]]:
    """Wall times (s) of each ``fn(*args)``, measured round-robin, ``repeats`` rounds.

    Round-robin rather than one function after the other, so that a change in background
    load (a shared machine) hits every method alike and their ratios stay meaningful.
    Every function must have been called once already (compiled and warm).
    """
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, (fn, args) in enumerate(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[i].append(time.perf_counter() - t0)
    return times


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
        "deq": deq.__version__,
        "jaxopt": _version("jaxopt"),
        "optimistix": _version("optimistix"),
        "lineax": _version("lineax"),
        "python": platform.python_version(),
        "load_average_at_start": _loadavg(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _peers_available() -> dict[str, str | None]:
    """``{"jaxopt": None or why missing, "optimistix": ...}``."""
    missing = {}
    for mods, key in ((("jaxopt",), "jaxopt"), (("optimistix", "lineax"), "optimistix")):
        missing[key] = None
        for m in mods:
            try:
                __import__(m)
            except ImportError as e:
                missing[key] = f"not installed ({e}); install the `bench` extra"
    return missing


# --------------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Run every measurement of the module docs; returns a JSON-able dict."""
    with (jax.default_matmul_precision(PRECISION), conv_vjp_mode(cfg.conv_vjp),
          warnings.catch_warnings()):
        # Backward-solve warnings are reported in the tables (gradient error), not on stderr.
        warnings.simplefilter("ignore", RuntimeWarning)
        return _run(cfg, log)


def _run(cfg: Config, log) -> dict:
    t_start = time.perf_counter()
    problem = make_problem(cfg)
    machine = machine_info()
    log(f"machine: {machine['cpu']} ({machine['cores']} cores), device "
        f"{machine['device_kind']}, jax {machine['jax']}")
    log(f"config: batch {cfg.batch}, {cfg.channels} channels, {cfg.size}x{cfg.size}, "
        f"repeats {cfg.repeats}, forward max_steps {cfg.max_steps}, conv VJP {cfg.conv_vjp}")

    # Calibrate the kernel scale, then fix the problem.
    if cfg.scale is None:
        scale, n = calibrate_scale(problem, cfg.max_steps)
        log(f"calibrated recurrent kernel scale {scale:.4f}: plain iteration needs {n} steps")
    else:
        scale = cfg.scale
    problem = Problem(rescale(problem.params, scale), problem.x, problem.target, scale)
    args = (problem.params, deq.backward_stats_probe(), problem.x, problem.target)

    # 1. Forward solvers.
    forward_rows, forward_calls = [], []
    for name in ("iteration", "damped", "anderson", "broyden"):
        fwd = make_forward(forward_solver(name), cfg.max_steps)
        compiled, csecs, _ = compile_step(fwd, problem.params, problem.x)
        _, st = jax.block_until_ready(compiled(problem.params, problem.x))
        forward_rows.append({
            "solver": FORWARD_LABELS[name], "key": name, "steps": int(st.num_steps),
            "rel_residual": float(st.rel_residual), "result": deq.RESULTS.describe(st.result),
            "compile_s": csecs,
        })
        forward_calls.append((compiled, (problem.params, problem.x)))
    for row, times in zip(forward_rows, time_interleaved(forward_calls, cfg.repeats),
                          strict=True):
        row["time_ms"] = 1e3 * statistics.median(times)
        log(f"[forward] {row['solver']:<36} steps {row['steps']:>4}  rel {row['rel_residual']:.2e}"
            f"  {row['result']:<10} {row['time_ms']:8.1f} ms")
    base = forward_rows[0]["steps"]
    for row in forward_rows:
        row["ratio_vs_iteration"] = row["steps"] / base

    # Reference: tight forward, tight GMRES adjoint. Also gives the peers' absolute tolerances.
    ref_inner = deq_solve(
        forward_solver("anderson", rtol=1e-6, stall_patience=None),
        deq.ImplicitAdjoint(solver=deq.GMRES(rtol=1e-6, atol=0.0), max_steps=2000,
                            on_failure="ignore"),
        max_steps=500,
    )

    def ref_solve(cp, u, probe):
        z, info = ref_inner(cp, u, probe)
        return z, {**info, "z": z}

    (_, ref_info), (grad_ref, _) = jax.jit(make_train_step(ref_solve))(*args)
    z_ref = ref_info["z"]
    g_z = 2.0 * (z_ref - problem.target) / z_ref.size  # dL/dz* of the mean squared error
    fwd_tol = RTOL * float(jnp.linalg.norm(z_ref))
    bwd_tol = RTOL * float(jnp.linalg.norm(g_z))
    log(f"peer tolerances (absolute, L2 over the batch): forward {fwd_tol:.3e}, "
        f"backward {bwd_tol:.3e}")

    timed: list[tuple[StepRow, Callable, tuple]] = []

    def run_row(row, solve):
        prepared = prepare_step(row, solve, problem, grad_ref)
        if prepared is not None:
            timed.append((row, *prepared))
        mem = "-" if row.temp_bytes is None else f"{row.temp_bytes / 2**20:9.1f} MiB"
        gd = "-" if row.grad_rel_diff is None else f"{row.grad_rel_diff:.1e}"
        log(f"[step] {row.name:<58} {mem}  steps fwd {row.fwd_steps} bwd "
            f"{'-' if row.bwd_steps is None else row.bwd_steps}  grad diff {gd}  {row.note}")
        return row

    # 2. Training steps through deq.
    step_rows: list[StepRow] = []
    for fwd_name in ("iteration", "anderson"):
        for adj_name in ("iteration", "anderson", "gmres"):
            adj_label = "GMRES" if adj_name == "gmres" else FORWARD_LABELS[adj_name]
            step_rows.append(run_row(
                StepRow("deq", f"deq implicit: fwd {fwd_name}, adjoint {adj_name}",
                        FORWARD_LABELS[fwd_name], f"ImplicitAdjoint({adj_label})"),
                deq_solve(forward_solver(fwd_name),
                          deq.ImplicitAdjoint(solver=adjoint_solver(adj_name),
                                              max_steps=cfg.max_steps),
                          cfg.max_steps)))
    for fwd_name in cfg.phantom_forwards:
        for short, adj, label in (
            ("phantom", deq.PhantomAdjoint(), "PhantomAdjoint(steps=5, damping=0.5)"),
            ("JFB", deq.JacobianFreeAdjoint(), "JacobianFreeAdjoint()"),
        ):
            step_rows.append(run_row(
                StepRow("deq", f"deq {short}: fwd {fwd_name}", FORWARD_LABELS[fwd_name], label),
                deq_solve(forward_solver(fwd_name), adj, cfg.max_steps)))
    for k in cfg.unroll_steps:
        step_rows.append(run_row(
            StepRow("unrolled", f"deq unrolled: {k} steps", FORWARD_LABELS["iteration"],
                    "UnrolledAdjoint()"),
            deq_solve(forward_solver("iteration"), deq.UnrolledAdjoint(), k)))

    # 3. Memory flatness of the implicit step in the forward budget (compiled memory only).
    flat_rows = []
    for fwd_name in cfg.flat_forwards:
        mems = {}
        for budget in FLAT_STEPS:
            step = make_train_step(deq_solve(
                forward_solver(fwd_name, rtol=1e-12, stall_patience=None),
                deq.ImplicitAdjoint(solver=deq.GMRES(rtol=RTOL, atol=0.0),
                                    max_steps=cfg.max_steps),
                budget))
            mems[budget] = compile_step(step, *args)[2]
        lo_b, hi_b = FLAT_STEPS
        growth = None if not mems[lo_b] or mems[hi_b] is None else mems[hi_b] / mems[lo_b] - 1
        flat_rows.append({"forward": FORWARD_LABELS[fwd_name], "adjoint": "GMRES",
                          "temp_bytes": {str(b): m for b, m in mems.items()},
                          "growth": growth, "flat": growth is not None and abs(growth) <= 0.10})
        log(f"[flat] implicit, fwd {fwd_name}: temp memory {mems} -> growth "
            f"{'n/a' if growth is None else f'{100 * growth:+.2f}%'}")
    unrolled = [(int(r.name.split()[-2]), r.temp_bytes) for r in step_rows
                if r.group == "unrolled" and r.temp_bytes is not None]
    slope = None
    if len(unrolled) >= 2:
        ks, ms = (np.array(v, float) for v in zip(*unrolled, strict=True))
        slope = float(np.polyfit(ks, ms, 1)[0])
    state_bytes = 4 * cfg.batch * cfg.size * cfg.size * cfg.channels
    if slope is not None:
        log(f"[flat] unrolled: {slope / 2**20:.2f} MiB per step = {slope / state_bytes:.1f} "
            f"state-sized buffers per step")

    # 4. Peers.
    missing = _peers_available() if cfg.peers else {
        "jaxopt": "skipped (--no-peers)", "optimistix": "skipped (--no-peers)"}
    if missing["jaxopt"] is None:
        for kind, label in (("iteration", "FixedPointIteration"),
                            ("anderson", f"AndersonAcceleration(history_size={ANDERSON_HISTORY})")):
            step_rows.append(run_row(
                StepRow("jaxopt", f"jaxopt {label}, implicit_diff", label,
                        "implicit_diff (normal CG)"),
                jaxopt_solve(kind, fwd_tol, cfg.max_steps)))
    else:
        log(f"[peers] jaxopt {missing['jaxopt']}")
    if missing["optimistix"] is None:
        step_rows.append(run_row(
            StepRow("optimistix", "optimistix FixedPointIteration + ImplicitAdjoint(GMRES)",
                    "FixedPointIteration", "ImplicitAdjoint(lx.GMRES)"),
            optx_solve(fwd_tol, bwd_tol, cfg.max_steps)))
        dim = cfg.batch * cfg.size * cfg.size * cfg.channels
        dense = 4 * dim * dim
        row = StepRow("optimistix", "optimistix FixedPointIteration + default ImplicitAdjoint",
                      "FixedPointIteration", "ImplicitAdjoint() (AutoLinearSolver, dense)")
        if dense <= DENSE_LIMIT_BYTES:
            step_rows.append(run_row(row, optx_solve(fwd_tol, None, cfg.max_steps)))
        else:
            row.note = (f"skipped: the default adjoint materialises a dense {dim}x{dim} "
                        f"Jacobian ({dense / 2**30:.0f} GiB)")
            step_rows.append(row)
            log(f"[peers] {row.name}: {row.note}")
    else:
        log(f"[peers] optimistix {missing['optimistix']}")

    # Time every step, round-robin.
    log(f"timing {len(timed)} steps, {cfg.repeats} interleaved rounds ...")
    times = time_interleaved([(fn, a) for _, fn, a in timed], cfg.repeats)
    for (row, _, _), ts in zip(timed, times, strict=True):
        row.time_ms = 1e3 * statistics.median(ts)
        row.times_ms = [1e3 * t for t in ts]
        log(f"[time] {row.name:<58} {row.time_ms:9.1f} ms")

    # 5. Ratios.
    ratios = compute_ratios(step_rows)
    result = {
        "machine": machine,
        "config": dataclasses.asdict(cfg),
        "calibration": {"scale": scale, "target_steps": TARGET_STEPS},
        "tolerance": {"rtol": RTOL, "peer_forward_atol": fwd_tol, "peer_backward_atol": bwd_tol},
        "forward": forward_rows,
        "steps": [dataclasses.asdict(r) for r in step_rows],
        "flatness": {"implicit": flat_rows, "unrolled_slope_bytes_per_step": slope,
                     "state_bytes": state_bytes},
        "ratios": ratios,
        "peers_missing": {k: v for k, v in missing.items() if v is not None},
        "wall_s": time.perf_counter() - t_start,
        "load_average_at_end": _loadavg(),
        "note": cfg.note,
    }
    return result


def compute_ratios(rows: list[StepRow]) -> dict:
    """Speed of deq's implicit steps vs the peers' implicit steps; memory vs unrolled."""
    ok = [r for r in rows if r.time_ms is not None]
    implicit = [r for r in ok if r.group == "deq" and r.backward.startswith("ImplicitAdjoint")]
    peers = [r for r in ok if r.group in ("jaxopt", "optimistix")]
    unrolled = {int(r.name.split()[-2]): r for r in ok if r.group == "unrolled"}
    out: dict[str, Any] = {"speed": [], "memory": []}
    best_peer = min(peers, key=lambda r: r.time_ms) if peers else None
    for r in implicit:
        entry = {"name": r.name, "time_ms": r.time_ms}
        if best_peer is not None:
            entry["fastest_peer"] = best_peer.name
            entry["speedup_vs_fastest_peer"] = best_peer.time_ms / r.time_ms
        for g in ("jaxopt", "optimistix"):
            pg = [p for p in peers if p.group == g]
            if pg:
                entry[f"speedup_vs_{g}"] = min(p.time_ms for p in pg) / r.time_ms
        out["speed"].append(entry)
        mem = {"name": r.name, "temp_bytes": r.temp_bytes}
        for k in (32, 64):
            u = unrolled.get(k)
            if u is not None and u.temp_bytes and r.temp_bytes is not None:
                mem[f"vs_unrolled_{k}"] = r.temp_bytes / u.temp_bytes
        out["memory"].append(mem)
    if implicit:
        fastest = min(implicit, key=lambda r: r.time_ms)
        out["fastest_deq_implicit"] = fastest.name
        if best_peer is not None:
            out["headline_speedup"] = best_peer.time_ms / fastest.time_ms
            out["target_2x_met"] = out["headline_speedup"] >= 2.0
    return out


# --------------------------------------------------------------------------------------------
# Reports


CONV_VJP_NOTE = (
    " (the cell's convs carry a custom VJP with an explicit HWIO kernel for the input "
    "cotangent: same gradient, avoids XLA:CPU's slow transposed conv inside loops; applies to "
    "every library alike)"
)


def _mib(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**10:.1f} KiB" if abs(b) < 2**20 else f"{b / 2**20:.1f} MiB"


def _ms(t) -> str:
    return "-" if t is None else f"{t:.1f} ms"


def to_markdown(res: dict) -> str:
    m, c = res["machine"], res["config"]
    lines = [
        "# deq core benchmark: conv DEQ cell",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; device {m['device_kind']} "
        f"({m['platform']}); jax {m['jax']}, jaxlib {m['jaxlib']}, deq {m['deq']}, "
        f"jaxopt {m['jaxopt']}, optimistix {m['optimistix']}, lineax {m['lineax']}; "
        f"{m['date']}, commit {m.get('git_commit')}.",
        "",
        f"Cell `z -> tanh(conv3x3(relu(conv3x3(z))) + conv3x3(x))`, batch {c['batch']}, "
        f"{c['channels']} channels, {c['size']}x{c['size']} images (NHWC), float32, matmul "
        f"precision '{PRECISION}', conv VJP '{c.get('conv_vjp', 'jax')}'"
        f"{CONV_VJP_NOTE if c.get('conv_vjp') == 'hwio' else ''}. Recurrent kernel scale "
        f"{res['calibration']['scale']:.4f} "
        f"(calibrated to {res['calibration']['target_steps']} plain-iteration steps). Relative "
        f"tolerance {RTOL:g} per sample (deq); peers: absolute L2 tolerances "
        f"{res['tolerance']['peer_forward_atol']:.3e} (forward) and "
        f"{res['tolerance']['peer_backward_atol']:.3e} (backward) = {RTOL:g} x the batch norm. "
        f"Forward budget {c['max_steps']} steps. Times: median of {c['repeats']} jitted calls "
        f"after one warm-up, all methods timed round-robin; memory: XLA's compiled temporary "
        f"buffers. Load average (1, 5, 15 min) at start {m.get('load_average_at_start')}, "
        f"at end {res.get('load_average_at_end')} ({m['cores']} cores).",
        "",
    ]
    if res.get("note"):
        lines += [f"Note: {res['note']}", ""]
    lines += [
        "## 1. Forward solvers: steps to tolerance on the same batch",
        "",
        "| solver | steps | steps / iteration | final rel. residual | result | forward time |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["forward"]:
        lines.append(f"| {r['solver']} | {r['steps']} | {r['ratio_vs_iteration']:.2f} | "
                     f"{r['rel_residual']:.2e} | {r['result']} | {_ms(r['time_ms'])} |")
    fw = {r["key"]: r for r in res["forward"]}
    verdicts = []
    for k in ("anderson", "broyden"):
        r = fw[k]["ratio_vs_iteration"]
        verdicts.append(f"{k} {r:.2f} ({'met' if r <= 0.6 else 'NOT met'})")
    lines += ["", "Target steps / iteration <= 0.6: " + ", ".join(verdicts) + "."]
    lines += [
        "",
        "## 2 and 4. One training step (MSE loss of z*, gradient w.r.t. all parameters)",
        "",
        "`grad diff`: relative L2 distance of the gradient to a tight exact-IFT reference "
        "(Anderson forward at 1e-6, GMRES adjoint at 1e-6).",
        "",
        "| method | forward | backward | step time | compiled temp memory | forward steps | "
        "adjoint steps | grad diff | compile | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def opt(v, fmt="{}"):
        return "-" if v is None else fmt.format(v)

    for r in res["steps"]:
        lines.append(
            f"| {r['name']} | {r['forward']} | {r['backward']} | {_ms(r['time_ms'])} | "
            f"{_mib(r['temp_bytes'])} | {opt(r['fwd_steps'])} | {opt(r['bwd_steps'])} | "
            f"{opt(r['grad_rel_diff'], '{:.1e}')} | {opt(r['compile_s'], '{:.1f} s')} | "
            f"{r['note']} |")
    for k, v in res["peers_missing"].items():
        lines.append(f"\n{k}: {v}")
    fl = res["flatness"]
    budgets = " | ".join(f"temp memory, forward budget {b}" for b in FLAT_STEPS)
    lines += ["", "## 3. Memory flatness", "",
              f"| implicit step (GMRES adjoint) | {budgets} | growth | within 10% |",
              "|---" * (len(FLAT_STEPS) + 3) + "|"]
    for r in fl["implicit"]:
        g = "-" if r["growth"] is None else f"{100 * r['growth']:+.2f}%"
        lines.append(f"| fwd {r['forward']} | " + " | ".join(
            _mib(r["temp_bytes"][str(b)]) for b in FLAT_STEPS) + f" | {g} | "
            f"{'yes' if r['flat'] else 'NO'} |")
    if fl["unrolled_slope_bytes_per_step"] is not None:
        s = fl["unrolled_slope_bytes_per_step"]
        lines += ["", f"Unrolled backprop grows linearly: {_mib(s)} per step (least-squares fit "
                  f"over {', '.join(str(k) for k in c['unroll_steps'])} steps), "
                  f"{s / fl['state_bytes']:.1f} state-sized buffers per step."]
    ra = res["ratios"]
    lines += ["", "## 5. Ratios", "",
              "| deq implicit step | time | speed-up vs fastest peer | vs jaxopt | vs optimistix "
              "| memory / unrolled 32 | memory / unrolled 64 |",
              "|---|---|---|---|---|---|---|"]
    mem = {e["name"]: e for e in ra["memory"]}

    def fx(d, k):
        return "-" if d.get(k) is None else f"{d[k]:.2f}x"

    def fr(d, k):
        return "-" if d.get(k) is None else f"{d[k]:.3f}"

    for e in ra["speed"]:
        mm = mem.get(e["name"], {})
        lines.append(f"| {e['name']} | {_ms(e['time_ms'])} | {fx(e, 'speedup_vs_fastest_peer')} | "
                     f"{fx(e, 'speedup_vs_jaxopt')} | {fx(e, 'speedup_vs_optimistix')} | "
                     f"{fr(mm, 'vs_unrolled_32')} | {fr(mm, 'vs_unrolled_64')} |")
    if "headline_speedup" in ra:
        lines += ["", f"Fastest deq implicit step ({ra['fastest_deq_implicit']}) vs the fastest "
                  f"peer implicit step: {ra['headline_speedup']:.2f}x "
                  f"(target >= 2x: {'met' if ra['target_2x_met'] else 'NOT met'})."]
    lines += ["", f"Total benchmark wall time {res['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def save(res: dict, out: Path) -> tuple[Path, Path]:
    """Write ``bench_core_<platform>_b<batch>_c<channels>_s<size>.{md,json}`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    c = res["config"]
    stem = f"bench_core_{res['machine']['platform']}_b{c['batch']}_c{c['channels']}_s{c['size']}"
    if c.get("conv_vjp", "jax") != "jax":
        stem += f"_{c['conv_vjp']}"
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(to_markdown(res))
    js.write_text(json.dumps(res, indent=1, default=str))
    return md, js


def parse_args(argv=None) -> tuple[Config, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {d.batch})")
    p.add_argument("--channels", type=int, default=None, help=f"channels (default {d.channels})")
    p.add_argument("--size", type=int, default=None, help=f"image side (default {d.size})")
    p.add_argument("--repeats", type=int, default=None, help=f"timed calls (default {d.repeats})")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"forward step budget (default {d.max_steps})")
    p.add_argument("--scale", type=float, default=None,
                   help="recurrent kernel scale (default: calibrate to ~30 iteration steps)")
    p.add_argument("--unroll", type=int, nargs="+", default=None,
                   help=f"unrolled depths (default {' '.join(map(str, d.unroll_steps))})")
    p.add_argument("--no-peers", action="store_true", help="skip jaxopt and optimistix")
    p.add_argument("--conv-vjp", choices=CONV_VJP_MODES, default=None,
                   help="how the cell's convs are differentiated (default jax; hwio avoids a "
                        "slow XLA:CPU path, see conv_vjp_mode)")
    p.add_argument("--note", default=None, help="free text saved with the results")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke configuration (batch 2, 4 channels, 8x8, 2 repeats)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/bench_core"),
                   help="output directory (default experiments/results/bench_core)")
    a = p.parse_args(argv)
    cfg = QUICK if a.quick else d
    overrides = {
        "batch": a.batch, "channels": a.channels, "size": a.size, "repeats": a.repeats,
        "max_steps": a.max_steps, "scale": a.scale,
        "unroll_steps": None if a.unroll is None else tuple(a.unroll), "note": a.note,
        "conv_vjp": a.conv_vjp,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if a.no_peers:
        cfg = dataclasses.replace(cfg, peers=False)
    return cfg, a.out


def main(argv=None) -> dict:
    cfg, out = parse_args(argv)
    res = run_benchmark(cfg)
    md, js = save(res, out)
    print(f"\nwrote {md} and {js}")
    return res


if __name__ == "__main__":
    main()

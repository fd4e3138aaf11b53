"""The README's results block, generated from the result files under ``experiments/results``
(never hand-copied): one line per result set or benchmark, each naming its machine and commit,
and whether the code changed since."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from experiments.provenance import RESULTS, ROOT, machine_name, stale_sets
from experiments.seeds import (
    SOLVER_RTOL,
    STEPS_GRID,
    TITLES,
    _budget_sentence,
    _equilibrium,
    _pct,
    _points,
    _seeds,
)

README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _prov_line(prov: dict | None, stale: str | None, rerun: str) -> str:
    if prov is None:
        return f"from an earlier version of the code, without provenance: rerun `{rerun}`"
    where = (f"{machine_name(prov['machine'])}, jax {prov.get('jax')}, commit "
             f"{prov['git_commit'][:10]}")
    return f"{where}; stale, {stale}: rerun `{prov['command']}`" if stale else where


def _verdict(d: dict) -> str:
    """What the paired accuracy difference shows, given its spread over seeds."""
    if d["n"] < 2:
        return "One seed: no spread, so no accuracy difference can be read from it."
    se = d["std"] / np.sqrt(d["n"])
    if abs(d["mean"]) <= 2 * se:
        return (f"The difference is within two standard errors (s.e. {100 * se:.2f} points) of "
                f"zero: at {d['n']} seeds the two networks' accuracies are not told apart.")
    side = "ahead of" if d["mean"] > 0 else "behind"
    return (f"The DEQ is {side} its unrolled baseline by more than two standard errors "
            f"(s.e. {100 * se:.2f} points) over {d['n']} seeds.")


def _seeds_lines(name: str, title: str, results: Path, stale: dict) -> list[str]:
    seeds = results / name / "seeds.json"
    if not seeds.exists():
        return []
    table = json.loads(seeds.read_text())
    prov_path = results / name / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.exists() else None
    agg, d = table["aggregate"], table["aggregate"]["paired_difference"]
    where = _prov_line(prov, stale.get(name), f"python -m experiments.reproduce {name}")
    lines = [
        f"- **{title}**, {_seeds(agg['deq']['test_accuracy']['n'])} each "
        f"([tables and plots](experiments/results/{name}/); {where}):"
        f" test accuracy DEQ {_pct(agg['deq']['test_accuracy'])}, unrolled "
        f"{_pct(agg['unrolled']['test_accuracy'])}; paired difference DEQ - unrolled "
        f"{_points(d)} points; train-step memory "
        f"{agg['memory_ratio']:.2f}x of the unrolled network's; train step "
        f"{1e3 * agg['deq']['median_step_time']['mean']:.1f} ms vs "
        f"{1e3 * agg['unrolled']['median_step_time']['mean']:.1f} ms. {_verdict(d)}"
    ]
    if all(r.get("test_samples") is not None for r in table["runs"]["deq"]):
        lines.append(f"  DEQ test samples at equilibrium (relative residual <= 1e-3, all seeds): "
                     f"{_equilibrium(table['runs']['deq'])}."
                     + (f" {_budget_sentence(table['budget'])}" if table.get("budget") else ""))
    extra = []  # what the set measured beyond the comparison, in one paragraph
    curves = results / name / "compute_accuracy.json"
    if curves.exists():
        c = json.loads(curves.read_text())
        acc = {m: {k: 100 * np.mean([seed[i]["accuracy"] for seed in c[m]])
                   for i, k in enumerate(STEPS_GRID)} for m in c}
        extra.append(
            "Test-time compute (mean over seeds, accuracy at 4 / 12 / 50 forward steps): DEQ "
            + " / ".join(f"{acc['deq'][k]:.1f}%" for k in (4, 12, 50)) + ", unrolled "
            + " / ".join(f"{acc['unrolled'][k]:.1f}%" for k in (4, 12, 50)) + "."
        )
    solvers = results / name / "solvers.json"
    if solvers.exists():
        sv = json.loads(solvers.read_text())
        ratio = {k: np.mean([s[k]["vs_iteration"] for s in sv]) for k in sv[0]}
        mean = {k: np.mean([s[k]["mean_steps"] for s in sv]) for k in sv[0]}
        extra.append(
            f"Forward solvers on the trained cell (steps to a relative residual of "
            f"{SOLVER_RTOL:g}): plain iteration {mean['FixedPointIteration']:.1f}, Anderson "
            f"{mean['Anderson']:.1f} ({ratio['Anderson']:.2f}x), Broyden {mean['Broyden']:.1f} "
            f"({ratio['Broyden']:.2f}x)."
        )
    if extra:
        lines.append("  " + " ".join(extra))
    return lines


def _implicit_rows(res: dict) -> dict:
    return {r["name"]: r for r in res["steps"]
            if r.get("time_ms") is not None and r["group"] == "deq" and r.get("implicit")}


def _before_after(path: Path, res: dict) -> str:
    """How the implicit steps compare with the previous library's, where that run exists."""
    before = path.parent.parent / "bench_core_before" / path.name
    if not before.exists():
        return ""
    old, new = _implicit_rows(json.loads(before.read_text())), _implicit_rows(res)
    common = [k for k in new if k in old and old[k]["temp_bytes"]]
    if not common:
        return ""
    t = [new[k]["time_ms"] / old[k]["time_ms"] for k in common]
    m = [new[k]["temp_bytes"] / old[k]["temp_bytes"] for k in common]
    commit = json.loads(before.read_text())["provenance"]["git_commit"][:7]
    return (f"; against the library before forward-mode support (commit {commit}, same machine, "
            f"[table](experiments/results/{before.relative_to(RESULTS)}".replace(".json", ".md")
            + f")) its {len(common)} implicit steps take {min(t):.2f}x to {max(t):.2f}x the time "
            f"and {min(m):.2f}x to {max(m):.2f}x the memory")


def _bench_core_lines(results: Path, stale: dict) -> list[str]:
    lines = []
    for path in sorted([*results.glob("bench_core/bench_core_*.json"),
                        *results.glob("gpu/bench_core/bench_core_*.json")]):
        res = json.loads(path.read_text())
        if "provenance" not in res:
            continue
        c = res["config"]
        steps = [r for r in res["steps"] if r.get("time_ms") is not None]
        best = min(_implicit_rows(res).values(), key=lambda r: r["time_ms"])
        peers = {g: min((r["time_ms"] for r in steps if r["group"] == g), default=None)
                 for g in ("optimistix", "jaxopt")}
        vs = "".join(f", {t / best['time_ms']:.1f}x faster than {g}"
                     for g, t in peers.items() if t)
        flat = res["flatness"]
        growth = max(abs(r["growth"]) for r in flat["implicit"])
        fw = {r["key"]: r["ratio_vs_iteration"] for r in res["forward"]}
        rel = path.relative_to(results)
        lines.append(
            f"batch {c['batch']}, {c['channels']} channels, "
            f"precision {c['precision']} ([{path.stem}](experiments/results/"
            f"{rel.with_suffix('.md')}); "
            f"{_prov_line(res['provenance'], stale.get(rel.parts[0]), '')}): fastest implicit "
            f"step {best['time_ms']:.0f} ms ({best['name'].removeprefix('deq implicit: ')}){vs}; "
            f"its memory changes by {100 * growth:.1f}% from 10 to 100 forward steps, unrolled "
            f"backprop adds {flat['unrolled_slope_bytes_per_step'] / 2**20:.1f} MiB per step; "
            f"Anderson needs {fw['anderson']:.2f}x and Broyden {fw['broyden']:.2f}x the steps of "
            f"plain iteration on this random-kernel cell{_before_after(path, res)}."
        )
    return ["- **Core benchmark**, a conv cell, per machine: " + " ".join(lines)] if lines else []


def _bench_derivatives_lines(results: Path, stale: dict) -> list[str]:
    lines = []
    for path in sorted([*results.glob("bench_derivatives/bench_derivatives_*.json"),
                        *results.glob("gpu/bench_derivatives/bench_derivatives_*.json")]):
        res = json.loads(path.read_text())
        c, rel = res["config"], path.relative_to(results)
        by = {(r["method"], r["derivative"]): r for r in res["rows"]}
        implicit = next(r["method"] for r in res["rows"] if r["method"].startswith("implicit"))
        unrolled = [m for m in dict.fromkeys(r["method"] for r in res["rows"])
                    if m.startswith("unrolled")][-2:]
        parts = []
        for d, label in (("hvp params", "Hessian-vector product in the parameters"),
                         ("force", "input gradient dL/dx"), ("jvp x", "forward-mode JVP")):
            i = by[(implicit, d)]
            vs = ", ".join(
                f"{by[(u, d)]['time_ms'] / i['time_ms']:.2f}x the time and "
                f"{by[(u, d)]['temp_bytes'] / i['temp_bytes']:.2f}x the memory at "
                f"{u.split(': ')[1].split(' ')[0]} steps (error {by[(u, d)]['rel_error']:.0e})"
                for u in unrolled)
            parts.append(f"{label}: implicit {i['time_ms']:.1f} ms, "
                         f"{i['temp_bytes'] / 2**20:.0f} MiB (error {i['rel_error']:.0e}); "
                         f"unrolled {vs}")
        lines.append(
            f"batch {c['batch']}, {c['channels']} channels ([{path.stem}](experiments/results/"
            f"{rel.with_suffix('.md')}); "
            f"{_prov_line(res['provenance'], stale.get(rel.parts[0]), '')}"
            f"): " + "; ".join(parts) + ".")
    return ["- **Derivatives beyond the gradient**, the core benchmark's cell, errors against a "
            "tight implicit reference, per machine: " + " ".join(lines)] if lines else []


def _bench_eager_lines(results: Path, stale: dict) -> list[str]:
    path = results / "bench_eager" / "results.json"
    if not path.exists():
        return []
    res = json.loads(path.read_text())
    later = {(r["framework"], r["mode"]): r["later_s"] for r in res["rows"]}
    ratio = {fw: later[(fw, "eager")] / next(v for (f, m), v in later.items()
                                            if f == fw and m != "eager")
             for fw in ("nnx", "linen")}
    return [
        f"- **Eager calls** ([table](experiments/results/bench_eager/results.md); "
        f"{_prov_line(res['provenance'], stale.get('bench_eager'), '')}): after the first call, an "
        f"un-jitted DEQ model call takes {ratio['nnx']:.2f}x (NNX) and {ratio['linen']:.2f}x "
        f"(Linen) the time of the jitted call."
    ]


def _bench_own_cell_lines(results: Path, stale: dict) -> list[str]:
    lines = []
    for path in sorted((results / "bench_own_cell").glob("bench_own_cell_steps*.json")):
        res = json.loads(path.read_text())
        if "provenance" not in res:
            continue
        rows = {r["variant"]: r for r in res["rows"]}
        ref = rows["MDEQCell"]["step_ms"]
        own, plain = rows.get("own+recipe"), rows.get("own/plain nnx.Conv")
        if own is None:
            continue
        text = (
            f"- **Your own cell** ({res['meta']['data']}, {res['meta']['steps']} training steps; "
            f"[table](experiments/results/bench_own_cell/{path.name.replace('.json', '.md')}); "
            f"{_prov_line(res['provenance'], stale.get('bench_own_cell'), '')}): with the "
            f"recipe, {own['step_ms'] / ref:.2f}x the step time of `MDEQCell` of the same width, "
            f"{100 * own['train_converged_frac']:.0f}% of training and "
            f"{100 * own['eval_converged_frac']:.0f}% of test solves converged (worst test "
            f"residual {own['eval_res_worst']:.1e})"
        )
        if plain is not None:
            text += (
                f"; written plainly (`nnx.Conv`, no weight norm, no penalty) "
                f"{plain['step_ms'] / ref:.2f}x, {100 * plain['train_converged_frac']:.0f}% / "
                f"{100 * plain['eval_converged_frac']:.0f}% converged"
            )
        lines.append(text + ".")
    return lines


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _flax_row(r: dict, k: int) -> str:
    return (f"{100 * r['eval1x_res_1e3_frac']:.2f}% of test samples at equilibrium (worst "
            f"residual {r['eval1x_res_worst']:.1e}), accuracy {100 * r['eval1x_acc']:.2f}% "
            f"({100 * r[f'eval{k}x_acc']:.2f}% with {k}x the eval budget, "
            f"{r['pred_changed']} predictions changed), {r['eval1x_fwd_steps_mean']:.1f} forward "
            f"steps at evaluation, training solves unconverged: {r['train_unconverged']} of "
            f"{r['train_steps']}" + (f" forward, {r['train_bwd_unconverged']} backward"
                                     if r.get("train_bwd_unconverged") is not None else ""))


def _bench_flax_example_lines(results: Path, stale: dict) -> list[str]:
    res = _load(results / "bench_flax_example" / "bench_flax_example.json")
    if res is None:
        return []
    k, rows = res["meta"]["eval_budget_mult"], {r["variant"]: r for r in res["rows"]}
    plain = rows.get("plain", {}).get("step_ms")
    vs = lambda r: f", step {r['step_ms'] / plain:.2f}x the plain CNN's" if plain else ""  # noqa
    parts = [f"{name}: {_flax_row(rows[key], k)}{vs(rows[key])}"
             for key, name in (("nnx", "NNX"), ("linen", "Linen")) if key in rows]
    if "own" in rows and "nnx" in rows:
        parts.append(f"the README's own cell in its place: step "
                     f"{rows['own']['step_ms'] / rows['nnx']['step_ms']:.2f}x the package "
                     f"cell's, {_flax_row(rows['own'], k)}")
    off = _load(results / "bench_flax_example_nostab" / "bench_flax_example.json")
    if off is not None:
        r = off["rows"][0]
        parts.append(f"without the stabiliser (NNX, `jac_reg_samples=0`): {_flax_row(r, k)}, "
                     f"step {r['step_ms']:.0f} ms against {rows['nnx']['step_ms']:.0f} ms")
    m = res["meta"]
    return [f"- **A DEQ dropped into the Flax NNX MNIST example** "
            f"(`deq.nnx.DEQ(MDEQCell(32, 32, num_groups=4))`, nothing else set; SGD 0.1, "
            f"momentum 0.9, batch {m['batch']}, {m['steps']} steps, {m['eval_images_used']} test "
            f"images; [table](experiments/results/bench_flax_example/bench_flax_example.md); "
            f"{_prov_line(res['provenance'], stale.get('bench_flax_example'), '')}): "
            + "; ".join(parts) + "."]


def _bench_stabiliser_lines(results: Path, stale: dict) -> list[str]:
    res = _load(results / "bench_stabiliser" / "bench_stabiliser.json")
    prov = _load(results / "bench_stabiliser" / "provenance.json")
    if res is None or prov is None:
        return []
    parts = []
    targets = {r["config"]: r["jac_target"] for r in res["rows"] if r.get("jac_target")}
    for a in res["aggregate"]:
        d = a["accuracy_difference"]
        target = f" (`reg.jac_target` {targets[a['config']]})" if a["config"] in targets else ""
        parts.append(
            f"{a['config']}{target}: {a['eval_steps_ratio']:.2f}x fewer forward steps at "
            f"evaluation ({a['with']['test_fwd_steps']['mean']:.1f} against "
            f"{a['without']['test_fwd_steps']['mean']:.1f}), accuracy "
            f"{100 * d['mean']:+.2f} +- {100 * d['std']:.2f} points, training step "
            f"{a['step_time_ratio']:.2f}x, training forward solves unconverged "
            f"{100 * a['with']['train_unconverged']['mean']:.1f}% against "
            f"{100 * a['without']['train_unconverged']['mean']:.1f}%, test samples at "
            f"equilibrium {100 * a['with']['at_equilibrium']['mean']:.2f}% against "
            f"{100 * a['without']['at_equilibrium']['mean']:.2f}%")
    return [f"- **What the stabiliser buys** (MNIST, {res['meta']['steps']} steps, "
            f"{res['meta']['seeds']} seeds, with against without; "
            f"[table](experiments/results/bench_stabiliser/bench_stabiliser.md); "
            f"{_prov_line(prov, stale.get('bench_stabiliser'), '')}): " + "; ".join(parts) + "."]


def _bench_distributed_lines(results: Path, stale: dict) -> list[str]:
    res = _load(results / "bench_distributed" / "bench_distributed.json")
    prov = _load(results / "bench_distributed" / "provenance.json")
    if res is None or prov is None:
        return []
    before = _load(results / "bench_distributed" / "before" / "bench_distributed.json")

    def ratios(rows, variant):
        base = {r["config"]: r["median_step_time"] for r in rows if r["variant"] == VARIANT_1}
        return ", ".join(
            f"{r['config'].split('_')[-1]} {r['median_step_time'] / base[r['config']]:.2f}x"
            for r in rows if r["variant"] == variant)

    parts = []
    for variant in ("2 processes", "8 CPU devices"):
        text = f"{variant}: {ratios(res['rows'], variant)}"
        if before is not None:
            text += (f" (before per-device steps, commit {before['meta']['commit'][:7]}: "
                     f"{ratios(before['rows'], variant)})")
        parts.append(text)
    same = all(len({round(r["test_accuracy"], 6) for r in res["rows"] if r["config"] == c}) == 1
               for c in {r["config"] for r in res["rows"]})
    return [f"- **Data parallelism on one machine** (digits, {res['meta']['epochs']} epochs of "
            f"batch 64, the training step against one process; "
            f"[table](experiments/results/bench_distributed/bench_distributed.md); "
            f"{_prov_line(prov, stale.get('bench_distributed'), '')}): " + "; ".join(parts)
            + (". Test accuracy identical in every variant." if same else ".")]


VARIANT_1 = "1 process"


def readme_block(results: Path = RESULTS) -> str:
    """The README's results summary, generated from the result files (never hand-copied)."""
    stale = stale_sets(results)
    parts = [
        *(line for name, title in TITLES.items()
          for line in _seeds_lines(name, title, results, stale)),
        *_bench_flax_example_lines(results, stale),
        *_bench_stabiliser_lines(results, stale),
        *_bench_distributed_lines(results, stale),
        *_bench_core_lines(results, stale),
        *_bench_derivatives_lines(results, stale),
        *_bench_eager_lines(results, stale),
        *_bench_own_cell_lines(results, stale),
    ]
    return "\n".join([BEGIN, *parts, END])


def update_readme(path: Path = README) -> bool:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block.")
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: readme_block(), text,
                 flags=re.S)
    path.write_text(new)
    return new != text

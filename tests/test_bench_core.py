"""Tests of experiments/bench_core.py at tiny sizes; no timing assertions.

The end-to-end ``--quick`` run compiles ~25 small step functions (1-2 min on 2 cores), so it is
marked slow.
"""

import json
import re

import jax
import jax.numpy as jnp
import pytest

from experiments import bench_core as bc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return bc.main(["--quick", "--size", "6", "--repeats", "1", "--out", str(out)]), out


def test_calibrated_cell_needs_about_30_iteration_steps():
    p = bc.make_problem(batch=2, channels=4, size=6)
    scale, steps = bc.calibrate_scale(p, max_steps=100)
    assert 25 <= steps <= 35
    p = p.rescale(scale)
    assert p.cell(jnp.zeros((2, 6, 6, 4)), p.split(p.params, p.x)).shape == (2, 6, 6, 4)


@pytest.mark.slow
def test_quick_run_writes_markdown_json_and_provenance(quick_run):
    res, out = quick_run
    backend = jax.default_backend()
    stem = out / f"bench_core_{backend}_b2_c4_s6_jax_highest"
    md = stem.with_suffix(".md").read_text()
    data = json.loads(stem.with_suffix(".json").read_text())
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["git_commit"] and prov["machine"]["backend"] == backend
    for heading in ("## 1. Forward solvers", "## 2 and 4. One training step",
                    "## 3. Memory flatness", "## 5. Ratios"):
        assert heading in md
    assert prov["machine"]["cpu"] in md and "precision 'highest'" in md
    assert not re.search(r"\bmet\b|target [<>]", md, re.I)  # the README states the targets

    # 1. Every forward solver converged; steps relative to plain iteration.
    solvers = {r["key"]: r for r in data["forward"]}
    assert set(solvers) == {"iteration", "damped", "anderson", "broyden"}
    for r in solvers.values():
        assert r["result"] == "successful" and r["solver"] in md
        assert r["rel_residual"] <= bc.RTOL and r["time_ms"] > 0
    assert solvers["iteration"]["ratio_vs_iteration"] == 1.0

    # 2. Every deq adjoint and unrolled depth has a timed row with memory.
    rows = {r["name"]: r for r in data["steps"]}
    implicit = [f"deq implicit: fwd {f}, adjoint {a}" for f in ("iteration", "anderson")
                for a in ("iteration", "anderson", "gmres")]
    unrolled = [f"deq unrolled: {k} steps" for k in bc.QUICK["unroll"]]
    for name in [*implicit, "deq phantom: fwd iteration", "deq JFB: fwd iteration", *unrolled]:
        assert name in md and rows[name]["time_ms"] > 0 and rows[name]["temp_bytes"] > 0
    for name in implicit:  # exact gradients, adjoint statistics recorded
        assert rows[name]["bwd_converged"] and rows[name]["bwd_steps"] > 0
        assert rows[name]["grad_rel_diff"] < 1e-2
    assert [rows[n]["depth"] for n in unrolled] == list(bc.QUICK["unroll"])

    # 3. Memory of the implicit step at each forward budget; unrolled's slope.
    for r in data["flatness"]["implicit"]:
        assert len(r["temp_bytes"]) == len(bc.FLAT_BUDGETS) and r["growth"] is not None
    assert data["flatness"]["unrolled_slope_bytes_per_step"] > 0

    # 4. Peers: measured rows, or a note saying why not.
    for group in ("jaxopt", "optimistix"):
        peer_rows = [r for r in data["steps"] if r["group"] == group]
        assert bool(peer_rows) != (group in data["peers_missing"])
        assert all(r["time_ms"] or r["note"] for r in peer_rows)

    # 5. Ratios for every deq implicit row.
    assert [e["name"] for e in data["ratios"]] == implicit


def test_options():
    a = bc.parse_args(["--quick", "--no-peers", "--batch", "3", "--conv-vjp", "hwio",
                       "--precision", "default"])
    assert (a.batch, a.channels, a.conv_vjp, a.precision) == (3, 4, "hwio", "default")
    assert all(a.missing.values())
    assert bc.parse_args([]).batch == bc.DEFAULTS["batch"]
    with pytest.raises(SystemExit):
        bc.parse_args(["--conv-vjp", "fast"])


@pytest.mark.parametrize("k", [1, 3, 5])
def test_hwio_conv_vjp_matches_jax(k):
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 6, 5, 3))
    w = jax.random.normal(kw, (k, k, 3, 4))
    g = jax.random.normal(kg, (2, 6, 5, 4))
    with jax.default_matmul_precision("highest"):
        ref = jax.vjp(bc.CONVS["jax"], x, w)[1](g)
        got = jax.vjp(bc.CONVS["hwio"], x, w)[1](g)
    for a, b in zip(got, ref, strict=True):
        assert jnp.allclose(a, b, rtol=1e-5, atol=1e-5)

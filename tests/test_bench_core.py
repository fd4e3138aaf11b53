"""Smoke test of experiments/bench_core.py: the --quick path end to end at a tiny size.

No timing assertions: only that every section is measured and written out. The end-to-end
run compiles ~25 small step functions (30-90 s on 2 cores), so it is marked slow.
"""

import json

import jax.numpy as jnp
import pytest

from experiments import bench_core as bc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = bc.main(["--quick", "--size", "6", "--repeats", "1", "--out", str(out)])
    return res, out


def test_cell_is_a_contraction_at_the_calibrated_scale():
    cfg = bc.Config(batch=2, channels=4, size=6)
    problem = bc.make_problem(cfg)
    scale, steps = bc.calibrate_scale(problem, max_steps=100)
    assert 25 <= steps <= 35
    z = jnp.zeros((2, 6, 6, 4))
    params = bc.rescale(problem.params, scale)
    fz = bc.cell(z, bc.cell_params(params), bc.inject(params, problem.x))
    assert fz.shape == z.shape


@pytest.mark.slow
def test_quick_run_writes_markdown_and_json(quick_run):
    res, out = quick_run
    mds, jss = sorted(out.glob("bench_core_*.md")), sorted(out.glob("bench_core_*.json"))
    assert len(mds) == 1 and len(jss) == 1
    md = mds[0].read_text()
    data = json.loads(jss[0].read_text())
    for heading in ("## 1. Forward solvers", "## 2 and 4. One training step",
                    "## 3. Memory flatness", "## 5. Ratios"):
        assert heading in md
    # The machine is named.
    for key in ("cpu", "cores", "device_kind", "jax"):
        assert data["machine"][key] is not None
    assert data["machine"]["cpu"] in md

    # 1. every forward solver converged, with a steps ratio.
    solvers = {r["key"]: r for r in data["forward"]}
    assert set(solvers) == {"iteration", "damped", "anderson", "broyden"}
    for r in solvers.values():
        assert r["result"] == "successful" and r["solver"] in md
        assert r["rel_residual"] <= bc.RTOL
    assert solvers["iteration"]["ratio_vs_iteration"] == 1.0

    # 2. every deq adjoint and every unrolled depth has a timed row with memory.
    rows = {r["name"]: r for r in data["steps"]}
    expected = [f"deq implicit: fwd {f}, adjoint {a}" for f in ("iteration", "anderson")
                for a in ("iteration", "anderson", "gmres")]
    expected += ["deq phantom: fwd iteration", "deq JFB: fwd iteration"]
    expected += [f"deq unrolled: {k} steps" for k in bc.QUICK.unroll_steps]
    for name in expected:
        assert name in rows and name in md
        assert rows[name]["time_ms"] is not None and rows[name]["time_ms"] > 0
        assert rows[name]["temp_bytes"] is not None
    for name in expected[:6]:  # implicit rows: exact gradients, adjoint stats recorded
        assert rows[name]["bwd_converged"] and rows[name]["bwd_steps"] > 0
        assert rows[name]["grad_rel_diff"] < 1e-2

    # 3. flatness of the implicit step's memory in the forward budget.
    for r in data["flatness"]["implicit"]:
        assert set(r["temp_bytes"]) == {str(b) for b in bc.FLAT_STEPS}
    assert data["flatness"]["unrolled_slope_bytes_per_step"] is not None

    # 4. peers: measured rows, or a note saying why not.
    for group, missing_key in (("jaxopt", "jaxopt"), ("optimistix", "optimistix")):
        peer_rows = [r for r in data["steps"] if r["group"] == group]
        if missing_key in data["peers_missing"]:
            assert not peer_rows
        else:
            assert peer_rows and all(r["time_ms"] is not None for r in peer_rows)

    # 5. ratios for every deq implicit row.
    assert len(data["ratios"]["speed"]) == 6
    assert "## 5. Ratios" in md


def test_peers_can_be_skipped(tmp_path):
    cfg, _ = bc.parse_args(["--quick", "--no-peers", "--out", str(tmp_path)])
    assert not cfg.peers and cfg.batch == bc.QUICK.batch


@pytest.mark.parametrize("k", [1, 3, 5])
def test_hwio_conv_vjp_matches_jax(k):
    import jax

    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 6, 5, 3))
    w = jax.random.normal(kw, (k, k, 3, 4))
    g = jax.random.normal(kg, (2, 6, 5, 4))
    with jax.default_matmul_precision("highest"):
        ref = jax.vjp(lambda x, w: bc.conv(x, w, 0.0), x, w)[1](g)
        with bc.conv_vjp_mode("hwio"):
            got = jax.vjp(lambda x, w: bc.conv(x, w, 0.0), x, w)[1](g)
    for a, b in zip(got, ref, strict=True):
        assert jnp.allclose(a, b, rtol=1e-5, atol=1e-5)

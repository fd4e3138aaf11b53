"""experiments/bench_flax_example.py end to end at toy size: the three variants train a few steps
on the sklearn digits (MNIST is not read), evaluate at 1x and 2x the eval budget, and write
their table, JSON and provenance with finite numbers. Compiled with XLA's optimisations mostly
off (the compilations are most of its time: about 25 s instead of 35 s on 2 cores)."""

import json
import math

import jax
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("optax")


@pytest.fixture
def quick_compile():
    """Fewer XLA optimisations while the test compiles (restored afterwards)."""
    flag = "jax_disable_most_optimizations"
    before = jax.config.read(flag)
    jax.config.update(flag, True)
    yield
    jax.config.update(flag, before)


@pytest.mark.slow
def test_bench_flax_example_writes_finite_rows(tmp_path, quick_compile):
    from experiments import bench_flax_example

    bench_flax_example.main([
        "--steps", "3", "--batch", "16", "--eval-images", "32", "--eval-batch", "32",
        "--eval-budget-mult", "2", "--variants", "nnx,linen,plain,own", "--data_dir", "",
        "--out", str(tmp_path),
    ])
    result = json.loads((tmp_path / "bench_flax_example.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"nnx", "linen", "plain", "own"}
    assert "sklearn digits" in result["meta"]["data"]
    for name, r in rows.items():
        numbers = {k: v for k, v in r.items() if isinstance(v, (int, float))}
        assert all(math.isfinite(v) for v in numbers.values()), (name, numbers)
        assert r["step_ms"] > 0 and r["train_steps"] == 3
        fractions = [v for k, v in r.items() if k.endswith(("_frac", "_acc", "fraction_mean"))
                     and v is not None]
        assert all(0.0 <= v <= 1.0 for v in fractions), (name, fractions)
        if name == "plain":
            assert "eval1x_res_worst" not in r
            continue
        assert {"eval1x_res_worst", "eval2x_res_worst", "pred_changed"} <= set(r)
        assert 0 <= r["train_unconverged"] <= 3 and r["train_fwd_steps_mean"] > 0
        assert 0 <= r["pred_changed"] <= 32 and r["eval2x_fwd_steps_mean"] > 0
    md = (tmp_path / "bench_flax_example.md").read_text()
    assert "Machine:" in md and "commit" in md and "| linen |" in md
    assert json.loads((tmp_path / "provenance.json").read_text())["git_commit"]


def test_backward_failures_are_recognised():
    """The benchmark counts failed backward solves by the implicit adjoint's warning text: a
    solve that cannot converge (one adjoint step) must produce a warning it recognises."""
    import warnings

    import jax.numpy as jnp

    import deq
    from experiments.bench_flax_example import _BACKWARD_WARNING

    adjoint = deq.ImplicitAdjoint(solver=deq.FixedPointIteration(), max_steps=1)

    @jax.jit
    def grad(x):
        def loss(x):
            return deq.fixed_point(lambda z, x: jnp.tanh(0.9 * z + x), jnp.zeros(3), x,
                                   adjoint=adjoint).value.sum()
        return jax.grad(loss)(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        jax.block_until_ready(grad(jnp.ones(3)))
        jax.effects_barrier()
    assert any(_BACKWARD_WARNING in str(w.message) for w in caught)

"""The training experiments end to end: smoke run, resume, configs, sharding, comparison."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import compare, configuration, metrics, steps, train
from experiments.cli import ConfigError, config_fields, get_field, load_config, set_fields

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory, tfds_dir):
    """One finished smoke run of the DEQ and of its unrolled baseline, shared by the tests
    that only read them (or copy them before changing anything)."""
    root = tmp_path_factory.mktemp("smoke_runs")
    train.train_and_evaluate(smoke_config(tfds_dir), root / "smoke")
    unrolled = smoke_config(tfds_dir, **{"mode": "unrolled", "solver.name": "iteration",
                                         "name": "smoke_unrolled"})
    train.train_and_evaluate(unrolled, root / "smoke_unrolled")
    return root


def smoke_config(tfds_dir, **overrides):
    config = load_config(str(ROOT / "configs" / "smoke.py"))
    config.data.tfds_dir = tfds_dir
    set_fields(config, overrides)
    return config


def _assert_trees_equal(a, b, rtol=0.0, atol=0.0):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_smoke_run_end_to_end(smoke_runs):
    tmp_path = smoke_runs / "smoke"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_step"] == summary["total_steps"] == 12
    # Every solve of the run is accounted for: 12 training batches, 2 x 2 evaluation batches.
    assert summary["train_steps"] == 12 and summary["eval_batches"] == 4
    assert summary["skipped_steps"] == 0
    for key in ("train_fwd_unconverged", "train_bwd_unconverged"):
        assert 0 <= summary[key] <= 12
    assert summary["all_solves_converged"] == (
        summary["train_fwd_unconverged"] + summary["train_bwd_unconverged"]
        + summary["eval_fwd_unconverged"] == 0)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["train_step_temp_bytes"] is not None
    records = train.read_metrics(tmp_path)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for key in ("train_loss", "train_fwd_steps", "train_bwd_steps", "train_fwd_rel_residual",
                "test_accuracy", "epoch_time", "train_step_time"):
        assert all(np.isfinite(r[key]) for r in epochs), key
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(2, 13, 2))
    assert json.loads((tmp_path / "summary.json").read_text())["name"] == "smoke"


def test_every_step_is_in_one_train_line(tmp_path, tfds_dir):
    # 6 steps per epoch, a line every 4 steps: steps 5-6 and 11-12 end their epochs, so the
    # epoch ends write the lines of those partial windows.
    config = smoke_config(tfds_dir, **{"train.log_every": 4, "train.checkpoint_every": 1000})
    train.train_and_evaluate(config, tmp_path)
    lines = [r for r in train.read_metrics(tmp_path) if r["kind"] == "train"]
    assert [(r["step"], r["epoch"], r["steps"]) for r in lines] == [
        (4, 0, 4), (6, 0, 2), (8, 1, 2), (12, 1, 4)]
    assert all(np.isfinite(r["loss"]) for r in lines)


def test_deq_learns_the_digits(tmp_path, tfds_dir):
    # Small but real: the loss must fall and accuracy rise well above chance (10%).
    config = smoke_config(tfds_dir, **{"data.limit_train": 0, "data.limit_test": 0,
                                       "model.features": 32, "solver.max_steps": 15,
                                       "adjoint.max_steps": 15, "optim.warmup_steps": 20,
                                       "train.num_epochs": 4, "train.batch_size": 32,
                                       "train.log_every": 20, "train.checkpoint_every": 1000})
    summary = train.train_and_evaluate(config, tmp_path)
    epochs = [r for r in train.read_metrics(tmp_path) if r["kind"] == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert summary["test_accuracy"] > 0.85


def test_resume_after_interruption_gives_the_same_parameters(tmp_path, tfds_dir):
    config = smoke_config(tfds_dir, **{"train.num_epochs": 3, "train.checkpoint_every": 5})
    train.train_and_evaluate(config, tmp_path / "straight")
    # Interrupted at step 7: the checkpoint of step 6 (end of epoch 1) survives, step 7 is
    # lost and recomputed; then interrupted at step 11, mid-epoch 2 (checkpoint at step 10).
    assert train.train_and_evaluate(config, tmp_path / "resumed", stop_after=7) is None
    assert train.load_checkpoint(tmp_path / "resumed")[0] == 6
    assert train.train_and_evaluate(config, tmp_path / "resumed", stop_after=5) is None
    assert train.load_checkpoint(tmp_path / "resumed")[0] == 10
    train.train_and_evaluate(config, tmp_path / "resumed")
    s1, a = train.load_checkpoint(tmp_path / "straight")
    s2, b = train.load_checkpoint(tmp_path / "resumed")
    assert s1 == s2 == 18
    _assert_trees_equal(a, b)
    # Metrics of the resumed run: every step once, no duplicates from the interruptions.
    steps = [r["step"] for r in train.read_metrics(tmp_path / "resumed") if r["kind"] == "train"]
    assert steps == sorted(set(steps)) == list(range(2, 19, 2))
    # The epoch resumed mid-way (epoch 2) averages over all its 6 steps, as the straight run.
    epochs = {name: [r for r in train.read_metrics(tmp_path / name) if r["kind"] == "epoch"]
              for name in ("straight", "resumed")}
    for r1, r2 in zip(epochs["straight"], epochs["resumed"], strict=True):
        assert r2["train_steps"] == 6 and "partial" not in r2
        for key in ("train_loss", "train_accuracy", "train_grad_norm", "train_fwd_steps",
                    "train_bwd_steps", "train_fwd_rel_residual", "train_fwd_unconverged",
                    "train_fwd_steps_max", "test_accuracy"):
            np.testing.assert_allclose(r2[key], r1[key], rtol=1e-12, err_msg=key)


def test_resume_after_kill_9(tmp_path, tfds_dir):
    """A real `kill -9` of the command-line job, then the same command again."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.main", "--config", str(ROOT / "configs/smoke.py"),
           "--workdir", str(workdir), f"--config.data.tfds_dir={tfds_dir}",
           "--config.train.num_epochs=40", "--config.train.checkpoint_every=3"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    ckpt = workdir / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.exists() else []
        if any(int(p.name) >= 9 for p in done):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = train.load_checkpoint(workdir)[0]
    assert killed_at >= 9
    # Resuming must not restart from zero: the first step it runs follows the checkpoint.
    config = smoke_config(tfds_dir, **{"train.num_epochs": 40, "train.checkpoint_every": 3})
    assert train.train_and_evaluate(config, workdir, stop_after=1) is None
    steps = [r["step"] for r in train.read_metrics(workdir) if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] <= killed_at + 1


def test_a_second_run_on_a_workdir_in_use_is_refused_and_ctrl_c_is_one_line(tmp_path, tfds_dir):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.main", "--config", str(ROOT / "configs/smoke.py"),
           "--workdir", str(workdir), f"--config.data.tfds_dir={tfds_dir}",
           "--config.train.num_epochs=400", "--config.train.checkpoint_every=3"]
    env = {k: v for k, v in os.environ.items() if k != "DEQ_TRACEBACK"}
    env["JAX_PLATFORMS"] = "cpu"
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        ckpt = workdir / "checkpoints"
        while time.time() < deadline and first.poll() is None and not (
                ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir())):
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()[-2000:]
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        _short_error(second, 1, f"workdir {workdir} is in use by another run "
                                f"(pid {first.pid})", max_lines=1)
        assert first.poll() is None  # the first run goes on
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if "Warning" not in ln and "callback(" not in ln]
    assert len(lines) == 1 and lines[0].startswith("deq-train: interrupted at step "), err
    assert "rerun the same command to resume from the checkpoint of step " in err
    # The lock went with the process: the same workdir resumes.
    config = smoke_config(tfds_dir, **{"train.num_epochs": 400, "train.checkpoint_every": 3})
    assert train.train_and_evaluate(config, workdir, stop_after=1) is None


def test_ctrl_c_while_a_host_callback_runs_is_an_interruption_not_a_runtime_error():
    # The solver's stats and warnings run in Python callbacks during a compiled step. A Ctrl-C
    # landing there surfaces as a JaxRuntimeError with JAX's tracebacks, unless the run holds
    # it back until the step returns.
    def callback(x):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, inside the callback

    @jax.jit
    def step(x):
        jax.debug.callback(callback, x)
        return x + 1

    with pytest.raises(jax.errors.JaxRuntimeError, match="KeyboardInterrupt"):
        step(np.ones(3, np.float32)).block_until_ready()  # the failure guarded against
    at = train.Position()
    with at.deferring_interrupts():
        assert signal.getsignal(signal.SIGINT) == at._on_sigint
        with pytest.raises(KeyboardInterrupt):
            at.call(lambda x: step(x).block_until_ready(), np.ones(3, np.float32))
        assert not at.pending and not at.in_step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_compiled_train_step_has_no_host_callback_and_the_loop_warns(tfds_dir, caplog):
    # A host callback in the step (the layers' own watchers) would send every call of the
    # AOT-compiled step through JAX's Python dispatch path: the loop counts failed solves
    # from the step's metrics instead, and warns once itself.
    config = smoke_config(tfds_dir)
    train_split, _, info = train.load_data(config)
    devices = train.Devices(config)
    task, params, opt_state, rest, _ = train.build(config, info, train_split, devices)
    step = steps.make_train_step(task)
    args = (params, opt_state, devices.new_metrics(), rest,
            *devices.put(train_split.images[:16], train_split.labels[:16]),
            jax.random.PRNGKey(0), np.int32(0))
    jaxpr = str(jax.make_jaxpr(step)(*args))
    assert "callback" not in jaxpr and not jax.make_jaxpr(step)(*args).effects
    metrics.reset_unconverged_watch()
    with caplog.at_level("WARNING", logger="experiments.metrics"):
        for _ in range(3):
            metrics._watch_unconverged(metrics.WARN_UNCONVERGED_AFTER // 2)
    warned = [r.getMessage() for r in caplog.records if "did not converge" in r.getMessage()]
    assert len(warned) == 1 and "metrics.jsonl" in warned[0], warned


def test_a_workdir_locked_by_another_process_is_refused(tmp_path, tfds_dir):
    import fcntl

    with open(tmp_path / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        with pytest.raises(train.WorkdirInUseError,
                           match=r"in use by another run \(pid 4242\)"):
            train.train_and_evaluate(smoke_config(tfds_dir), tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
    assert (tmp_path / ".lock").read_text() == "4242\n"


def test_corrupt_checkpoint_gives_a_clear_error_and_is_kept(tmp_path, tfds_dir, smoke_runs):
    shutil.copytree(smoke_runs / "smoke", tmp_path, dirs_exist_ok=True)
    step_dir = tmp_path / "checkpoints" / "12"
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    before = sorted(p.name for p in step_dir.rglob("*"))
    with pytest.raises(train.CheckpointError, match="cannot restore the checkpoint of step 12"):
        train.train_and_evaluate(smoke_config(tfds_dir), tmp_path)
    assert sorted(p.name for p in step_dir.rglob("*")) == before


def test_changed_config_in_the_same_workdir_is_refused(tmp_path, tfds_dir, smoke_runs):
    shutil.copytree(smoke_runs / "smoke", tmp_path, dirs_exist_ok=True)
    # A config error (exit status 2 on the command line), not a failed run.
    with pytest.raises(ConfigError, match="model.features: 16 -> 32"):
        train.train_and_evaluate(smoke_config(tfds_dir, **{"model.features": 32}), tmp_path)


CONFIG_FILES = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_stored_in_a_workdir_resumes(tmp_path, name):
    # config.json stores tuples (model.multiscale_channels) as lists: a rerun of the same
    # command must still match it.
    config = load_config(str(ROOT / "configs" / f"{name}.py"))
    configuration.store_config(config, tmp_path)
    configuration.check_stored_config(load_config(str(ROOT / "configs" / f"{name}.py")),
                                      tmp_path)
    config.model.features += 1
    with pytest.raises(ConfigError, match="model.features"):
        configuration.check_stored_config(config, tmp_path)


def test_run_stored_before_a_field_was_added_still_resumes(tmp_path):
    config = load_config(str(ROOT / "configs" / "smoke.py"))
    stored = config_fields(config.to_dict())
    del stored["model.head"]  # a run stored before model.head existed
    (tmp_path / "config.json").write_text(json.dumps(stored))
    configuration.check_stored_config(config, tmp_path)  # 'pool' is what those runs computed
    config.model.head = "flatten"
    with pytest.raises(ValueError, match="model.head: 'pool' -> 'flatten'"):
        configuration.check_stored_config(config, tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("solver.name", "newton", "config.solver.name='newton' is not one of"),
    ("solver.max_steps", 0, "config.solver.max_steps=0: deq.nnx.DEQ: max_steps must be >= 1"),
    ("solver.history", 0, "config.solver.history=0: Anderson: history must be >= 1"),
    ("solver.rtol", -1.0, "config.solver.rtol=-1.0: Anderson: rtol must be"),
    ("adjoint.max_steps", 0, "config.adjoint.max_steps=0: ImplicitAdjoint: max_steps must be"),
    ("reg.jac_batch", -1, "config.reg.jac_batch=-1: deq.nnx.DEQ: jac_reg_batch must be"),
    ("train.batch_size", 0, "config.train.batch_size=0 must be an integer >= 1"),
    ("adjoint.solver", "lu", "config.adjoint.solver='lu'"),
    ("model.cell", "resnet", "config.model.cell='resnet'"),
    ("model.head", "max", "config.model.head='max'"),
    ("model.head", "flatten", "applies to the 'mdeq' cell only"),
    ("data.name", "cifar", "config.data.name='cifar'"),
    ("optim.learning_rate", -1.0, "config.optim.learning_rate=-1.0"),
])
def test_bad_config_values_name_the_field(tmp_path, tfds_dir, field, value, match):
    config = smoke_config(tfds_dir, **{field: value})
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        train.train_and_evaluate(config, tmp_path)


@pytest.mark.parametrize("shape,stem_stride,head_channels", [
    ((28, 28, 1), 2, 64), ((8, 8, 1), 1, 0), ((7, 9, 1), 2, 8)])
def test_flatten_head_sizes_its_linear_layer_from_the_image(shape, stem_stride, head_channels):
    from flax import nnx

    from experiments import models

    config = load_config(str(ROOT / "configs" / "smoke.py"), [
        "model.cell=mdeq", "model.features=8", "model.head=flatten",
        f"model.stem_stride={stem_stride}", f"model.head_channels={head_channels}",
        "solver.max_steps=3"])
    model = models.Classifier(config, shape, 10, rngs=nnx.Rngs(0))
    # Shapes only: traced, not compiled.
    logits = nnx.eval_shape(lambda m: m(jax.numpy.ones((2, *shape))), model)
    assert logits.shape == (2, 10)
    down = stem_stride * (2 if head_channels else 1)
    cells = -(-shape[0] // down) * -(-shape[1] // down)
    assert model.head.kernel.shape == ((head_channels or 8) * cells, 10)


def test_mdeq_groups_must_divide_channels(tmp_path, tfds_dir):
    config = smoke_config(tfds_dir, **{"model.cell": "mdeq", "model.features": 10})
    with pytest.raises(ValueError, match="model.features=10 must be divisible"):
        train.validate_config(config)


def test_solver_fallbacks_from_the_config(tfds_dir):
    import deq
    from experiments import models
    cfg = smoke_config(tfds_dir).solver
    train_solver, _ = models.make_solver(cfg, mode="deq")
    assert train_solver.fallback == deq.FixedPointIteration(
        damping=cfg.fallback_damping, rtol=cfg.rtol, atol=cfg.atol)
    assert isinstance(models.make_solver(cfg, mode="deq", evaluation=True)[0].fallback,
                      deq.Broyden)
    assert models.make_solver(cfg, mode="unrolled")[0].fallback is None  # fixed steps
    cfg.fallback = ""
    assert models.make_solver(cfg, mode="deq")[0].fallback is None


def test_adjoint_fallback_from_the_config(tfds_dir):
    import deq
    from experiments import models
    config = smoke_config(tfds_dir)
    a = config.adjoint
    linear = models.make_adjoint(config).solver
    assert linear.fallback == deq.FixedPointIteration(rtol=a.rtol, atol=1e-8)
    a.solver, a.fallback = "iteration", "anderson"
    assert isinstance(models.make_adjoint(config).solver.fallback, deq.Anderson)
    a.solver = "gmres"  # a Krylov solve needs no contraction: no fallback
    assert isinstance(models.make_adjoint(config).solver, deq.GMRES)
    a.solver, a.fallback = "anderson", ""
    assert models.make_adjoint(config).solver.fallback is None


@pytest.mark.parametrize("field, value, match", [
    ("solver.fallback", "newton", "solver.fallback='newton' is not one of"),
    ("adjoint.fallback", "gmres", "adjoint.fallback='gmres' is not one of"),
    ("solver.fallback_damping", 1.0, r"solver.fallback_damping=1.0 must be a number in \[0, 1\)"),
])
def test_bad_solver_fallback_is_named(tfds_dir, field, value, match):
    config = smoke_config(tfds_dir, **{field: value})
    with pytest.raises(ValueError, match=match):
        train.validate_config(config)


def test_command_line_overrides_and_bad_fields(tmp_path, tfds_dir):
    base = [sys.executable, "-m", "experiments.main", "--config", str(ROOT / "configs/smoke.py"),
            f"--config.data.tfds_dir={tfds_dir}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ok = subprocess.run(base + ["--workdir", str(tmp_path / "a"), "--config.solver.max_steps=5",
                                "--config.train.num_epochs=1"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    stored = json.loads((tmp_path / "a" / "config.json").read_text())
    assert stored["solver.max_steps"] == 5 and stored["train.num_epochs"] == 1
    # The console: one line per epoch, the result, and whether every solve converged.
    assert "epoch 1/1: train loss" in ok.stdout and "| test acc" in ok.stdout
    assert "smoke: test accuracy" in ok.stdout and "backward solves:" in ok.stdout
    bad = subprocess.run(base + ["--workdir", str(tmp_path / "b"), "--config.solver.nope=3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "nope" in bad.stderr
    bad_value = subprocess.run(base + ["--workdir", str(tmp_path / "c"),
                                       "--config.solver.name=newton"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad_value.returncode != 0 and "config.solver.name='newton'" in bad_value.stderr


def test_load_config_overrides(tmp_path):
    config = load_config(str(ROOT / "configs" / "smoke.py"),
                         ["solver.max_steps=3", "config.model.weight_norm=false",
                          "--config.optim.learning_rate=0.5"])
    assert config.solver.max_steps == 3 and config.model.weight_norm is False
    assert config.optim.learning_rate == 0.5
    with pytest.raises(ValueError, match="has no field 'solver.nope'"):
        load_config(str(ROOT / "configs" / "smoke.py"), ["solver.nope=1"])
    with pytest.raises(ValueError, match="max_steps=x: invalid literal"):
        load_config(str(ROOT / "configs" / "smoke.py"), ["solver.max_steps=x"])


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_is_valid(name):
    config = load_config(str(ROOT / "configs" / f"{name}.py"))
    train.validate_config(config)
    # Every config has the fields of configs/default.py (listed by --help), and only those.
    default = load_config(str(ROOT / "configs" / "default.py"))
    assert set(config_fields(config)) == set(config_fields(default))
    if "unrolled" in name:
        deq_cfg = load_config(str(ROOT / "configs" / f"{name.replace('unrolled', 'deq')}.py"))
        # Fair comparison: same model; the unrolled network runs every one of its steps, the
        # DEQ at most its budget (the multiscale one: 16 unrolled steps against a cap of 24
        # that its mean training solve stays under).
        assert config.model == deq_cfg.model
        assert config.solver.max_steps <= deq_cfg.solver.max_steps
        if name != "mnist_multiscale_unrolled":
            assert config.solver.max_steps == deq_cfg.solver.max_steps


_SHARDED = """
import json, sys
import jax
from experiments import train
from experiments.cli import load_config
# Without the stabiliser: its random probes are drawn per device, so its penalty is another
# (equally valid) estimate on 8 devices than on one.
config = load_config(sys.argv[1], ["data.tfds_dir=" + sys.argv[2], "train.num_epochs=1",
                                   "reg.jac_weight=0.0"])
summary = train.train_and_evaluate(config, sys.argv[3])
step, state = train.load_checkpoint(sys.argv[3])
leaves = jax.tree_util.tree_leaves(state["params"])
print(json.dumps({"devices": jax.device_count(), "loss": summary["test_loss"],
                  "params": [l.ravel().tolist() for l in leaves]}))
"""


@pytest.mark.slow
def test_sharded_run_on_8_cpu_devices_matches_single_device(tmp_path, tfds_dir):
    results = {}
    for n in (1, 8):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        out = subprocess.run(
            [sys.executable, "-c", _SHARDED, str(ROOT / "configs/smoke.py"), tfds_dir,
             str(tmp_path / f"dev{n}")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])
    assert results[1]["devices"] == 1 and results[8]["devices"] == 8
    np.testing.assert_allclose(results[8]["loss"], results[1]["loss"], rtol=1e-4)
    for a, b in zip(results[1]["params"], results[8]["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_padding_rows_leave_the_eval_solve_statistics_unchanged(tfds_dir):
    from experiments import data, steps

    config = smoke_config(tfds_dir)
    train_split, test, info = train.load_data(config)
    task, params, _, _, eval_rest = train.build(config, info, train_split, train.Devices(config))
    eval_step = steps.make_eval_step(task)
    # The smoke run's 40 test examples in batches of 32: the second has 8 real rows.
    images, labels, mask = list(data.eval_batches(test, 32, pad=True))[-1]
    n = int(mask.sum())
    assert n == 8
    padded = jax.device_get(jax.jit(eval_step)(params, eval_rest, images, labels, mask))
    real = jax.device_get(jax.jit(eval_step)(params, eval_rest, images[:n], labels[:n],
                                             mask[:n]))
    assert int(padded["count"]) == n and int(padded["correct"]) == int(real["correct"])
    assert int(padded["fwd_steps"]) == int(real["fwd_steps"])
    assert bool(padded["fwd_converged"]) == bool(real["fwd_converged"])
    np.testing.assert_allclose(padded["fwd_rel_residual"], real["fwd_rel_residual"], rtol=1e-4)
    np.testing.assert_allclose(padded["loss_sum"], real["loss_sum"], rtol=1e-5)


def test_compare_writes_table_and_plots(tmp_path, smoke_runs, monkeypatch):
    read = []
    summarize = compare.summarize
    monkeypatch.setattr(compare, "summarize", lambda wd: read.append(wd) or summarize(wd))
    table = compare.compare([smoke_runs / "smoke", smoke_runs / "smoke_unrolled"], tmp_path)
    assert read == [smoke_runs / "smoke", smoke_runs / "smoke_unrolled"]  # each read once
    monkeypatch.undo()
    assert "| smoke | deq |" in table and "| smoke_unrolled | unrolled |" in table
    assert "Machine:" in table
    for f in ("comparison.md", "comparison.json", "comparison.png", "memory.png"):
        assert (tmp_path / f).stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compare.summarize(tmp_path / "missing")
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(FileNotFoundError, match="no summary.json: the run has not finished"):
        compare.summarize(tmp_path / "unfinished")


# ------------------------------------------------------------------------------------------
# Faults and bad inputs, as a user meets them (README: "faults and bad inputs we test").


def _cli(*args, module="experiments.main", timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "DEQ_TRACEBACK"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _train_cli(workdir, tfds_dir, *overrides, config="configs/smoke.py"):
    return _cli("--config", ROOT / config, "--workdir", workdir,
                f"--config.data.tfds_dir={tfds_dir}", *overrides)


def _short_error(proc, code, *needles, max_lines=2):
    """A failed command that says what went wrong in a line or two, without a traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    err = proc.stderr
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if "Warning" not in ln and "callback(" not in ln]
    assert len(lines) <= max_lines, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _files(directory):
    return {p: p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_corrupted_checkpoint_is_refused_and_the_advice_resumes_the_run(
        tmp_path, tfds_dir, smoke_runs):
    shutil.copytree(smoke_runs / "smoke", tmp_path, dirs_exist_ok=True)
    step_dir = tmp_path / "checkpoints" / "12"
    # Flip bytes in the middle of every OCDBT data file: same sizes, different content.
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            data = bytearray(f.read_bytes())
            mid = len(data) // 2
            data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
            f.write_bytes(bytes(data))
    before = _files(step_dir)
    err = _short_error(_train_cli(tmp_path, tfds_dir), 1, "checkpoint of step 12",
                       "left untouched", "previous checkpoint (step 8)", max_lines=1)
    # Caught by the sha256 digest of the arrays (or, for bytes orbax cannot decode, by orbax).
    assert "does not match the sha256 digest" in err or "cannot restore" in err
    assert _files(step_dir) == before
    # Following the advice resumes from step 8 and finishes the run, although the metrics
    # file ends in a line cut by a crash in the middle of a write.
    shutil.move(step_dir, tmp_path / "bad-checkpoint-12")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 1')
    ok = _train_cli(tmp_path, tfds_dir)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "resumed from step 8" in ok.stdout and "epoch 2/2:" in ok.stdout
    assert "warning:" in ok.stdout and "dropped its truncated last line" in ok.stdout
    records = train.read_metrics(tmp_path)  # every line parses again
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]


def test_checkpoint_whose_arrays_differ_from_its_digest_is_refused(tmp_path, tfds_dir,
                                                                  smoke_runs):
    # A checkpoint orbax reads without complaint (it was written by orbax), whose arrays are
    # not those its digest was computed from: only the sha256 check can tell.
    import orbax.checkpoint as ocp

    from experiments import checkpoints

    shutil.copytree(smoke_runs / "smoke", tmp_path, dirs_exist_ok=True)
    config = smoke_config(tfds_dir)
    train_split, _, info = train.load_data(config)
    devices = train.Devices(config)
    _, params, opt_state, _, _ = train.build(config, info, train_split, devices)
    target = checkpoints._abstract({"params": params, "opt_state": opt_state},
                                   devices.replicated)
    manager = checkpoints.make_manager(tmp_path / "checkpoints", keep=2)
    out = manager.restore(12, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                      meta=ocp.args.JsonRestore()))
    state, meta = out["state"], out["meta"]
    leaves, treedef = jax.tree_util.tree_flatten(state["params"])
    leaves[0] = leaves[0] + 1.0
    state = {**state, "params": jax.tree_util.tree_unflatten(treedef, leaves)}
    manager.delete(12)
    manager.save(12, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()
    with pytest.raises(train.CheckpointError) as info:
        train.train_and_evaluate(config, tmp_path)
    message = str(info.value)
    assert "the checkpoint of step 12" in message and "is corrupt" in message
    assert "does not match the sha256 digest saved with it" in message
    assert "cannot restore" not in message and "previous checkpoint (step 8)" in message
    assert "params/" in message  # the array that changed


def test_checkpoint_with_a_deleted_manifest_is_a_short_error(tmp_path, tfds_dir, smoke_runs):
    shutil.copytree(smoke_runs / "smoke", tmp_path, dirs_exist_ok=True)
    for f in (tmp_path / "checkpoints" / "12").rglob("manifest.ocdbt"):
        f.unlink()
    _short_error(_train_cli(tmp_path, tfds_dir), 1, "cannot restore the checkpoint of step 12",
                 "left untouched", max_lines=1)


def test_truncated_checkpoint_file_is_a_one_paragraph_error(tmp_path, tfds_dir, smoke_runs):
    shutil.copytree(smoke_runs / "smoke", tmp_path, dirs_exist_ok=True)
    state = tmp_path / "checkpoints" / "12" / "state"
    for f in list(state.rglob("*")):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(train.CheckpointError) as info:
        train.train_and_evaluate(smoke_config(tfds_dir), tmp_path)
    message = str(info.value)
    assert "step 12" in message and "previous checkpoint (step 8)" in message
    assert "\n" not in message and len(message) < 1200 and "tensorstore_spec" not in message


@pytest.mark.parametrize("message", ["Checksum mismatch.", "x" * 299 + ". more text",
                                     "y" * 400 + "..."])
def test_orbax_messages_end_in_one_full_stop(message):
    from experiments import checkpoints

    sentence = f"cannot restore: {checkpoints._first_line(ValueError(message))}."
    assert sentence.endswith(".") and not sentence.endswith("..") and len(sentence) < 340


def test_nonfinite_checkpoint_values_are_refused(tmp_path):
    import jax.numpy as jnp

    from experiments import checkpoints

    manager = checkpoints.make_manager(tmp_path, keep=2)
    state = {"params": {"w": jnp.array([1.0, jnp.nan])}, "opt_state": ()}
    checkpoints.save(manager, 3, state)
    with pytest.raises(train.CheckpointError, match=r"step 3 .* non-finite values .* params/w"):
        checkpoints.load(tmp_path)


def test_nonfinite_loss_stops_the_run_naming_the_step(tmp_path, tfds_dir):
    # A learning rate of 1e30 makes the parameters huge after the first step: the loss of
    # step 2 is not finite.
    proc = _train_cli(tmp_path, tfds_dir, "--config.optim.learning_rate=1e30",
                      "--config.optim.schedule=constant", "--config.optim.grad_clip=0",
                      "--config.train.checkpoint_every=1")
    _short_error(proc, 1, "training stopped at step 2: non-finite",
                 "the last good checkpoint is step 1", "--config.train.on_nonfinite=skip")
    assert not (tmp_path / "summary.json").exists()
    assert train.load_checkpoint(tmp_path)[0] == 1  # nothing after the bad step was saved


def test_nonfinite_step_found_at_the_end_of_its_log_interval_is_named(tmp_path, tfds_dir):
    # Metrics reach the host every 6 steps: step 2 is the first non-finite one, and neither
    # its update nor those of steps 3-6 were applied.
    config = smoke_config(tfds_dir, **{"optim.learning_rate": 1e30, "optim.schedule": "constant",
                                       "optim.grad_clip": 0.0, "train.log_every": 6,
                                       "train.checkpoint_every": 6})
    with pytest.raises(train.NonFiniteError,
                       match="stopped at step 2: .* there is no checkpoint yet"):
        train.train_and_evaluate(config, tmp_path)
    bad = [r for r in train.read_metrics(tmp_path) if r["kind"] == "nonfinite"]
    assert [r["step"] for r in bad] == [2]
    assert not (tmp_path / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


def test_nonfinite_steps_can_be_skipped_and_are_counted(tmp_path, tfds_dir):
    config = smoke_config(tfds_dir, **{"optim.learning_rate": 1e30, "optim.schedule": "constant",
                                       "optim.grad_clip": 0.0, "train.on_nonfinite": "skip",
                                       "train.num_epochs": 1})
    summary = train.train_and_evaluate(config, tmp_path)
    assert summary["skipped_steps"] == 5 and summary["train_steps"] == 6
    # Only the finite step's solves are counted; the summary's verdict follows the counts.
    assert 0 <= summary["train_fwd_unconverged"] <= 1
    assert 0 <= summary["train_bwd_unconverged"] <= 1
    assert summary["all_solves_converged"] == (
        summary["train_fwd_unconverged"] + summary["train_bwd_unconverged"]
        + summary["eval_fwd_unconverged"] == 0)
    assert "5 training steps skipped" in train.convergence_report(summary)
    train.load_checkpoint(tmp_path)  # the skipped updates left the saved state finite


def test_help_lists_the_config_fields_and_exits_0():
    proc = _cli("--help")
    assert proc.returncode == 0, proc.stderr
    for text in ("--config FILE", "--workdir DIR", "--config.<field>=<value>",
                 "train.num_epochs = 20", "solver.max_steps = 30", "train.on_nonfinite = 'stop'"):
        assert text in proc.stdout, text
    compare_help = _cli("--help", module="experiments.compare")
    assert compare_help.returncode == 0 and "--config.<field>=<value>" in compare_help.stdout
    # Plain text, not reStructuredText markup.
    for out in (proc.stdout, compare_help.stdout):
        assert "``" not in out and "::" not in out, out


@pytest.mark.parametrize("module", ["experiments.main", "experiments.compare"])
def test_help_is_instant_it_loads_neither_jax_nor_the_data(module):
    code = (f"import sys, runpy; sys.argv = ['x', '--help']\n"
            f"try:\n    runpy.run_module({module!r}, run_name='__main__')\n"
            f"except SystemExit:\n    pass\n"
            f"heavy = [m for m in ('jax', 'tensorflow_datasets', 'matplotlib')\n"
            f"         if m in sys.modules]\n"
            f"print('heavy', heavy, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert "heavy []" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("module,args,needles", [
    ("experiments.main", ["--config.foo=1"], ["--config.foo", "no field 'foo'"]),
    ("experiments.main", ["--config.train.epochs=abc"],
     ["no field 'train.epochs'", "Did you mean --config.train.num_epochs?"]),
    ("experiments.main", ["--config.train.num_epochs=abc"], ["train.num_epochs=abc"]),
    ("experiments.compare", ["--config.solver.max_step=3"],
     ["Did you mean --config.solver.max_steps?"]),
])
def test_unknown_or_mistyped_field_is_a_short_error(tmp_path, module, args, needles):
    config_flag = "--configs" if module == "experiments.compare" else "--config"
    proc = _cli(config_flag, ROOT / "configs/smoke.py", "--workdir", tmp_path / "run", *args,
                module=module)
    _short_error(proc, 2, *needles, max_lines=1)
    assert not (tmp_path / "run").exists()


def test_compare_has_one_override_syntax(tmp_path):
    proc = _cli("--configs", ROOT / "configs/smoke.py", "--workdir", tmp_path,
                "--set", "train.num_epochs=1", module="experiments.compare")
    _short_error(proc, 2, "unexpected argument '--set'", "--config.FIELD=VALUE", max_lines=1)


_WITHOUT_THE_EXTRA = """
import sys
sys.modules["ml_collections"] = None  # as after a plain `pip install deq`
sys.argv = [sys.argv[1]]
import experiments.{module}
"""


@pytest.mark.parametrize("module,prog", [("main", "deq-train"), ("compare", "deq-compare")])
def test_commands_without_the_experiments_extra_say_what_to_install(module, prog):
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_THE_EXTRA.format(module=module), prog],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr == f"{prog} needs the experiments extra: pip install 'deq[experiments]'\n"


def test_console_setup_keeps_jax_backend_warnings():
    # "An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not
    # installed" is a warning of jax._src.xla_bridge: a user must see it.
    import logging

    from experiments import cli

    cli.quiet_third_party_logs()
    assert logging.getLogger("jax._src.xla_bridge").getEffectiveLevel() <= logging.WARNING


def test_missing_config_file_is_a_short_error(tmp_path):
    proc = _cli("--config", tmp_path / "nope.py", "--workdir", tmp_path / "run")
    _short_error(proc, 2, f"config file {tmp_path / 'nope.py'} does not exist", max_lines=1)
    assert not (tmp_path / "run").exists()


def test_missing_mnist_folder_is_a_short_error_and_leaves_no_workdir(tmp_path, tfds_dir):
    proc = _train_cli(tmp_path / "run", tfds_dir, f"--config.data.dir={tmp_path / 'nope'}",
                      config="configs/mnist_deq.py")
    # The error explains where to get the files: a few lines, no traceback.
    # A data folder that does not exist is a bad config value: exit 2.
    _short_error(proc, 2, str(tmp_path / "nope"), "does not exist", max_lines=12)
    assert not (tmp_path / "run").exists()  # a rerun with other settings is not refused


def test_compare_on_a_path_that_does_not_exist_says_so(tmp_path):
    proc = _cli("--runs", tmp_path / "nonexistent", "--out", tmp_path / "out",
                module="experiments.compare")
    _short_error(proc, 2, f"run directory {tmp_path / 'nonexistent'} does not exist",
                 max_lines=1)
    assert not (tmp_path / "out").exists()


_WITHOUT_INSTALLED_CONFIGS = """
import importlib.abc, importlib.machinery, os, sys

class SysPathOnly(importlib.abc.MetaPathFinder):
    # 'configs' as if it were not installed: found only in a folder on sys.path.
    def find_spec(self, name, path=None, target=None):
        if name != "configs":
            return None
        dirs = [p for p in sys.path if p and os.path.isdir(p)]
        spec = importlib.machinery.PathFinder.find_spec(name, dirs)
        if spec is None:
            raise ModuleNotFoundError("No module named 'configs'", name=name)
        return spec

sys.meta_path.insert(0, SysPathOnly())
try:
    import configs  # noqa: F401
    sys.exit("configs is importable before loading: the test proves nothing")
except ModuleNotFoundError:
    pass
from experiments.cli import load_config
config = load_config(sys.argv[1], ["train.num_epochs=1"])
print(config.name, config.mode, config.train.num_epochs)
"""


def test_config_files_load_without_an_installed_configs_package(tmp_path):
    # configs/mnist_unrolled.py imports configs.mnist_deq, which imports configs.default.
    out = subprocess.run([sys.executable, "-c", _WITHOUT_INSTALLED_CONFIGS,
                          str(ROOT / "configs" / "mnist_unrolled.py")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["mnist_unrolled", "unrolled", "1"]


def test_machine_description_names_the_machine_as_the_result_sets_do():
    from experiments import provenance as reproduce

    described = train.machine_description()
    assert described == (f"{reproduce.machine_name(reproduce.machine())}, "
                         f"{jax.device_count()} JAX device(s)")


def test_dotted_field_helpers():
    config = load_config(str(ROOT / "configs" / "smoke.py"))
    set_fields(config, {"solver.max_steps": 3, "name": "x"})
    assert get_field(config, "solver.max_steps") == 3 and config.name == "x"
    assert config_fields(config)["solver.max_steps"] == 3

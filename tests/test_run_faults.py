"""Misuse of a training run, refused early and by name: non-finite hyperparameters, damaged
workdir files, checkpoints of another run, a damaged or busy dataset build."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time

import pytest
from test_experiments import smoke_config

from experiments import compare, data, train
from experiments.configuration import store_config, validate_config
from experiments.errors import ConfigError, RunFileError


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tfds_dir):
    """A finished smoke run (12 steps) to copy from."""
    root = tmp_path_factory.mktemp("finished")
    train.train_and_evaluate(smoke_config(tfds_dir), root)
    return root


@pytest.mark.parametrize("field, value", [("optim.learning_rate", float("nan")),
                                          ("optim.weight_decay", float("inf")),
                                          ("solver.rtol", float("-inf"))])
def test_non_finite_hyperparameters_are_config_errors(tfds_dir, field, value):
    with pytest.raises(ConfigError, match=rf"config.{field}=.* must be a finite number"):
        validate_config(smoke_config(tfds_dir, **{field: value}))


def test_corrupt_config_json_is_named(tmp_path, tfds_dir):
    (tmp_path / "config.json").write_text('{"seed": 0,')
    with pytest.raises(RunFileError, match="config.json is not valid JSON .*the config of the "
                                           "run stored in this workdir.*new --workdir"):
        train.train_and_evaluate(smoke_config(tfds_dir), tmp_path)


def test_corrupt_summary_json_is_named(tmp_path, finished):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    (tmp_path / "summary.json").write_text("{")
    with pytest.raises(RunFileError, match="summary.json is not valid JSON"):
        compare.summarize(tmp_path)


def test_checkpoints_beyond_the_configs_steps_are_refused(tmp_path, tfds_dir, finished):
    # Checkpoints of a 12-step run copied into a fresh workdir of a 6-step config.
    shutil.copytree(finished / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(train.CheckpointError, match="of step 12, beyond this config's 6 "
                                                    "training steps"):
        train.train_and_evaluate(smoke_config(tfds_dir, **{"train.num_epochs": 1}), tmp_path)


def test_damaged_dataset_folder_is_named_with_the_rebuild(tmp_path, tfds_dir):
    data.prepare_builder("digits", tfds_dir=tfds_dir)
    shutil.copytree(tfds_dir, tmp_path / "tfds")
    folder = tmp_path / "tfds" / "sklearn_digits" / "1.0.0"
    shard = next(folder.glob("*-train.array_record-*"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(data.DatasetError, match=f"rm -rf {folder}"):
        data.load_dataset("digits", tfds_dir=str(tmp_path / "tfds"))
    (folder / "dataset_info.json").write_text("{")
    with pytest.raises(data.DatasetError, match="is damaged"):
        data.load_dataset("digits", tfds_dir=str(tmp_path / "tfds"))


def test_the_embedded_build_prints_no_download_line(tmp_path, capfd):
    data.prepare_builder("digits", tfds_dir=str(tmp_path))
    assert "Downloading" not in capfd.readouterr().out


def test_a_busy_dataset_build_names_the_holder(tmp_path, caplog):
    path = str(tmp_path / ".build.lock")
    holder = open(path, "a+")  # noqa: SIM115 - another build holds the lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    holder.write("4242\n")
    holder.flush()
    entered = threading.Event()

    def build():
        with data._build_lock(path):
            entered.set()

    with caplog.at_level(logging.WARNING, logger="experiments.data"):
        t = threading.Thread(target=build)
        t.start()
        time.sleep(0.5)
        assert not entered.is_set()  # it waits ...
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
        t.join(timeout=10)
    assert entered.is_set()  # ... until the holder lets go
    assert "waiting for process 4242" in caplog.text and path in caplog.text
    assert open(path).read().strip() == str(os.getpid())


def test_a_run_that_stored_its_config_meanwhile_is_not_resumed(tmp_path, tfds_dir, monkeypatch):
    # Two runs started together on one workdir: the other one stores its config after this
    # run's first check (here: while this run loads its data). The check under the lock
    # sees it, and this run refuses to mix two experiments.
    load = train.load_data

    def load_and_race(config):
        other = smoke_config(tfds_dir, **{"seed": 7})
        tmp_path.mkdir(exist_ok=True)
        store_config(other, tmp_path)
        return load(config)

    monkeypatch.setattr(train, "load_data", load_and_race)
    with pytest.raises(ConfigError, match="holds a run with a different config .*seed: 7 -> 0"):
        train.train_and_evaluate(smoke_config(tfds_dir), tmp_path)
    assert not (tmp_path / "checkpoints").exists()

"""The TFDS (array_record, no TensorFlow) input pipeline in experiments.data."""

from __future__ import annotations

import gzip
import itertools
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import data
from experiments.datasets import (
    MNIST_FILES,
    MnistIdx,
    digits_split_indices,
    read_idx,
    read_idx_images,
    read_idx_labels,
    write_idx,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real MNIST IDX files, where the machine has them (.ci/run sets this when it finds them).
MNIST_DIR = Path(os.environ.get("DEQ_MNIST_DIR", "") or "/nonexistent")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits_tfds_dir(tmp_path_factory):
    """A tfds_dir with sklearn_digits built once for the module (building takes ~0.2 s)."""
    tfds_dir = tmp_path_factory.mktemp("tfds_digits")
    data.prepare_builder("digits", tfds_dir=tfds_dir)
    return tfds_dir


@pytest.fixture(scope="module")
def digits(digits_tfds_dir):
    return data.load_dataset("digits", tfds_dir=digits_tfds_dir)


def _write_fake_mnist(folder: Path, n_train: int = 30, n_test: int = 12) -> dict:
    """Writes tiny MNIST-format IDX files (28x28 uint8) and returns the arrays written."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        images_name, labels_name = MNIST_FILES[split]
        write_idx(folder / f"{images_name}.gz", images)
        write_idx(folder / f"{labels_name}.gz", labels)
        arrays[split] = (images, labels)
    return arrays


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_split_sizes(digits):
    train, test, info = digits
    assert isinstance(train, data.Split)
    assert train.images.shape == (1437, 8, 8, 1) and test.images.shape == (360, 8, 8, 1)
    assert train.images.dtype == np.float32 and test.images.dtype == np.float32
    assert train.labels.dtype == np.int32 and test.labels.dtype == np.int32
    for split in (train, test):
        assert split.labels.min() == 0 and split.labels.max() == 9
    assert info["num_classes"] == 10
    assert info["image_shape"] == (8, 8, 1)
    assert info["max_value"] == 16
    assert (info["num_train"], info["num_test"]) == (1437, 360)
    assert info["tfds_name"] == "sklearn_digits"


def test_digits_normalised_with_train_statistics(digits):
    train, test, info = digits
    np.testing.assert_allclose(train.images.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.images.std(), 1.0, atol=1e-5)
    # Test uses the train statistics, so it is close to but not exactly standardised.
    assert abs(float(test.images.mean())) < 0.1
    # Undoing the normalisation recovers the raw integer pixel values 0..16.
    raw = (test.images * info["std"][0] + info["mean"][0]) * info["max_value"]
    np.testing.assert_allclose(raw, np.round(raw), atol=1e-3)
    assert raw.min() > -0.5 and raw.max() < 16.5


def test_digits_split_is_fixed_and_matches_sklearn(digits):
    from sklearn.datasets import load_digits

    train, test, info = digits
    raw = load_digits()
    idx = digits_split_indices()
    assert not set(idx["train"]) & set(idx["test"])
    np.testing.assert_array_equal(train.labels, raw.target[idx["train"]])
    np.testing.assert_array_equal(test.labels, raw.target[idx["test"]])
    expected = (raw.images[idx["test"]] / 16.0 - info["mean"][0]) / info["std"][0]
    np.testing.assert_allclose(test.images[..., 0], expected, atol=1e-5)
    # Stratified: every class keeps roughly its 20 % share in test.
    assert np.all(np.bincount(test.labels, minlength=10) >= 30)


def test_digits_reused_after_first_build(digits_tfds_dir):
    version_dir = digits_tfds_dir / "sklearn_digits" / "1.0.0"
    files = sorted(version_dir.glob("*.array_record*"))
    assert files, "array_record files expected"
    mtimes = [f.stat().st_mtime_ns for f in files]
    data.load_dataset("digits", tfds_dir=digits_tfds_dir)
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_first_build_logs_no_dataset_info_warning(tmp_path, caplog):
    # TFDS warns that a not-yet-built dataset "has no dataset_info.json": noise, filtered.
    with caplog.at_level("WARNING"):
        data.prepare_builder("digits", tfds_dir=tmp_path)
    assert "dataset_info.json" not in caplog.text


def test_digits_readable_with_plain_tfds_data_source(digits_tfds_dir, digits):
    source = tfds.data_source("sklearn_digits", split="test", data_dir=digits_tfds_dir)
    assert len(source) == 360
    np.testing.assert_array_equal([source[i]["label"] for i in range(5)], digits[1].labels[:5])


def test_limits_take_prefix_of_fixed_split(digits_tfds_dir, digits):
    train, test, info = data.load_dataset(
        "digits", tfds_dir=digits_tfds_dir, limit_train=50, limit_test=7
    )
    assert (len(train), len(test)) == (50, 7)
    assert (info["num_train"], info["num_test"]) == (50, 7)
    np.testing.assert_array_equal(train.labels, digits[0].labels[:50])
    # Statistics come from the 50 loaded train examples.
    np.testing.assert_allclose(train.images.mean(), 0.0, atol=1e-5)


def test_split_arrays_are_read_only(digits):
    train, _, _ = digits
    with pytest.raises(ValueError):
        train.images[0, 0, 0, 0] = 1.0


def test_runs_without_tensorflow(digits_tfds_dir):
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed; the TF-free path is only exercised where it is not")
    # Building and reading (module fixture) and loading all ran without TF available.
    data.load_dataset("digits", tfds_dir=digits_tfds_dir, limit_train=10)
    assert "tensorflow" not in sys.modules


def test_concurrent_builds_of_one_dataset_both_succeed(tmp_path):
    # A DEQ run and its baseline started together build the same dataset at the same time.
    import subprocess

    code = (
        "import sys; from experiments import data; "
        "b = data.prepare_builder('digits', tfds_dir=sys.argv[1]); "
        "print(len(data.read_split(b, 'test')[1]))"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert int(out.split()[-1]) > 0


# --------------------------------------------------------------------------- batching


def test_train_batches_deterministic_per_seed_and_epoch(digits):
    train, _, _ = digits

    def epoch(seed, e):
        return list(data.train_batches(train, 64, seed=seed, epoch=e))

    a, b = epoch(0, 3), epoch(0, 3)
    assert len(a) == data.steps_per_epoch(train, 64) == 1437 // 64
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # Resuming at epoch 3 does not depend on earlier epochs having been consumed.
    list(data.train_batches(train, 64, seed=0, epoch=0))
    np.testing.assert_array_equal(epoch(0, 3)[0][1], a[0][1])
    assert not np.array_equal(epoch(0, 4)[0][0], a[0][0])
    assert not np.array_equal(epoch(1, 3)[0][0], a[0][0])


def test_train_batches_shapes_and_each_example_at_most_once(digits):
    train, _, _ = digits
    perm = data.epoch_permutation(len(train), seed=5, epoch=2)
    np.testing.assert_array_equal(np.sort(perm), np.arange(len(train)))
    batches = list(data.train_batches(train, 100, seed=5, epoch=2))
    assert len(batches) == 14  # 1437 // 100; the 37 left over are dropped.
    for images, labels in batches:
        assert images.shape == (100, 8, 8, 1) and images.dtype == np.float32
        assert labels.shape == (100,) and labels.dtype == np.int32
    seen = np.concatenate([images.reshape(100, -1) for images, _ in batches])
    np.testing.assert_array_equal(seen, train.images[perm[:1400]].reshape(1400, -1))


def test_batch_size_errors(digits):
    train, _, _ = digits
    with pytest.raises(ValueError, match="batch_size"):
        data.steps_per_epoch(train, 0)
    with pytest.raises(ValueError, match="exceeds"):
        data.train_batches(train, 2000, seed=0, epoch=0)
    with pytest.raises(ValueError, match="non-negative"):
        data.train_batches(train, 10, seed=-1, epoch=0)
    with pytest.raises(ValueError, match="batch_size"):
        data.eval_batches(train, -1)


def test_eval_batches_cover_every_example_once(digits):
    _, test, _ = digits
    batches = list(data.eval_batches(test, 64))
    assert [len(y) for _, y in batches] == [64] * 5 + [40]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), test.images)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), test.labels)


def test_eval_batches_padded_with_mask(digits):
    _, test, _ = digits
    batches = list(data.eval_batches(test, 64, pad=True))
    assert len(batches) == 6
    for images, labels, mask in batches:
        assert images.shape == (64, 8, 8, 1) and labels.shape == (64,) and mask.shape == (64,)
    masks = np.concatenate([m for _, _, m in batches])
    assert masks.sum() == len(test) and masks[: len(test)].all()
    images = np.concatenate([x for x, _, _ in batches])[masks]
    np.testing.assert_array_equal(images, test.images)
    # Padding repeats the last example (a zero image would join the solve as one of its own).
    last_images, last_labels, _ = batches[-1]
    np.testing.assert_array_equal(last_images[40:], np.broadcast_to(test.images[-1],
                                                                    (24, 8, 8, 1)))
    assert (last_labels[40:] == test.labels[-1]).all()


# --------------------------------------------------------------------------- errors


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="cifar"):
        data.load_dataset("cifar", tfds_dir=tmp_path)


def test_missing_split(digits_tfds_dir):
    builder = data.prepare_builder("digits", tfds_dir=digits_tfds_dir)
    with pytest.raises(ValueError, match="validation"):
        data.read_split(builder, "validation")


def test_bad_limit(digits_tfds_dir):
    with pytest.raises(ValueError, match="limit"):
        data.load_dataset("digits", tfds_dir=digits_tfds_dir, limit_train=0)


def test_mnist_missing_data_dir(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        data.load_dataset("mnist", data_dir=missing, tfds_dir=tmp_path / "tfds")


def test_mnist_missing_file(tmp_path):
    folder = tmp_path / "mnist"
    _write_fake_mnist(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load_dataset("mnist", data_dir=folder, tfds_dir=tmp_path / "tfds")
    assert not (tmp_path / "tfds" / "mnist_idx").exists()


def test_mnist_unprepared_without_data_dir(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        data.load_dataset("mnist", tfds_dir=tmp_path)


# --------------------------------------------------------------------------- IDX parser


def test_idx_roundtrip_gzip_and_plain(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    write_idx(tmp_path / "img.gz", images)
    write_idx(tmp_path / "lab", labels, compress=False)
    np.testing.assert_array_equal(read_idx_images(tmp_path / "img.gz"), images)
    np.testing.assert_array_equal(read_idx_labels(tmp_path / "lab"), labels)
    # Multi-byte types are big-endian on disk and native in memory.
    wide = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    write_idx(tmp_path / "wide.gz", wide)
    out = read_idx(tmp_path / "wide.gz")
    np.testing.assert_array_equal(out, wide)
    assert out.dtype == np.int32


def test_idx_hand_written_header(tmp_path):
    # Written byte by byte (not via write_idx) so the parser is checked against the spec.
    payload = bytes(range(6))
    raw = struct.pack(">IIII", 0x00000803, 1, 2, 3) + payload
    path = tmp_path / "hand-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(raw))
    out = read_idx_images(path)
    assert out.shape == (1, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out.ravel(), list(payload))


def test_idx_bad_magic(tmp_path):
    labels = tmp_path / "labels.gz"
    write_idx(labels, np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="magic.*0x00000801.*expected 0x00000803"):
        read_idx_images(labels)
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(gzip.compress(b"\x12\x34\x56\x78" + bytes(8)))
    with pytest.raises(ValueError, match="magic"):
        read_idx(garbage)


def test_idx_size_mismatch(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 0x00000803, 2, 2, 1) + bytes(3)))
    with pytest.raises(ValueError, match="size mismatch"):
        read_idx(path)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(struct.pack(">I", 0x00000803) + bytes(4)))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(truncated)


def test_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gz"):
        read_idx(tmp_path / "nope.gz")


# --------------------------------------------------------------------------- MNIST


def test_mnist_pipeline_on_tiny_idx_files(tmp_path):
    folder = tmp_path / "mnist"
    arrays = _write_fake_mnist(folder, n_train=30, n_test=12)
    train, test, info = data.load_dataset("mnist", data_dir=folder, tfds_dir=tmp_path / "tfds")
    assert train.images.shape == (30, 28, 28, 1) and test.images.shape == (12, 28, 28, 1)
    assert info["max_value"] == 255 and info["num_classes"] == 10
    # File order is kept, and values round-trip through normalisation.
    np.testing.assert_array_equal(train.labels, arrays["train"][1])
    raw = (test.images * info["std"][0] + info["mean"][0]) * 255.0
    np.testing.assert_allclose(raw[..., 0], arrays["test"][0], atol=1e-3)
    # Once prepared it loads without data_dir.
    train2, _, info2 = data.load_dataset("mnist", tfds_dir=tmp_path / "tfds", limit_train=5)
    np.testing.assert_array_equal(train2.labels, arrays["train"][1][:5])
    raw2 = (train2.images * info2["std"][0] + info2["mean"][0]) * 255.0
    np.testing.assert_allclose(raw2[..., 0], arrays["train"][0][:5], atol=1e-3)


def _require_mnist():
    if not MNIST_DIR.is_dir():
        pytest.skip("set DEQ_MNIST_DIR to a folder with the MNIST IDX files")


def test_real_mnist_idx_files_parse():
    _require_mnist()
    for split, n in (("train", 60000), ("test", 10000)):
        images_name, labels_name = MNIST_FILES[split]
        images = read_idx_images(MNIST_DIR / f"{images_name}.gz")
        labels = read_idx_labels(MNIST_DIR / f"{labels_name}.gz")
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and set(np.unique(labels)) == set(range(10))


def test_real_mnist_subset_build_and_load(tmp_path):
    # The real files through TFDS and the pipeline, but only 500 + 200 examples so it is fast:
    # build the first examples with tfds' max_examples_per_split, which load_dataset then reuses.
    _require_mnist()
    builder = MnistIdx(data_dir=tmp_path, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(MNIST_DIR), max_examples_per_split=500
        )
    )
    train, test, info = data.load_dataset("mnist", tfds_dir=tmp_path, limit_test=200)
    assert train.images.shape == (500, 28, 28, 1) and test.images.shape == (200, 28, 28, 1)
    images_name, labels_name = MNIST_FILES["train"]
    np.testing.assert_array_equal(
        train.labels, read_idx_labels(MNIST_DIR / f"{labels_name}.gz")[:500]
    )
    raw = (train.images * info["std"][0] + info["mean"][0]) * 255.0
    expected = read_idx_images(MNIST_DIR / f"{images_name}.gz")[:500]
    np.testing.assert_allclose(raw[..., 0], expected, atol=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CI") == "true", reason="slow test, skipped when CI=true")
def test_real_mnist_full_build_and_load(tmp_path_factory):
    # Builds all 70k examples (~9 s here, plus ~4 s to read them back), hence `slow`.
    _require_mnist()
    tfds_dir = tmp_path_factory.mktemp("tfds_mnist")
    train, test, info = data.load_dataset("mnist", data_dir=MNIST_DIR, tfds_dir=tfds_dir)
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert train.labels.dtype == np.int32 and test.images.dtype == np.float32
    # The well-known MNIST pixel statistics.
    np.testing.assert_allclose(info["mean"][0], 0.1307, atol=1e-4)
    np.testing.assert_allclose(info["std"][0], 0.3081, atol=1e-4)
    np.testing.assert_allclose(train.images.mean(), 0.0, atol=1e-4)
    batches = list(itertools.islice(data.train_batches(train, 128, seed=0, epoch=0), 3))
    assert batches[0][0].shape == (128, 28, 28, 1)
    assert sum(len(y) for _, y in data.eval_batches(test, 1000)) == 10000

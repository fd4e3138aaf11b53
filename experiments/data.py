"""Dataset input pipeline for the training experiments (TFDS array_record, no TensorFlow).

Datasets (``name`` argument of :func:`load_dataset`):

* ``"digits"`` (default): scikit-learn's bundled 8x8 handwritten digits, embedded, needs no
  network. Fixed stratified 80/20 split with ``random_state=0`` -> 1437 train / 360 test
  (see :mod:`experiments.datasets.sklearn_digits`). Raw pixels 0..16.
* ``"mnist"``: MNIST from the four standard gzip IDX files in a local folder (``data_dir``)
  -> 60000 train / 10000 test, raw pixels 0..255. To get the files on a machine with
  internet access::

      mkdir -p ~/data/mnist && cd ~/data/mnist
      for f in train-images-idx3-ubyte train-labels-idx1-ubyte \\
               t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        curl -fLO https://storage.googleapis.com/cvdf-datasets/mnist/$f.gz
      done

  (the original host http://yann.lecun.com/exdb/mnist/ has the same files but often refuses
  scripted downloads), then ``load_dataset("mnist", data_dir="~/data/mnist")``.

Both are local TFDS ``GeneratorBasedBuilder`` datasets (:mod:`experiments.datasets`) written in
the ``array_record`` format and read back with ``tfds``' data-source API, which works without
TensorFlow. They are built once into ``tfds_dir`` (default ``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``; e.g. ``<tfds_dir>/sklearn_digits/1.0.0/``) on first use and reused
afterwards. A prepared MNIST copy is reused even if ``data_dir`` later points at other files;
delete ``<tfds_dir>/mnist_idx`` to rebuild.

Pipeline (shared by both datasets):

* Each split is loaded into memory as numpy arrays (the datasets are small).
* Normalisation: pixels are divided by the dataset's maximum raw value (16 or 255, recorded
  in the TFDS metadata) and then standardised per channel with the mean/std of the *train*
  examples actually loaded (i.e. after ``limit_train``), applied identically to test.
  Output images are float32 NHWC, labels int32.
* :func:`train_batches`: a fresh permutation per epoch drawn from ``(seed, epoch)`` only, so
  resuming at epoch ``e`` reproduces exactly the batches of an uninterrupted run; the
  remainder that does not fill a batch is dropped (a different remainder each epoch).
* :func:`eval_batches`: every example exactly once, in order. By default the last batch is
  smaller; with ``pad=True`` every batch has ``batch_size`` rows (zero padding) and a boolean
  mask, which avoids a recompilation of a jitted eval step for the last batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from experiments.datasets import MnistIdx, SklearnDigits, find_mnist_files
from experiments.errors import DatasetError

logger = logging.getLogger(__name__)


class _NoDatasetInfoWarning(logging.Filter):
    """TFDS warns "Variant folder ... has no dataset_info.json" (through absl) before every
    first build: expected for a dataset not built yet, and nothing a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "has no dataset_info.json" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoDatasetInfoWarning())

DEFAULT_TFDS_DIR = "~/tensorflow_datasets"

# Public dataset name -> TFDS builder class.
DATASETS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "digits": SklearnDigits,
    "mnist": MnistIdx,
}

# Examples fetched per data-source call: batched reads are ~5x faster than one-by-one
# indexing, and chunking bounds the list of decoded dicts held at once.
_READ_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class Split:
    """One split held in memory.

    Attributes:
      images: float32 array (N, H, W, C), normalised. Read-only, so batches that are views
        cannot corrupt the split.
      labels: int32 array (N,). Read-only.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"images must be NHWC, got shape {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(
                f"labels shape {self.labels.shape} does not match {len(self.images)} images"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_examples(self) -> int:
        """Number of examples in the split."""
        return len(self.labels)


def _resolve_tfds_dir(tfds_dir: str | os.PathLike | None) -> str:
    if tfds_dir is None:
        tfds_dir = os.environ.get("TFDS_DATA_DIR", DEFAULT_TFDS_DIR)
    return os.path.abspath(os.path.expanduser(os.fspath(tfds_dir)))


def _check_name(name: str) -> type[tfds.core.GeneratorBasedBuilder]:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def prepare_builder(
    name: str = "digits",
    *,
    data_dir: str | os.PathLike | None = None,
    tfds_dir: str | os.PathLike | None = None,
) -> tfds.core.DatasetBuilder:
    """Returns the TFDS builder for ``name``, building the dataset first if needed.

    Args:
      name: ``"digits"`` or ``"mnist"``.
      data_dir: Folder with the MNIST IDX files (required to build ``"mnist"``; when given it
        must exist and hold the four files even if a prepared copy exists, so a typo is never
        hidden by the cache). Ignored, with a warning, for ``"digits"``.
      tfds_dir: Where prepared TFDS datasets live (default ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``). Created if missing.

    Returns:
      A prepared builder whose ``as_data_source()`` reads the array_record files.

    Raises:
      ValueError: Unknown ``name``, or ``"mnist"`` not yet prepared and no ``data_dir``.
      FileNotFoundError: ``data_dir`` or one of the MNIST files is missing.
    """
    builder_cls = _check_name(name)
    tfds_dir = _resolve_tfds_dir(tfds_dir)
    download_config = None
    if builder_cls is MnistIdx:
        if data_dir is not None:
            data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
            find_mnist_files(data_dir)  # Raises FileNotFoundError naming the missing path.
            download_config = tfds.download.DownloadConfig(manual_dir=data_dir)
    elif data_dir is not None:
        logger.warning("data_dir=%r is ignored for the embedded %r dataset", data_dir, name)

    builder = _open(builder_cls, tfds_dir)
    if builder.is_prepared():
        return builder
    if builder_cls is MnistIdx and download_config is None:
        raise ValueError(
            f"MNIST is not prepared in {tfds_dir!r}; pass data_dir=<folder with the IDX files> "
            "to build it.\n" + MnistIdx.MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    os.makedirs(tfds_dir, exist_ok=True)
    # Two runs started together (a DEQ and its baseline) would both build the dataset and the
    # second would fail renaming its copy into place: build under a lock, re-check after it.
    with _build_lock(os.path.join(tfds_dir, f".{builder.name}.build.lock")):
        builder = _open(builder_cls, tfds_dir)
        if builder.is_prepared():
            return builder
        logger.info("Building TFDS dataset %s into %s", builder.name, builder.data_dir)
        # TFDS prints "Downloading and preparing dataset ..." to stdout: nothing is
        # downloaded here (the builders read local files), so keep our one line instead.
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(download_config=download_config,
                                         file_format="array_record")
    return builder


def _open(builder_cls, tfds_dir: str):
    """The builder of ``builder_cls`` in ``tfds_dir``; a folder whose metadata does not
    parse (a build stopped mid-write) is named with the way to rebuild it."""
    try:
        builder = builder_cls(data_dir=tfds_dir, file_format="array_record")
        builder.is_prepared()
        return builder
    except Exception as e:  # TFDS raises protobuf, JSON and OS errors here
        folder = os.path.join(tfds_dir, builder_cls.name, str(builder_cls.VERSION))
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DatasetError(
            f"the TFDS dataset {builder_cls.name!r} in {folder} is damaged ({first}), e.g. by "
            f"a build that was stopped. Delete that folder (rm -rf {folder}) and rerun: it is "
            "rebuilt from its source.") from None


@contextlib.contextmanager
def _build_lock(path: str):
    """An exclusive inter-process lock (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the build is then not safe to run concurrently.
        fcntl = None
    if fcntl is None:
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            who = f"process {holder}" if holder.isdigit() else "another process"
            logger.warning(
                "waiting for %s, which is building this dataset (it holds %s). If that "
                "process is stopped (Ctrl-Z), resume it (fg) or end it; this run then goes "
                "on.", who, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_split(
    builder: tfds.core.DatasetBuilder, split: str, *, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a prepared split into memory through the TFDS data source.

    Args:
      builder: A prepared builder (see :func:`prepare_builder`).
      split: Split name, e.g. ``"train"`` or ``"test"``.
      limit: If given, read only the first ``limit`` examples (in stored order).

    Returns:
      ``(images, labels)``: raw ``uint8`` (N, H, W, C) and ``int64`` (N,).

    Raises:
      ValueError: If ``split`` does not exist or ``limit`` is not positive.
    """
    available = sorted(builder.info.splits.keys())
    if not available:
        raise DatasetError(_damaged(builder, "it has no splits"))
    if split not in available:
        raise ValueError(f"Dataset {builder.name!r} has no split {split!r}; available: {available}")
    try:
        return _read_records(builder, split, limit)
    except (ValueError, OSError, RuntimeError) as e:
        if isinstance(e, ValueError) and str(e).startswith("limit must be"):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DatasetError(_damaged(builder, f"reading its {split!r} split failed: {first}")) \
            from None


def _damaged(builder, problem: str) -> str:
    return (f"the TFDS dataset {builder.name!r} in {builder.data_dir} is damaged ({problem}), "
            f"e.g. by a build that was stopped. Delete that folder (rm -rf "
            f"{builder.data_dir}) and rerun: it is rebuilt from its source.")


def _read_records(builder, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    source = builder.as_data_source(split=split)
    n = len(source)
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        n = min(n, limit)
    shape = builder.info.features["image"].shape
    images = np.empty((n, *shape), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int64)
    for start in range(0, n, _READ_CHUNK):
        indices = list(range(start, min(start + _READ_CHUNK, n)))
        records = source.__getitems__(indices)
        for i, record in zip(indices, records, strict=True):
            images[i] = record["image"]
            labels[i] = record["label"]
    return images, labels


def _channel_stats(raw: np.ndarray, max_value: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``raw / max_value`` over all examples and pixels.

    Args:
      raw: ``uint8`` array (N, H, W, C).
      max_value: The dataset's maximum raw pixel value.

    Returns:
      ``(mean, std)``, float64 arrays of shape (C,); a zero std (constant channel, e.g. a
      one-example smoke split) is replaced by 1 so normalising never divides by zero.
    """
    if raw.dtype != np.uint8 or raw.ndim != 4 or len(raw) == 0:
        raise ValueError(f"expected a non-empty uint8 NHWC array, got {raw.dtype} {raw.shape}")
    values = np.arange(256, dtype=np.float64) / max_value
    mean, std = [], []
    for c in range(raw.shape[-1]):
        # A 256-bin histogram gives exact moments without a float copy of every pixel.
        counts = np.bincount(raw[..., c].ravel(), minlength=256).astype(np.float64)
        m = counts @ values / counts.sum()
        var = counts @ (values - m) ** 2 / counts.sum()
        mean.append(m)
        std.append(np.sqrt(var) if var > 0 else 1.0)
    return np.asarray(mean), np.asarray(std)


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def load_dataset(
    name: str = "digits",
    *,
    data_dir: str | os.PathLike | None = None,
    tfds_dir: str | os.PathLike | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> tuple[Split, Split, dict[str, Any]]:
    """Loads, normalises and returns the train and test splits of a dataset.

    Args:
      name: ``"digits"`` (embedded default) or ``"mnist"``.
      data_dir: Folder with the MNIST IDX files (see :func:`prepare_builder`).
      tfds_dir: Where prepared TFDS datasets live; built there on first use.
      limit_train: Use only the first N train examples of the fixed split.
      limit_test: Use only the first N test examples of the fixed split.

    Returns:
      ``(train, test, info)`` where ``info`` has keys ``name``, ``tfds_name``, ``tfds_path``
      (folder of the prepared files), ``num_classes``, ``image_shape`` (H, W, C),
      ``max_value`` (raw pixel maximum), ``mean`` and ``std`` (per channel, in units of
      ``pixel / max_value``, from the loaded train examples), ``num_train``, ``num_test``.

    Raises:
      ValueError: Unknown name, bad limit, or unprepared MNIST without ``data_dir``.
      FileNotFoundError: A missing ``data_dir`` or MNIST file.
    """
    builder = prepare_builder(name, data_dir=data_dir, tfds_dir=tfds_dir)
    train_raw, train_labels = read_split(builder, "train", limit=limit_train)
    test_raw, test_labels = read_split(builder, "test", limit=limit_test)

    max_value = float(builder.info.metadata["max_value"])
    mean, std = _channel_stats(train_raw, max_value)
    # Raw pixels are uint8, so normalising is a per-channel lookup table: exact (computed in
    # float64) and several times faster than float arithmetic on every MNIST pixel.
    lut = (np.arange(256, dtype=np.float64)[None, :] / max_value - mean[:, None]) / std[:, None]
    lut = lut.astype(np.float32)
    channels = np.arange(train_raw.shape[-1])

    def normalise(raw: np.ndarray) -> np.ndarray:
        return _readonly(lut[channels, raw])

    train = Split(normalise(train_raw), _readonly(train_labels.astype(np.int32)))
    test = Split(normalise(test_raw), _readonly(test_labels.astype(np.int32)))
    info = {
        "name": name,
        "tfds_name": builder.name,
        "tfds_path": os.fspath(builder.data_dir),
        "num_classes": builder.info.features["label"].num_classes,
        "image_shape": tuple(int(d) for d in builder.info.features["image"].shape),
        "max_value": max_value,
        "mean": tuple(float(m) for m in mean),
        "std": tuple(float(s) for s in std),
        "num_train": len(train),
        "num_test": len(test),
    }
    return train, test, info


def steps_per_epoch(split: Split, batch_size: int) -> int:
    """Number of full training batches per epoch (the remainder is dropped).

    Args:
      split: The training split.
      batch_size: Examples per batch.

    Returns:
      ``len(split) // batch_size``.

    Raises:
      ValueError: If ``batch_size`` is not positive or exceeds the split size (an epoch
        would then have no batch at all).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size > len(split):
        raise ValueError(
            f"batch_size {batch_size} exceeds the {len(split)} training examples; "
            "with drop-remainder batching an epoch would be empty"
        )
    return len(split) // batch_size


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The example order for one epoch, a pure function of ``(seed, epoch)``.

    Args:
      num_examples: Size of the split.
      seed: Non-negative experiment seed.
      epoch: Non-negative epoch index.

    Returns:
      A permutation of ``range(num_examples)``. Reproducible for a given NumPy version
      (NumPy does not promise identical ``Generator`` streams across versions).
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    # SeedSequence mixes both words, so nearby (seed, epoch) pairs give unrelated streams and
    # no epoch's order depends on how many batches earlier epochs consumed.
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(num_examples)


def train_batches(
    split: Split, batch_size: int, *, seed: int, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields one epoch of shuffled training batches.

    Args:
      split: The training split.
      batch_size: Examples per batch; the final partial batch is dropped.
      seed: Experiment seed.
      epoch: Epoch index; the order depends only on ``(seed, epoch)``, so a run resumed at
        epoch ``e`` sees the same batches as an uninterrupted one (to resume mid-epoch, skip
        the already-consumed steps with ``itertools.islice``).

    Returns:
      An iterator of ``steps_per_epoch(split, batch_size)`` pairs ``(images, labels)``:
      float32 (batch_size, H, W, C) and int32 (batch_size,), fresh copies.
    """
    steps = steps_per_epoch(split, batch_size)
    order = epoch_permutation(len(split), seed=seed, epoch=epoch)

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            yield split.images[idx], split.labels[idx]

    # Arguments are validated eagerly (above), not on the first next().
    return generate()


def eval_batches(
    split: Split, batch_size: int, *, pad: bool = False
) -> Iterator[tuple[np.ndarray, ...]]:
    """Yields every example exactly once, in order, for evaluation.

    Args:
      split: The split to evaluate.
      batch_size: Examples per batch.
      pad: If False, yield ``(images, labels)`` and let the last batch be smaller. If True,
        yield ``(images, labels, mask)`` with every batch exactly ``batch_size`` rows: the
        last one is padded with copies of its last example, and ``mask`` (bool) is False on
        padding rows, so a jitted eval step sees a single shape. Copies of a real example
        leave what the batch's solve reports (steps, worst residual, convergence) as it is
        without them; zero images would join the solve as examples of their own.

    Returns:
      An iterator of ``ceil(len(split) / batch_size)`` batches. Unpadded batches are
      read-only views of the split.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    def generate() -> Iterator[tuple[np.ndarray, ...]]:
        for start in range(0, len(split), batch_size):
            images = split.images[start : start + batch_size]
            labels = split.labels[start : start + batch_size]
            if not pad:
                yield images, labels
                continue
            n = len(labels)
            mask = np.zeros((batch_size,), dtype=bool)
            mask[:n] = True
            if n < batch_size:
                rows = np.concatenate([np.arange(n), np.full(batch_size - n, n - 1)])
                images, labels = images[rows], labels[rows]
            yield images, labels, mask

    return generate()

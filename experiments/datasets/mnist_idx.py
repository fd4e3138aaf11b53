"""TFDS builder for MNIST read from the four standard gzip IDX files in a local folder.

The folder is passed as the TFDS *manual dir*
(``tfds.download.DownloadConfig(manual_dir=...)``); nothing is downloaded. Expected files
(an already-gunzipped copy without the ``.gz`` suffix is accepted too)::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   (60000 examples)
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    (10000 examples)

Examples keep the order of the files (``disable_shuffling=True``, keys ``0..n-1``), so the
first N examples of a split are the first N of the official files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from experiments.datasets.idx import read_idx_images, read_idx_labels

MNIST_MAX_VALUE = 255
MNIST_IMAGE_SHAPE = (28, 28)

# split -> (images file, labels file), without the .gz suffix.
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put the four MNIST IDX files in one folder and pass it as data_dir / manual_dir:
    mkdir -p ~/data/mnist && cd ~/data/mnist
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte \\
             t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
      curl -fLO {MNIST_URL}$f.gz
    done
(The original host, http://yann.lecun.com/exdb/mnist/, serves the same files but often
refuses automated downloads.)"""


def find_mnist_files(data_dir: str | os.PathLike) -> dict[str, tuple[Path, Path]]:
    """Locates the four MNIST IDX files in ``data_dir``.

    Args:
      data_dir: Folder holding the files.

    Returns:
      ``{"train": (images_path, labels_path), "test": (images_path, labels_path)}``.

    Raises:
      FileNotFoundError: If the folder or any of the files is missing (the message names the
        path and says how to get the files).
    """
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"MNIST data_dir {str(folder)!r} does not exist or is not a directory.\n"
            + MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    found: dict[str, tuple[Path, Path]] = {}
    missing = []
    for split, names in MNIST_FILES.items():
        paths = []
        for name in names:
            candidates = [folder / f"{name}.gz", folder / name]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                missing.append(str(candidates[0]))
            paths.append(path)
        found[split] = (paths[0], paths[1])
    if missing:
        raise FileNotFoundError(
            "MNIST file(s) not found: " + ", ".join(missing) + "\n" + MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    return found


def read_mnist_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads and cross-checks one split's images and labels.

    Args:
      images_path: IDX images file (magic 0x803).
      labels_path: IDX labels file (magic 0x801).

    Returns:
      ``(images uint8 (N, 28, 28), labels uint8 (N,))``.

    Raises:
      ValueError: On a malformed file, an unexpected image size, a count mismatch between
        images and labels, or a label outside 0..9.
    """
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if images.ndim != 3 or images.shape[1:] != MNIST_IMAGE_SHAPE or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (N, 28, 28), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{labels_path}: {labels.shape} labels for {len(images)} images in {images_path}"
        )
    if len(labels) and labels.max() > 9:
        raise ValueError(f"{labels_path}: label {labels.max()} outside 0..9")
    return images, labels


class MnistIdx(tfds.core.GeneratorBasedBuilder):
    """MNIST from local IDX files as a TFDS dataset (``mnist_idx``)."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds derives code_path via a lazy `importlib_resources` import that fails on Python
    # >= 3.9 without that backport (tensorflow/datasets#11212); it only locates an optional
    # checksums.tsv next to this file, so point it here directly.
    code_path = Path(__file__)
    RELEASE_NOTES = {"1.0.0": "Official train/test files, file order, raw uint8 pixels."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        # See SklearnDigits._info for why DatasetInfo is built directly.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # Tensor rather than Image: Image encodes PNG, whose codec may need TF.
                    "image": tfds.features.Tensor(
                        shape=(*MNIST_IMAGE_SHAPE, 1),
                        dtype=np.uint8,
                        minimum=0,
                        maximum=MNIST_MAX_VALUE,
                    ),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://yann.lecun.com/exdb/mnist/",
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(max_value=MNIST_MAX_VALUE),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        # Resolve every file before generating anything so a missing one fails fast.
        files = find_mnist_files(dl_manager.manual_dir)
        return {
            split: self._generate_examples(images_path, labels_path)
            for split, (images_path, labels_path) in files.items()
        }

    def _generate_examples(self, images_path: Path, labels_path: Path):
        images, labels = read_mnist_split(images_path, labels_path)
        for key in range(len(labels)):
            yield key, {"image": images[key][..., None], "label": int(labels[key])}

"""Local TFDS dataset builders (array_record, no TensorFlow needed) for the experiments.

Importing this package registers ``sklearn_digits`` and ``mnist_idx`` with TFDS, so after
preparation they can also be read with ``tfds.data_source(name, data_dir=...)``. The normal
entry point is :mod:`experiments.data`.
"""

from experiments.datasets.idx import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    read_idx,
    read_idx_images,
    read_idx_labels,
    write_idx,
)
from experiments.datasets.mnist_idx import (
    MNIST_FILES,
    MNIST_MAX_VALUE,
    MnistIdx,
    find_mnist_files,
    read_mnist_split,
)
from experiments.datasets.sklearn_digits import (
    DIGITS_MAX_VALUE,
    SklearnDigits,
    digits_split_indices,
)

__all__ = [
    "DIGITS_MAX_VALUE",
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
    "MNIST_FILES",
    "MNIST_MAX_VALUE",
    "MnistIdx",
    "SklearnDigits",
    "digits_split_indices",
    "find_mnist_files",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "read_mnist_split",
    "write_idx",
]

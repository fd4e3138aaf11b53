"""TFDS builder for scikit-learn's bundled 8x8 handwritten digits (no network needed).

Source: ``sklearn.datasets.load_digits`` -- 1797 greyscale 8x8 images of the digits 0-9 (the
UCI "Optical Recognition of Handwritten Digits" test set), pixel values are counts 0..16.

Fixed split: a stratified 80/20 train/test split by
``sklearn.model_selection.train_test_split(test_size=0.2, stratify=labels, random_state=0)``,
giving 1437 train and 360 test examples. Within each split the examples are stored in the
order returned by that call (``disable_shuffling=True`` and keys ``0..n-1``), so "the first N
examples" of a split is well defined and the same on every machine. Changing anything in
the split procedure must bump ``VERSION`` so stale prepared copies are not reused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

# Raw pixel values are counts of "on" pixels in 4x4 blocks of a 32x32 bitmap, hence 0..16.
DIGITS_MAX_VALUE = 16
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def digits_split_indices() -> dict[str, np.ndarray]:
    """Returns the fixed train/test indices into ``load_digits()``.

    Returns:
      ``{"train": int array (1437,), "test": int array (360,)}``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train_idx, test_idx = train_test_split(
        np.arange(len(target)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=target,
        random_state=DIGITS_SPLIT_SEED,
    )
    return {"train": train_idx, "test": test_idx}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn 8x8 digits as a local TFDS dataset (``sklearn_digits``)."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds derives code_path via a lazy `importlib_resources` import that fails on Python
    # >= 3.9 without that backport (tensorflow/datasets#11212); it only locates an optional
    # checksums.tsv next to this file, so point it here directly.
    code_path = Path(__file__)
    RELEASE_NOTES = {"1.0.0": "Stratified 80/20 split, random_state=0; raw 0..16 uint8 pixels."}

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo is built directly (not via dataset_info_from_configs) because that helper
        # expects a per-dataset folder with README/CITATIONS files next to the builder.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # Tensor rather than Image: Image encodes PNG, whose codec may need TF.
                    "image": tfds.features.Tensor(
                        shape=(8, 8, 1), dtype=np.uint8, minimum=0, maximum=DIGITS_MAX_VALUE
                    ),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
            # Keep generation order so the fixed split order (and limit=N prefixes) is stable.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(max_value=DIGITS_MAX_VALUE),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Everything is bundled with scikit-learn.
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images
        if images.min() < 0 or images.max() > DIGITS_MAX_VALUE:
            raise ValueError(
                f"load_digits() pixels outside 0..{DIGITS_MAX_VALUE}: "
                f"[{images.min()}, {images.max()}]"
            )
        images = images.astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int64)
        return {
            split: self._generate_examples(images[idx], labels[idx])
            for split, idx in digits_split_indices().items()
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        # Keys 0..n-1 in split order: with disable_shuffling tfds stores examples sorted by key.
        for key, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield key, {"image": image, "label": int(label)}

"""Real image datasets that ship offline, written as ImageFolder PNGs: the recipe benchmark's settings.

- Fashion-MNIST (Debian's `dataset-fashion-mnist`): 28x28 grey product photos, 10 classes.
- digits (scikit-learn's `load_digits`, the UCI handwritten digits): 8x8 grey, 10 classes, 1,797 images;
  flipping changes the class, and the native size is far below any model input size.
- faces (scikit-image's `lfw_subset`): 25x25 grey crops of real photos, face vs not a face, 200 images.

Each writer produces `<out>/train/<class>/<i>.png` and `<out>/test/<class>/<i>.png` (a seeded stratified
split where the source has no official one) and returns the counts.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from distcls import DistclsError, storage
from distcls.tools.config import FashionMnistConfig

DIGIT_NAMES = [str(i) for i in range(10)]


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def stratified_test_rows(labels: np.ndarray, test_size: int, seed: int) -> np.ndarray:
    """A boolean mask of `test_size` rows, stratified by label (seeded)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        test[rows[: int(round(test_size * len(rows) / len(labels)))]] = True
    return test


def write_arrays(out: str, images: np.ndarray, labels: np.ndarray, names: list[str], test: np.ndarray) -> dict:
    """uint8 [N,H,W] grey images -> ImageFolder PNGs under out/train and out/test."""

    def objects():
        for i, (image, label) in enumerate(zip(images, labels)):
            split = "test" if test[i] else "train"
            yield storage.join_uri(out, split, names[int(label)], f"{i}.png"), _png(image)

    storage.write_many(objects(), workers=8)
    return {"train": int((~test).sum()), "test": int(test.sum()), "classes": len(names)}


def write_digits(out: str, test_size: int = 500, seed: int = 0) -> dict:
    """scikit-learn's handwritten digits (8x8, values 0-16) as 8-bit PNGs: ~1,300 train / 500 test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DistclsError("recipe data: the digits need scikit-learn; pip install scikit-learn") from None
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    return write_arrays(out, images, labels, DIGIT_NAMES, stratified_test_rows(labels, test_size, seed))


def write_faces(out: str, test_size: int = 60, seed: int = 0) -> dict:
    """scikit-image's LFW subset: 100 faces and 100 non-face crops of real photos (25x25 grey)."""
    try:
        from skimage import data
    except ImportError:
        raise DistclsError("recipe data: the faces need scikit-image; pip install scikit-image") from None
    images = np.round(np.clip(data.lfw_subset(), 0, 1) * 255).astype(np.uint8)
    labels = np.array([1] * 100 + [0] * 100, dtype=np.int64)  # the first 100 are faces
    return write_arrays(out, images, labels, ["face", "other"], stratified_test_rows(labels, test_size, seed))


def write_fashion_mnist_subset(out: str, train_per_class: int, test_per_class: int | None) -> dict:
    from distcls.tools.fmnist import write_fashion_mnist

    write_fashion_mnist(FashionMnistConfig(out=out, limit_per_class=train_per_class, splits=("train",)), progress=False)
    write_fashion_mnist(FashionMnistConfig(out=out, limit_per_class=test_per_class, splits=("test",)), progress=False)
    return {"train": 10 * train_per_class, "test": 10 * (test_per_class or 1000), "classes": 10}

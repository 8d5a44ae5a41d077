"""Fashion-MNIST (the official IDX files) -> PNGs in an ImageFolder layout in any storage URI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pathlib
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from distcls import DistclsError, storage
from distcls.tools.config import FASHION_MNIST_DEFAULT_DIR, FashionMnistConfig

# The ten official class names (index order), made filesystem-safe.
CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
OFFICIAL_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# MD5 of the official .gz downloads (from the Fashion-MNIST README) ...
GZ_MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
# ... and of their uncompressed content, which also holds for repacked copies such as Debian's.
RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
MARKER = "fashion-mnist.json"


def find_file(folder: str, name: str) -> str | None:
    for candidate in (name + ".gz", name, name.replace("-idx", ".idx")):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def read_idx_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def parse_idx(raw: bytes, where: str) -> np.ndarray:
    """IDX format: 2 zero bytes, dtype code 0x08 (uint8), ndim, big-endian uint32 dims, data."""
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DistclsError(f"fashion-mnist: {where} is not a uint8 IDX file; point --source at the official files")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise DistclsError(f"fashion-mnist: {where} has {len(raw)} bytes, expected {expected}; the file is damaged")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def download(folder: str) -> str:
    """Fetch the four official .gz files into `folder`, checking each MD5."""
    os.makedirs(folder, exist_ok=True)
    for name, md5 in GZ_MD5.items():
        path = os.path.join(folder, name + ".gz")
        if os.path.isfile(path) and hashlib.md5(pathlib.Path(path).read_bytes()).hexdigest() == md5:
            continue
        url = DOWNLOAD_URL + name + ".gz"
        try:
            data = urllib.request.urlopen(url, timeout=60).read()
        except OSError as exc:
            raise DistclsError(
                f"fashion-mnist: cannot download {url} ({exc}); install Debian's dataset-fashion-mnist "
                "or pass --source DIR with the IDX files"
            ) from None
        if hashlib.md5(data).hexdigest() != md5:
            raise DistclsError(f"fashion-mnist: {url} failed its MD5 check; try again later")
        with open(path + ".part", "wb") as f:
            f.write(data)
        os.replace(path + ".part", path)
    return folder


def locate_source(cfg: FashionMnistConfig) -> str:
    explicit = cfg.resolved_source()
    if explicit:
        if not os.path.isdir(explicit):
            raise DistclsError(f"fashion-mnist: source folder {explicit} does not exist; fix --source or $DISTCLS_DATA_DIR")
        return explicit
    if find_file(FASHION_MNIST_DEFAULT_DIR, FILES["train"][0]):
        return FASHION_MNIST_DEFAULT_DIR
    cache = os.path.join(os.path.expanduser("~/.cache/distcls"), "fashion-mnist")
    return download(cache)


def load_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels uint8 [N]) of one split, content checked against the official MD5s."""
    arrays = []
    for name in FILES[split]:
        path = find_file(folder, name)
        if path is None:
            raise DistclsError(f"fashion-mnist: {name}(.gz) not found in {folder}; point --source at the official files")
        raw = read_idx_bytes(path)
        if hashlib.md5(raw).hexdigest() != RAW_MD5[name]:
            raise DistclsError(f"fashion-mnist: {path} does not match the official {name} (MD5); use the official files")
        arrays.append(parse_idx(raw, path))
    images, labels = arrays
    return images, labels


def select(labels: np.ndarray, limit_per_class: int | None) -> np.ndarray:
    """Indexes to write: the first `limit_per_class` of each class in file order (all when None)."""
    if limit_per_class is None:
        return np.arange(len(labels))
    keep = [np.flatnonzero(labels == c)[:limit_per_class] for c in range(len(CLASS_NAMES))]
    return np.sort(np.concatenate(keep))


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def iter_objects(
    out: str, split: str, images: np.ndarray, labels: np.ndarray, indexes: np.ndarray
) -> Iterator[tuple[str, bytes]]:
    for i in indexes:
        yield storage.join_uri(out, split, CLASS_NAMES[labels[i]], f"{i}.png"), encode_png(images[i])


def write_fashion_mnist(cfg: FashionMnistConfig, progress: bool = True) -> dict:
    """Write the PNGs, then a marker (URI/fashion-mnist.json) that says the copy is complete."""
    source = locate_source(cfg)
    storage.ensure_bucket(cfg.out)
    marker_uri = storage.join_uri(cfg.out, MARKER)
    storage.remove(marker_uri)  # an interrupted rewrite must not look complete
    started = time.perf_counter()
    counts: dict[str, dict[str, int]] = {}
    for split in cfg.splits:
        images, labels = load_split(source, split)
        indexes = select(labels, cfg.limit_per_class)
        counts[split] = {CLASS_NAMES[c]: int((labels[indexes] == c).sum()) for c in range(len(CLASS_NAMES))}
        with tqdm(total=len(indexes), desc=f"fashion-mnist {split}", unit="img", disable=not progress) as bar:
            storage.write_many(iter_objects(cfg.out, split, images, labels, indexes), workers=cfg.workers, on_done=bar.update)
    summary = {
        "dataset": "fashion-mnist",
        "source": source,
        "out": cfg.out,
        "limit_per_class": cfg.limit_per_class,
        "classes": list(CLASS_NAMES),
        "official_names": list(OFFICIAL_NAMES),
        "counts": counts,
        "total": sum(sum(c.values()) for c in counts.values()),
        "seconds": round(time.perf_counter() - started, 2),
    }
    storage.write_text(marker_uri, json.dumps(summary, indent=2))
    return summary


def existing_copy(out: str) -> dict | None:
    """The marker of a complete earlier copy at `out`, or None."""
    uri = storage.join_uri(out, MARKER)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None

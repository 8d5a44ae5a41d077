"""Labeled data as the commands read it: one split, per-object or packed, behind one surface.

`open_labeled(uri)` recognises packed data first (a `distcls pack` by its `_dataset.json`, Parquet written by the
`datasets` library, WebDataset tars: distcls.packed) and reads one of its splits; anything else is an ImageFolder
prefix or a manifest, listed on the driver into a LabeledIndex (distcls.datasets), as before. Both answer what the
commands need: `class_names`, `len`, `counts()`, `dataset(spec, ...)` (the lazy Ray Dataset of build_dataset's
columns), `sample_bytes(n)` / `sample_images(spec)` (a few encoded or decoded images: the recipe's native-size
probe, the runtime's compile check) and `iter_decoded(spec)` (decoded batches, for the small in-process tools).
For packed data the driver holds metadata only: class counts from `_dataset.json` (or one aggregating pass), a
few images from the first shard, never a per-image list.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from distcls import DistclsError, objects, storage
from distcls.datasets import LabeledIndex, build_dataset, decode_sample, load_images, load_labeled_index
from distcls.images import ImageDecodeError
from distcls.packed import PackedSet, open_packed
from distcls.packed_format import WDS_IMAGE_KEYS
from distcls.transforms import PreprocessSpec, preprocess_bytes

# Which split of packed data a command reads: the first of these the set has.
TRAIN_SPLITS = ("train",)
TEST_SPLITS = ("test", "val", "train")  # evaluate, compare: the held-out test split first
HELD_OUT_SPLITS = ("val", "test", "train")  # calibrate, soup, --val-data, export --sample
DECODE_ROWS = 256  # images decoded per in-process batch (iter_decoded on per-object data)


@dataclass
class ObjectSplit:
    """Per-object data: an ImageFolder prefix or a manifest, its paths and labels listed on the driver."""

    index: LabeledIndex
    is_packed = False

    @property
    def source(self) -> str:
        return self.index.source

    @property
    def class_names(self) -> list[str]:
        return self.index.class_names

    @property
    def ignored(self) -> list[str]:
        return self.index.ignored

    @property
    def split(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self.index)

    def counts(self) -> dict[str, int]:
        return self.index.counts()

    def dataset(
        self,
        spec: PreprocessSpec,
        train: bool = False,
        shuffle_seed: int | None = None,
        max_bytes: int | None = None,
        path_stages: tuple = (),
    ):
        return build_dataset(
            self.index, spec, train=train, shuffle_seed=shuffle_seed, max_bytes=max_bytes, path_stages=path_stages
        )

    def sample_bytes(self, n: int = 16, max_bytes: int | None = None) -> list[bytes]:
        """Up to `n` encoded images spread over the listing (unreadable ones left out)."""
        out = []
        for path in self.index.paths[:: max(1, len(self.index) // n)][:n]:
            try:
                out.append(objects.read_object(path, max_bytes))
            except (DistclsError, OSError):
                continue
        return out

    def sample_images(self, spec: PreprocessSpec, n: int = 16, max_bytes: int | None = None) -> np.ndarray | None:
        return decode_sample(self.index.paths, spec, n, max_bytes=max_bytes)

    def iter_decoded(self, spec: PreprocessSpec, max_bytes: int | None = None) -> Iterator[dict]:
        """build_dataset's batches, decoded in this process in listing order (no Ray)."""
        for start in range(0, len(self.index), DECODE_ROWS):
            rows = slice(start, start + DECODE_ROWS)
            batch = {"path": np.asarray(self.index.paths[rows], dtype=object), "label": np.asarray(self.index.labels[rows])}
            yield load_images(batch, spec, max_bytes=max_bytes)

    def limit_per_class(self, n: int | None) -> ObjectSplit:
        """The first `n` images of each class in listing order (all with None)."""
        if n is None:
            return self
        seen: dict[int, int] = {}
        rows = []
        for i, label in enumerate(self.index.labels):
            if seen.get(label, 0) < n:
                seen[label] = seen.get(label, 0) + 1
                rows.append(i)
        return ObjectSplit(self.index.subset(np.asarray(rows, dtype=np.int64)))


@dataclass
class PackedSplit:
    """One split of packed data: metadata on the driver, rows streamed from the shards by Ray Data."""

    packed: PackedSet
    split: str
    ignored: list[str] = field(default_factory=list)
    is_packed = True

    @property
    def source(self) -> str:
        return f"{self.packed.source} ({self.split} split)"

    @property
    def class_names(self) -> list[str]:
        return self.packed.class_names

    def __len__(self) -> int:
        self._ray_for_counts()
        return self.packed.num_rows(self.split)

    def counts(self) -> dict[str, int]:
        self._ray_for_counts()
        return self.packed.counts(self.split)

    def _ray_for_counts(self) -> None:
        """Sets without stored counts (HF Parquet, WebDataset) are counted by a Ray Data pass over the labels:
        on the local instance distcls starts, not one Ray Data would start with its own defaults."""
        if self.packed.kind != "distcls":
            from distcls.runtime import init_ray

            init_ray()

    def other(self, split: str) -> PackedSplit | None:
        """Another split of the same set (e.g. its `val`), or None when it has none."""
        return PackedSplit(self.packed, split) if split in self.packed.splits else None

    def dataset(self, spec: PreprocessSpec, train: bool = False, shuffle_seed: int | None = None, max_bytes: int | None = None):
        return self.packed.dataset(self.split, spec, train=train, shuffle_seed=shuffle_seed, max_bytes=max_bytes)

    def sample_bytes(self, n: int = 16, max_bytes: int | None = None) -> list[bytes]:
        """The encoded images of the split's first `n` rows: its first shard, the next ones only while it has fewer."""
        read = first_wds_images if self.packed.kind == "webdataset" else first_parquet_images
        blobs: list[bytes] = []
        for shard in self.packed.shards(self.split):
            if len(blobs) >= n:
                break
            blobs += read(shard.uri, n - len(blobs), self.packed.image_column)
        return [b for b in blobs if b and (max_bytes is None or len(b) <= max_bytes)]

    def sample_images(self, spec: PreprocessSpec, n: int = 16, max_bytes: int | None = None) -> np.ndarray | None:
        images = []
        for blob in self.sample_bytes(n, max_bytes):
            try:
                images.append(preprocess_bytes(blob, spec))
            except ImageDecodeError:
                continue
        return np.stack(images) if images else None

    def iter_decoded(self, spec: PreprocessSpec, max_bytes: int | None = None) -> Iterator[dict]:
        """build_dataset's batches from Ray Data, in shard order (preserve_order: the same rows on every run)."""
        from distcls.runtime import init_ray

        init_ray()
        ds = self.dataset(spec, max_bytes=max_bytes)
        ds.context.execution_options.preserve_order = True
        yield from ds.iter_batches(batch_size=DECODE_ROWS, batch_format="numpy")

    def limit_per_class(self, n: int | None) -> PackedSplit:
        return self  # packed data is limited while it streams (see limit_batches)


LabeledSplit = ObjectSplit | PackedSplit


def open_labeled(
    uri: str,
    class_names: list[str] | None = None,
    splits: tuple[str, ...] = TRAIN_SPLITS,
    data_names: list[str] | None = None,
) -> LabeledSplit:
    """The labeled data at `uri`: the first of `splits` that packed data has, else an ImageFolder prefix or a
    manifest. `class_names`: the index order the labels must follow (e.g. a checkpoint's); `data_names`: the
    names of the data's own label integers where it does not store them (a WebDataset without classes.txt)."""
    packed = open_packed_split(uri, splits, class_names, data_names)
    if packed is not None:
        return packed
    return ObjectSplit(load_labeled_index(uri, class_names if class_names is not None else data_names))


def open_packed_split(
    uri: str, splits: tuple[str, ...], class_names: list[str] | None = None, data_names: list[str] | None = None
) -> PackedSplit | None:
    """The first of `splits` that the packed data at `uri` has; None when `uri` is not packed data."""
    packed = open_packed(uri, list(data_names) if data_names else None)
    if packed is None:
        return None
    packed.with_class_names(class_names)
    name = next((s for s in splits if s in packed.splits), None)
    if name is None:
        raise DistclsError(
            f"data: {uri} is packed data with split(s) {', '.join(packed.splits)}; this reads {' or '.join(splits)}: "
            "pack it with that split"
        )
    return PackedSplit(packed, name)


def as_split(data: LabeledSplit | LabeledIndex) -> LabeledSplit:
    """A LabeledIndex (the per-object lists callers still build) as a split; a split as it is."""
    return ObjectSplit(data) if isinstance(data, LabeledIndex) else data


def limit_batches(batches: Iterator[dict], per_class: int | None, num_classes: int) -> Iterator[dict]:
    """The rows of `batches` up to the first `per_class` of each label (error rows count for their label), and
    no further batch once every class is full."""
    if per_class is None:
        yield from batches
        return
    taken = np.zeros(num_classes + 1, dtype=np.int64)  # the last slot: rows without a valid label
    for batch in batches:
        labels = np.where((batch["label"] >= 0) & (batch["label"] < num_classes), batch["label"], num_classes)
        keep = np.zeros(len(labels), dtype=bool)
        for i, label in enumerate(labels):
            if taken[label] < per_class:
                taken[label] += 1
                keep[i] = True
        if keep.any():
            yield {k: np.asarray(v)[keep] for k, v in batch.items()}
        if (taken[:num_classes] >= per_class).all():
            return


def first_parquet_images(uri: str, n: int, image_column: str) -> list[bytes]:
    import pyarrow.parquet as pq

    fs, path = storage.get_filesystem(uri)
    with storage.storage_errors(uri), fs.open(path, "rb") as f:
        batch = next(pq.ParquetFile(f).iter_batches(batch_size=n, columns=[image_column]), None)
    if batch is None:
        return []
    return [b for b in batch.column(0).field("bytes").to_pylist()[:n] if b]


def first_wds_images(uri: str, n: int, _image_column: str = "") -> list[bytes]:
    """The image members of the first samples of a WebDataset tar, read as a stream (the rest is not read)."""
    fs, path = storage.get_filesystem(uri)
    out = []
    with storage.storage_errors(uri), fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if len(out) >= n:
                break
            if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in WDS_IMAGE_KEYS:
                reader = tar.extractfile(member)
                if reader is not None:
                    out.append(reader.read())
    return out

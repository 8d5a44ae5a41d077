"""Packed labeled data -> streaming Ray Datasets: distcls packs, Hugging Face `datasets` Parquet, WebDataset tars.

`open_packed(uri)` recognises (a) a `distcls pack` output (`_dataset.json` beside Parquet shards), (b) Parquet
written by the `datasets` library (an Image and a ClassLabel feature in the `huggingface` schema metadata; one
file or a folder of them) and (c) WebDataset tar shards (`cls` + `jpg`/`png`/... members). Anything else is
None: the caller falls back to an ImageFolder prefix or a manifest. What is cheap is checked at open time on the
driver (every shard exists; every Parquet footer reads, has rows and the expected columns); the driver reads
shard metadata only, never a per-image list (`paths_and_labels` is the one per-image escape hatch).

`PackedSet.dataset(split, spec)` yields the batches `distcls.datasets.build_dataset` yields: image uint8
[N,3,S,S] (via transforms.preprocess_bytes), label int64, path str, error str ("" or "kind: message"; an image
that fails to decode is an error row, never an exception). The sample id of a row is its `path`: the original
object's path (Parquet `image.path`); WebDataset samples are `<shard uri>#<__key__>`, and a Parquet row without a
stored path is `<shard uri>#sha256:<16 hex digits of its bytes>`.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from distcls import DistclsError, storage
from distcls.datasets import DECODE_CPUS, ROWS_PER_BLOCK
from distcls.packed_format import (
    DATASET_JSON,
    META_THREADS,
    PACK_FORMAT,
    SPLIT_NAMES,
    ShardInfo,
    decode_parquet_batch,
    decode_wds_batch,
    fallback_id,
    image_and_label_columns,
    parse_cls,
    read_footers,
    read_hf_features,
    split_of,
)
from distcls.transforms import PreprocessSpec

__all__ = ["PackedSet", "ShardInfo", "open_packed"]

SEARCH_DIRS = ("data", "default", *SPLIT_NAMES)  # folders searched for shards below a prefix (two levels down)


class PackedSet:
    """Packed labeled data by split: metadata on the driver, images streamed by `dataset` in Ray Data tasks."""

    def __init__(self, source, kind, shards, names, image_column="image", label_column="label", counts=None):
        self.source, self.kind = source, kind  # kind: distcls, hf-parquet or webdataset
        self._shards: dict[str, list[ShardInfo]] = shards
        self._names: list[str] | None = names  # None: WebDataset without class names (the integers, found by a pass)
        self.image_column, self.label_column = image_column, label_column
        self._raw: dict[str, Counter] | None = counts  # split -> Counter(stored label -> rows)
        self._remap: np.ndarray | None = None  # stored label -> index in the caller's class names

    sample_id = "path"  # the column that identifies a row: the original object's path

    @property
    def class_names(self) -> list[str]:
        if self._names is None:
            top = max((max(c, default=-1) for c in self._raw_counts().values()), default=-1)
            self._names = [str(i) for i in range(top + 1)]
        return list(self._names)

    @property
    def splits(self) -> list[str]:
        return list(self._shards)

    def split(self, name: str) -> str:
        canonical = SPLIT_NAMES.get(name, name)
        if canonical not in self._shards:
            raise DistclsError(f"packed: {self.source} has no split {name!r}; it has {', '.join(self._shards)}")
        return canonical

    def shards(self, split: str) -> list[ShardInfo]:
        return list(self._shards[self.split(split)])

    def num_rows(self, split: str) -> int:
        shards = self.shards(split)
        if all(s.rows is not None for s in shards):
            return sum(s.rows for s in shards)
        return sum(self._raw_counts()[self.split(split)].values())

    def counts(self, split: str) -> dict[str, int]:
        """Rows per class name (labels outside the class names, error rows in `dataset`, are not counted)."""
        raw, names = self._raw_counts()[self.split(split)], self.class_names
        counts = dict.fromkeys(names, 0)
        for label, n in raw.items():
            index = label if self._remap is None else (self._remap[label] if 0 <= label < len(self._remap) else -1)
            if 0 <= index < len(names):
                counts[names[index]] += n
        return counts

    def with_class_names(self, class_names: list[str] | None) -> PackedSet:
        """Labels re-indexed to `class_names` (e.g. a validation set to the training set's classes)."""
        if class_names is None:
            return self
        if self._names is None:
            self._names = list(class_names)
            return self
        unknown = sorted(set(self._names) - set(class_names))
        if unknown:
            raise DistclsError(
                f"data: {self.source} has classes {unknown} that the training data does not; "
                f"known classes: {', '.join(class_names)}"
            )
        if list(self._names) != list(class_names):  # composed with an earlier re-indexing, if any
            index = {n: i for i, n in enumerate(class_names)}
            step = np.asarray([index[n] for n in self._names], dtype=np.int64)
            self._remap = step if self._remap is None else step[self._remap]
            self._names = list(class_names)
        return self

    def _raw_counts(self) -> dict[str, Counter]:
        if self._raw is None:  # HF Parquet and WebDataset without counts: one Ray Data pass over the labels
            self._raw = count_labels(self)
        return self._raw

    def _read(self, shards: list[ShardInfo], labels_only: bool = False, shuffle_seed: int | None = None):
        """A Ray Dataset of the stored rows of `shards` (with their file's path), or of their labels only."""
        import ray.data
        from ray.data import FileShuffleConfig

        fs, _ = storage.get_pyarrow_filesystem(shards[0].uri)
        paths = [storage.split_uri(s.uri)[1] for s in shards]
        shuffle = FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True) if shuffle_seed is not None else None
        if self.kind == "webdataset":
            select = (lambda name: name.endswith(".cls")) if labels_only else None
            return ray.data.read_webdataset(paths, filesystem=fs, decoder=None, fileselect=select, shuffle=shuffle)
        columns = [self.label_column] if labels_only else [self.image_column, self.label_column]
        # Ray 2.60's second Parquet reader (use_datasource_v2, the default) starts footer-reading actors on every
        # execution: seconds per epoch (measured 18-35 s against 1-2 s for 10 small shards on a loaded 2-core
        # machine). The first one reads footers in its read tasks, and honours FileShuffleConfig per execution too.
        ctx = ray.data.DataContext.get_current()
        v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        try:
            ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True, shuffle=shuffle)
        finally:
            ctx.use_datasource_v2 = v2
        return ds.select_columns([*columns, "path"])  # pushed down into the read: the other columns stay unread

    def dataset(
        self,
        split: str,
        spec: PreprocessSpec,
        train: bool = False,
        shuffle_seed: int | None = None,
        max_bytes: int | None = None,
    ):
        """A lazy Ray Dataset of `split`: one row per stored sample, preprocessed in Ray Data tasks.

        With `shuffle_seed`, the shard order is permuted per execution (Ray Data's FileShuffleConfig with
        reseed_after_execution): epoch e of a dataset reads its shards in an order fixed by (seed, e)."""
        kw = {
            "spec": spec,
            "train": train,
            "max_bytes": max_bytes,
            "remap": self._remap,
            "num_classes": len(self.class_names),
            "scheme": storage.split_uri(self.source)[0],
        }
        if self.kind == "webdataset":
            fn, fmt = decode_wds_batch, "pandas"
        else:
            fn, fmt = decode_parquet_batch, "pyarrow"
            kw |= {"image_column": self.image_column, "label_column": self.label_column}
        return self._read(self.shards(split), shuffle_seed=shuffle_seed).map_batches(
            fn, fn_kwargs=kw, batch_size=ROWS_PER_BLOCK, batch_format=fmt, num_cpus=DECODE_CPUS
        )

    def paths_and_labels(self, split: str) -> tuple[list[str], list[int]]:
        """PER IMAGE, on the driver: every sample id and its label index. Only for small-data tools; jobs that
        read a whole split use `dataset`, which streams."""
        if self.kind == "webdataset":
            rows = sorted(wds_labels(self._read(self.shards(split), labels_only=True), storage.split_uri(self.source)[0]))
            ids, labels = [r[0] for r in rows], [r[1] for r in rows]
        else:
            with ThreadPoolExecutor(max_workers=META_THREADS) as pool:
                parts = list(pool.map(self._shard_ids, self.shards(split)))
            ids, labels = [i for p in parts for i in p[0]], [x for p in parts for x in p[1]]
        if self._remap is not None:
            labels = [int(self._remap[x]) if 0 <= x < len(self._remap) else -1 for x in labels]
        return ids, labels

    def _shard_ids(self, shard: ShardInfo) -> tuple[list[str], list[int]]:
        import pyarrow.parquet as pq

        fs, path = storage.get_filesystem(shard.uri)
        with storage.storage_errors(shard.uri), fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=[f"{self.image_column}.path", self.label_column])
            paths = table.column(0).to_pylist()
            if any(not p for p in paths):
                blobs = pq.read_table(f, columns=[f"{self.image_column}.bytes"]).column(0).to_pylist()
                paths = [p or fallback_id(shard.uri, b) for p, b in zip(paths, blobs)]
        return paths, [-1 if x is None else int(x) for x in table.column(1).to_pylist()]


def wds_labels(ds, scheme: str) -> list[tuple[str, int]]:
    def rows(batch):
        ids = [f"{storage.to_uri(scheme, u)}#{k}" for u, k in zip(batch["__url__"], batch["__key__"])]
        cls = batch["cls"] if "cls" in batch.columns else [None] * len(batch)
        labels = [-1 if (x := parse_cls(v)) is None else x for v in cls]
        return {"id": np.asarray(ids, dtype=object), "label": np.asarray(labels, dtype=np.int64), "url": batch["__url__"]}

    out = ds.map_batches(rows, batch_format="pandas").take_all()
    return [(r["id"], int(r["label"]), r["url"]) for r in out]


def count_labels(packed: PackedSet) -> dict[str, Counter]:
    """split -> Counter(stored label -> rows): one Ray Data pass over the label column (or `.cls` members) of every
    shard, tallied in the tasks; the driver gets (file, label, count) rows."""
    import pandas as pd

    split_of = {storage.split_uri(s.uri)[1]: split for split in packed.splits for s in packed._shards[split]}
    wds = packed.kind == "webdataset"
    file_column, label_column = ("__url__", "cls") if wds else ("path", packed.label_column)

    def tally(batch: pd.DataFrame) -> pd.DataFrame:
        labels = [parse_cls(v) for v in batch[label_column]] if wds and label_column in batch else batch.get(label_column)
        labels = pd.Series(labels if labels is not None else [None] * len(batch), index=batch.index).fillna(-1).astype("int64")
        counts = pd.DataFrame({"file": batch[file_column], "label": labels}).value_counts().reset_index(name="n")
        return counts

    counts: dict[str, Counter] = {split: Counter() for split in packed.splits}
    rows = packed._read([s for split in packed.splits for s in packed._shards[split]], labels_only=True)
    for row in rows.map_batches(tally, batch_format="pandas").take_all():
        counts[split_of[row["file"]]][int(row["label"])] += int(row["n"])
    return counts


# --- recognising packed data ------------------------------------------------------------------------------


def open_packed(uri: str, class_names: list[str] | None = None) -> PackedSet | None:
    """The packed data at `uri` (see the module's doc), or None when it is not packed data."""
    if uri.lower().endswith((".parquet", ".tar")):
        if not storage.exists(uri):
            return None
        files = [uri]
        root = uri.rsplit("/", 1)[0]
    else:
        root = uri.rstrip("/")
        if storage.exists(storage.join_uri(root, DATASET_JSON)):
            meta = read_json(storage.join_uri(root, DATASET_JSON))
            if meta.get("format") == PACK_FORMAT:
                return open_distcls(root, meta).with_class_names(class_names)
        files = find_shard_files(root)
    parquet = [f for f in files if f.lower().endswith(".parquet")]
    if parquet:
        found = open_hf_parquet(root, parquet)
    elif files:
        found = open_webdataset(root, [f for f in files if f.lower().endswith(".tar")])
    else:
        return None
    return found.with_class_names(class_names) if found is not None else None


def read_json(uri: str) -> dict:
    try:
        meta = json.loads(storage.read_text(uri))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DistclsError(f"packed: {uri} is not valid JSON ({exc}); re-pack the data or fix the file") from None
    if not isinstance(meta, dict):
        raise DistclsError(f"packed: {uri} holds a {type(meta).__name__}, not a JSON object; re-pack the data or fix the file")
    return meta


def find_shard_files(root: str) -> list[str]:
    """.parquet/.tar files at `root` and in its split-named (or data/) folders, two levels down at most: a
    bounded look, so that an ImageFolder prefix of a million images costs one listing request."""
    fs, base = storage.get_filesystem(root)
    scheme = storage.split_uri(root)[0]
    found, folders = [], [(base, 0)]
    while folders:
        folder, depth = folders.pop()
        with storage.storage_errors(root):
            entries = fs.ls(folder, detail=True) if fs.isdir(folder) else []
        for e in entries:
            name = posixpath.basename(e["name"].rstrip("/"))
            if name.startswith(("_", ".")):
                continue
            if e["type"] == "directory" and depth < 2 and name.lower() in SEARCH_DIRS:
                folders.append((e["name"], depth + 1))
            elif e["type"] != "directory" and name.lower().endswith((".parquet", ".tar")):
                found.append(storage.to_uri(scheme, e["name"]))
    return sorted(found)


def by_split(root: str, shards: list[ShardInfo]) -> dict[str, list[ShardInfo]]:
    out: dict[str, list[ShardInfo]] = {}
    for s in shards:
        rel = s.uri[len(root) :] if s.uri.startswith(root) else posixpath.basename(s.uri)
        out.setdefault(split_of(rel), []).append(s)
    return dict(sorted(out.items(), key=lambda kv: ("train", "val", "test").index(kv[0])))


def open_distcls(root: str, meta: dict) -> PackedSet:
    """A `distcls pack` output: every shard of `_dataset.json` exists and its footer agrees with it."""
    where = storage.join_uri(root, DATASET_JSON)
    names = meta.get("class_names")
    if not isinstance(names, list) or not isinstance(meta.get("splits"), dict):
        raise DistclsError(f"packed: {where} lacks class_names or splits; it is not a complete distcls pack")
    listed = [(split, s) for split, info in meta["splits"].items() for s in info.get("shards", [])]
    footers = read_footers([storage.join_uri(root, s["name"]) for _split, s in listed])
    shards: dict[str, list[ShardInfo]] = {}
    for (split, s), footer in zip(listed, footers):
        _image, _label, stored = image_and_label_columns(footer)
        if stored != names:
            raise DistclsError(
                f"packed: class names of {footer.uri} ({', '.join(map(str, stored or []))}) disagree with {where} "
                f"({', '.join(names)}); re-pack the data"
            )
        if footer.rows != s.get("rows"):
            raise DistclsError(f"packed: {footer.uri} has {footer.rows} rows, {where} says {s.get('rows')}; re-pack the data")
        shards.setdefault(SPLIT_NAMES.get(split, split), []).append(ShardInfo(footer.uri, footer.rows, footer.bytes))
    index = {n: i for i, n in enumerate(names)}
    counts = {SPLIT_NAMES.get(k, k): Counter({index[c]: n for c, n in v["counts"].items()}) for k, v in meta["splits"].items()}
    return PackedSet(root, "distcls", shards, list(names), counts=counts)


def open_hf_parquet(root: str, files: list[str]) -> PackedSet | None:
    """Parquet written by `datasets` (Image + ClassLabel features); None for Parquet without them (a manifest)."""
    footers = read_footers(files)
    if not any(read_hf_features(f.schema) for f in footers):
        return None
    image, label, names = image_and_label_columns(footers[0])
    for footer in footers[1:]:
        other = image_and_label_columns(footer)
        if other != (image, label, names):
            raise DistclsError(
                f"packed: {footer.uri} has columns/classes {other[:2]} {other[2]} unlike {footers[0].uri} "
                f"{(image, label)} {names}; one set needs one schema"
            )
    shards = by_split(root, [ShardInfo(f.uri, f.rows, f.bytes) for f in footers])
    return PackedSet(root, "hf-parquet", shards, names, image, label)


def open_webdataset(root: str, files: list[str]) -> PackedSet:
    """WebDataset tars; class names from classes.txt or _dataset.json beside them, else given or the integers."""
    names = None
    for name in ("classes.txt", DATASET_JSON):
        where = storage.join_uri(root, name)
        if names is None and storage.exists(where):
            text = storage.read_text(where)
            names = [n.strip() for n in text.splitlines() if n.strip()] if name == "classes.txt" else None
            if name == DATASET_JSON:
                names = read_json(where).get("class_names")
    sizes = []
    for uri in files:
        fs, path = storage.get_filesystem(uri)
        with storage.storage_errors(uri):
            sizes.append(fs.size(path))
        if not sizes[-1]:
            raise DistclsError(f"packed: WebDataset shard {uri} is empty (0 bytes); remove it or write it again")
    shards = by_split(root, [ShardInfo(u, None, n) for u, n in zip(files, sizes)])
    return PackedSet(root, "webdataset", shards, list(names) if names else None)

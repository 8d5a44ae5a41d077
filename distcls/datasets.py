"""Ray Data builders: ImageFolder prefixes and manifests -> streaming datasets of uint8 images.

Listing happens on the driver (paths and labels only); bytes are read, decoded and preprocessed in Ray
Data tasks, block by block, so nothing is downloaded in full first. Every input object yields exactly
one row: `error` is "" for a good image and "kind: message" for one that could not be used (its
`image` is zeros). Consumers drop and count error rows with `ErrorTally`.

Batch columns: image uint8 [N,3,S,S] (S = image_size; resize_size for training bases), label int64 [N],
path str [N], error str [N].
"""

from __future__ import annotations

import io
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from distcls import DistclsError, objects, storage
from distcls.images import IMAGE_EXTENSIONS, ImageDecodeError
from distcls.transforms import PreprocessSpec, preprocess_bytes

MANIFEST_EXTENSIONS = (".csv", ".parquet", ".jsonl", ".json")
ROWS_PER_BLOCK = 128  # paths per Ray Data block: small enough to stream, large enough to amortise a task
READ_THREADS = 8  # concurrent object reads per task: hides object-store latency
# Logical CPUs per decode task. Half a CPU: reads overlap with decoding, and a value unlike the model
# actors' keeps Ray Data from fusing decoding into those actors, where it would not run in parallel.
DECODE_CPUS = 0.5


@dataclass
class LabeledIndex:
    """Paths and integer labels of a labeled split, with the class names in index order."""

    paths: list[str]
    labels: list[int]
    class_names: list[str]
    source: str = ""
    ignored: list[str] = field(default_factory=list)  # files skipped at listing (not image extensions)

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.class_names)}

    def subset(self, rows: np.ndarray) -> LabeledIndex:
        return LabeledIndex([self.paths[i] for i in rows], [self.labels[i] for i in rows], self.class_names, self.source)


def class_index(names: list[str]) -> dict[str, int]:
    """The deterministic class map: sorted names -> 0..K-1 (numeric names sort numerically)."""
    key = (lambda n: (0, int(n), n)) if all(n.lstrip("-").isdigit() for n in names) else (lambda n: (1, 0, n))
    return {name: i for i, name in enumerate(sorted(set(names), key=key))}


def list_image_folder(uri: str, class_names: list[str] | None = None) -> LabeledIndex:
    """`uri/<class>/**/<image>`: the class is the first folder below `uri` (torchvision's ImageFolder)."""
    root = uri.rstrip("/")
    paths, names, ignored = [], [], []
    for path in storage.list_files(root):
        rel = path[len(root) :].lstrip("/")
        if "/" not in rel or not path.lower().endswith(IMAGE_EXTENSIONS):
            ignored.append(path)
            continue
        paths.append(path)
        names.append(rel.split("/", 1)[0])
    if not paths:
        raise DistclsError(
            f"data: no images found under {uri}; expected {uri.rstrip('/')}/<class>/<image> "
            f"with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    return _index(paths, names, class_names, uri, ignored)


def _index(
    paths: list[str], names: list[str], class_names: list[str] | None, source: str, ignored: list[str] | None = None
) -> LabeledIndex:
    if class_names is None:
        mapping = class_index(names)
        class_names = list(mapping)
    else:
        mapping = {n: i for i, n in enumerate(class_names)}
        unknown = sorted(set(names) - set(mapping))
        if unknown:
            raise DistclsError(
                f"data: {source} has classes {unknown} that the training data does not; known classes: {', '.join(class_names)}"
            )
    return LabeledIndex(paths, [mapping[n] for n in names], list(class_names), source, ignored or [])


def read_manifest(uri: str, class_names: list[str] | None = None) -> LabeledIndex:
    """CSV, Parquet or JSONL with `path` and `label` columns; relative paths resolve against its folder."""
    table = _read_table(uri)
    missing = [c for c in ("path", "label") if c not in table.column_names]
    if missing:
        raise DistclsError(
            f"data: manifest {uri} lacks column(s) {', '.join(missing)} (has {', '.join(table.column_names)}); "
            "it needs `path` and `label`"
        )
    base = uri.rsplit("/", 1)[0]
    paths, names = [], []
    for row, (p, label) in enumerate(zip(table.column("path").to_pylist(), table.column("label").to_pylist())):
        if not p or label is None or str(label) == "":
            raise DistclsError(f"data: manifest {uri} row {row + 1} has an empty path or label; fix or drop that row")
        paths.append(p if "://" in p or p.startswith("/") else storage.join_uri(base, p))
        names.append(str(label))
    if not paths:
        raise DistclsError(f"data: manifest {uri} has no rows")
    return _index(paths, names, class_names, uri)


def _read_table(uri: str):
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri)
    ext = posixpath.splitext(uri.lower())[1]
    try:
        if ext == ".csv":
            return pacsv.read_csv(
                io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types={"path": "string", "label": "string"})
            )
        if ext == ".parquet":
            return pq.read_table(io.BytesIO(data))
        return pajson.read_json(io.BytesIO(data))
    except Exception as exc:
        raise DistclsError(
            f"data: cannot parse manifest {uri} ({str(exc).splitlines()[0]}); "
            "write CSV with a header, Parquet, or one JSON object per line"
        ) from None


def load_labeled_index(uri: str, class_names: list[str] | None = None) -> LabeledIndex:
    """A manifest file (by extension) or an ImageFolder prefix."""
    if uri.lower().endswith(MANIFEST_EXTENSIONS):
        return read_manifest(uri, class_names)
    return list_image_folder(uri, class_names)


def stratified_split(index: LabeledIndex, val_fraction: float, seed: int = 0) -> tuple[LabeledIndex, LabeledIndex]:
    """Per class, a seeded shuffle puts round(fraction * n) images (>= 1 when n >= 2) into validation."""
    if not 0 < val_fraction < 1:
        raise DistclsError(f"data: --val-fraction {val_fraction} must be between 0 and 1 (exclusive)")
    rng = np.random.default_rng(seed)
    labels = np.asarray(index.labels)
    train_rows, val_rows = [], []
    for c in range(len(index.class_names)):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_val = 0 if len(rows) < 2 else max(1, int(round(val_fraction * len(rows))))
        val_rows.append(rows[:n_val])
        train_rows.append(rows[n_val:])
    train = np.sort(np.concatenate(train_rows))
    val = np.sort(np.concatenate(val_rows))
    return index.subset(train), index.subset(val)


def format_counts(index: LabeledIndex, title: str = "") -> str:
    """Per-class counts, one line each, and the imbalance ratio (largest / smallest class)."""
    counts = index.counts()
    width = max(len(n) for n in counts)
    lines = [f"{title or index.source}: {len(index)} images, {len(counts)} classes"]
    lines += [f"  {name:<{width}}  {n:>7}" for name, n in counts.items()]
    nonzero = [n for n in counts.values() if n]
    if nonzero:
        lines.append(f"  imbalance (largest/smallest class): {max(nonzero) / min(nonzero):.2f}")
    if index.ignored:
        lines.append(f"  ignored {len(index.ignored)} non-image file(s), e.g. {index.ignored[0]}")
    return "\n".join(lines)


# --- Ray Data --------------------------------------------------------------------------------------------


def decode_sample(paths: list[str], spec: PreprocessSpec, n: int = 16, max_bytes: int | None = None) -> np.ndarray | None:
    """Up to `n` decoded images spread evenly over `paths` (e.g. the real inputs of a compile check), or None."""
    if not len(paths):
        return None
    picks = np.linspace(0, len(paths) - 1, num=min(n, len(paths))).astype(int)
    batch = load_images({"path": np.asarray([paths[i] for i in picks], dtype=object)}, spec, max_bytes=max_bytes)
    ok = np.array([not e for e in batch["error"]], dtype=bool)
    return batch["image"][ok] if ok.any() else None


def load_images(
    batch: dict[str, np.ndarray], spec: PreprocessSpec, train: bool = False, max_bytes: int | None = None
) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: read + decode + preprocess each path; never raises for a bad object.

    Reads go through objects.read_object: a non-regular file is a `not_a_file` row, an object over
    `max_bytes` (None: objects.DEFAULT_MAX_OBJECT_BYTES) a `too_large` row."""
    paths = batch["path"]
    preset = batch.get("error")  # rows that arrive with an error (e.g. a file name that is not UTF-8) stay so

    def one(i_path: tuple[int, str]) -> tuple[np.ndarray | None, str]:
        i, path = i_path
        if preset is not None and preset[i]:
            return None, str(preset[i])
        try:
            data = objects.read_object(path, max_bytes)
        except objects.ObjectReadError as exc:
            return None, exc.row
        except DistclsError as exc:
            return None, f"read_error: {exc}"
        except MemoryError:
            return None, "too_large: reading the object needs more memory than this worker could get"
        try:
            return preprocess_bytes(data, spec, train=train), ""  # MemoryError there is a too_large error
        except ImageDecodeError as exc:
            return None, str(exc)

    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(paths)))) as pool:
        results = list(pool.map(one, enumerate(paths)))
    size = spec.resize_size if train else spec.image_size
    images = np.zeros((len(paths), 3, size, size), dtype=np.uint8)
    errors = np.empty(len(paths), dtype=object)
    for i, (img, err) in enumerate(results):
        if img is not None:
            images[i] = img
        errors[i] = err
    out = {"image": images, "path": np.asarray(paths, dtype=object), "error": errors}
    if "label" in batch:
        out["label"] = np.asarray(batch["label"], dtype=np.int64)
    return out


def build_dataset(
    index: LabeledIndex,
    spec: PreprocessSpec,
    train: bool = False,
    shuffle_seed: int | None = None,
    max_bytes: int | None = None,
    path_stages: tuple = (),
):
    """A lazy Ray Dataset over `index`: one row per object, images preprocessed in Ray Data tasks.

    With `shuffle_seed`, file order is shuffled once on the driver (cheap: paths only) before streaming.
    `path_stages`: (function, kwargs) pairs run as map_batches over the {path, label} blocks before any object
    is read (the training run's per-epoch shuffle and its resume filter).
    """
    order = np.arange(len(index))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(index))
    items = [{"path": index.paths[i], "label": index.labels[i]} for i in order]
    return build_image_dataset(items, spec, train, max_bytes=max_bytes, path_stages=path_stages)


def build_path_dataset(items: list[dict]):
    """Rows {"path"[, "label"]} -> a Ray Dataset of those rows, ROWS_PER_BLOCK rows per block."""
    import ray.data

    return ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // ROWS_PER_BLOCK)))


def build_image_dataset(
    items: list[dict], spec: PreprocessSpec, train: bool = False, max_bytes: int | None = None, path_stages: tuple = ()
):
    """Rows {"path"[, "label"]} -> a lazy Ray Dataset of preprocessed images (read + decode in tasks)."""
    ds = build_path_dataset(items)
    for fn, kwargs in path_stages:
        ds = ds.map_batches(fn, fn_kwargs=kwargs, batch_size=None, batch_format="numpy", num_cpus=DECODE_CPUS)
    return ds.map_batches(
        load_images,
        fn_kwargs={"spec": spec, "train": train, "max_bytes": max_bytes},
        batch_size=ROWS_PER_BLOCK,
        batch_format="numpy",
        num_cpus=DECODE_CPUS,
    )


@dataclass
class ErrorTally:
    """Counts the error rows a consumer dropped and keeps the first few paths, for reports."""

    count: int = 0
    by_kind: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    keep: int = 5

    def drop_errors(self, batch: dict) -> dict:
        """Return the batch without its error rows, counting them. Works on numpy or torch batches."""
        errors = batch["error"]
        bad = np.fromiter((bool(e) for e in errors), dtype=bool, count=len(errors))
        if not bad.any():
            return batch
        for path, err in zip(np.asarray(batch["path"])[bad], np.asarray(errors)[bad]):
            self.count += 1
            self.by_kind[err.split(":", 1)[0]] += 1
            if len(self.examples) < self.keep:
                self.examples.append(f"{path} ({err})")
        good = np.flatnonzero(~bad)
        return {k: (v[good] if not isinstance(v, list) else [v[i] for i in good]) for k, v in batch.items()}

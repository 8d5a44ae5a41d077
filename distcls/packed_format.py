"""Packed shard formats, shared by the writer (pack.py) and the readers (packed.py): the schema of a distcls
shard (the Hugging Face `datasets` image convention: `image` struct{bytes, path}, `label` int64 with the ClassLabel
names in the `huggingface` schema metadata, plus width, height, sha256), Parquet footers read one by one with a
one-line error naming the file, and the Ray Data batch functions that turn stored rows into the batches
`distcls.datasets.build_dataset` yields (a bad row is an error row, never an exception).
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from distcls import DistclsError, storage
from distcls.images import IMAGE_EXTENSIONS, ImageDecodeError
from distcls.transforms import preprocess_bytes

DATASET_JSON = "_dataset.json"
PACK_FORMAT = "distcls-pack"
FORMAT_VERSION = 1
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val"}
SPLIT_NAMES |= {"test": "test", "testing": "test"}
WDS_IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
META_THREADS = 16  # concurrent footer reads at open time


def hf_features(class_names: list[str]) -> dict:
    """The `datasets` features of a distcls shard (what `Dataset.to_parquet` writes for these columns)."""
    return {
        "image": {"_type": "Image"},
        "label": {"names": list(class_names), "_type": "ClassLabel"},
        "width": {"dtype": "int32", "_type": "Value"},
        "height": {"dtype": "int32", "_type": "Value"},
        "sha256": {"dtype": "string", "_type": "Value"},
    }


def hf_schema_metadata(class_names: list[str]) -> dict[bytes, bytes]:
    return {b"huggingface": json.dumps({"info": {"features": hf_features(class_names)}}).encode()}


# Image bytes are stored as they are (already compressed); paths and the small columns compress well.
SHARD_COMPRESSION = {"image.bytes": "NONE", "image.path": "SNAPPY", "label": "SNAPPY", "width": "SNAPPY"}
SHARD_COMPRESSION |= {"height": "SNAPPY", "sha256": "NONE"}


def shard_table(blobs: list[bytes], paths: list[str], labels: list[int], widths: list[int], heights: list[int], class_names):
    """The rows of a distcls shard as an Arrow table, with its `datasets` features in the schema metadata."""
    import pyarrow as pa

    image = pa.StructArray.from_arrays([pa.array(blobs, pa.binary()), pa.array(paths, pa.string())], names=["bytes", "path"])
    columns = {
        "image": image,
        "label": pa.array(labels, pa.int64()),
        "width": pa.array(widths, pa.int32()),
        "height": pa.array(heights, pa.int32()),
        "sha256": pa.array([hashlib.sha256(b).hexdigest() for b in blobs], pa.string()),
    }
    return pa.table(columns).replace_schema_metadata(hf_schema_metadata(class_names))


def read_hf_features(schema) -> dict | None:
    """The `datasets` features stored in an Arrow schema's metadata, or None."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else None
    except (ValueError, KeyError, TypeError):
        return None
    return features if isinstance(features, dict) else None


def split_of(rel_path: str) -> str:
    """The split a file belongs to by its folder or file name (HF's keywords); "train" when none matches."""
    tokens = re.split(r"[/\-_.]", rel_path.lower())
    return next((SPLIT_NAMES[t] for t in tokens if t in SPLIT_NAMES), "train")


@dataclass(frozen=True)
class ShardInfo:
    uri: str
    rows: int | None  # None: not known without reading the shard (WebDataset before its count pass)
    bytes: int


@dataclass(frozen=True)
class ParquetFooter:
    uri: str
    rows: int
    bytes: int
    schema: object  # pyarrow.Schema


def read_footer(uri: str) -> ParquetFooter:
    """A Parquet file's footer (rows, schema) and size, or one DistclsError naming the file."""
    import pyarrow.parquet as pq

    fs, path = storage.get_filesystem(uri)
    try:
        size = fs.size(path)
        with fs.open(path, "rb", block_size=1 << 16) as f:
            pf = pq.ParquetFile(f)
            return ParquetFooter(uri, pf.metadata.num_rows, size, pf.schema_arrow)
    except FileNotFoundError:
        raise DistclsError(f"packed: shard {uri} does not exist; the set is incomplete (re-run the pack with --resume)") from None
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DistclsError(
            f"packed: {uri} is not a readable Parquet file ({first}); it is truncated or damaged: re-pack it or remove it"
        ) from None


def read_footers(uris: list[str]) -> list[ParquetFooter]:
    with ThreadPoolExecutor(max_workers=META_THREADS) as pool:
        return list(pool.map(read_footer, uris))


def image_and_label_columns(footer: ParquetFooter) -> tuple[str, str, list[str] | None]:
    """(image column, label column, ClassLabel names or None) of a `datasets` Parquet file, checked."""
    import pyarrow as pa

    features, schema = read_hf_features(footer.schema) or {}, footer.schema
    images = [k for k, v in features.items() if isinstance(v, dict) and v.get("_type") == "Image"]
    labels = [k for k, v in features.items() if isinstance(v, dict) and v.get("_type") == "ClassLabel"]
    label = "label" if "label" in labels or (not labels and "label" in schema.names) else (labels or [None])[0]
    image = "image" if "image" in images else (images or [None])[0]
    problem = None
    if image is None or label is None:
        problem = "no Image feature" if image is None else "no ClassLabel feature (nor an integer `label` column)"
    else:
        itype, ltype = schema.field(image).type if image in schema.names else None, schema.field(label).type
        if not (pa.types.is_struct(itype) and {"bytes", "path"} <= {itype.field(i).name for i in range(itype.num_fields)}):
            problem = f"column {image!r} is {itype}, not struct<bytes, path>"
        elif not pa.types.is_integer(ltype):
            problem = f"column {label!r} is {ltype}, not an integer"
    if problem:
        raise DistclsError(f"packed: {footer.uri} has the wrong schema ({problem}); expected an image struct and an int64 label")
    if footer.rows == 0:
        raise DistclsError(f"packed: shard {footer.uri} has 0 rows; remove it (or re-pack)")
    names = features[label].get("names") if label in features else None
    return image, label, list(names) if names is not None else None


def fallback_id(shard_uri: str, blob: bytes | None) -> str:
    return f"{shard_uri}#sha256:{hashlib.sha256(blob or b'').hexdigest()[:16]}"


# --- Ray Data batch functions (run in tasks) --------------------------------------------------------------


def decode_rows(blobs, labels, ids, spec, train, max_bytes, remap, num_classes) -> dict[str, np.ndarray]:
    """Stored bytes + labels -> the build_dataset batch; a bad row is an error row, never an exception."""
    size = spec.resize_size if train else spec.image_size
    images = np.zeros((len(ids), 3, size, size), dtype=np.uint8)
    out_labels = np.full(len(ids), -1, dtype=np.int64)
    errors = np.empty(len(ids), dtype=object)
    for i, (blob, label) in enumerate(zip(blobs, labels)):
        if remap is not None and label is not None and 0 <= label < len(remap):
            label = int(remap[label])
        errors[i] = ""
        if label is None or not 0 <= label < num_classes:
            errors[i] = f"bad_label: label {label} is not a class index 0..{num_classes - 1}"
            continue
        out_labels[i] = label
        if not blob:
            errors[i] = "empty: the row holds no image bytes"
        elif max_bytes is not None and len(blob) > max_bytes:
            errors[i] = f"too_large: {ids[i]} is {len(blob) / 2**20:.1f} MB, over the {max_bytes / 2**20:g} MB limit"
        else:
            try:
                images[i] = preprocess_bytes(blob, spec, train=train)
            except ImageDecodeError as exc:
                errors[i] = str(exc)
    return {"image": images, "label": out_labels, "path": np.asarray(ids, dtype=object), "error": errors}


def decode_parquet_batch(batch, image_column, label_column, scheme, **kw) -> dict[str, np.ndarray]:
    image = batch.column(image_column).combine_chunks()
    blobs = image.field("bytes").to_pylist()
    files = [storage.to_uri(scheme, f) for f in batch.column("path").to_pylist()]
    ids = [p or fallback_id(f, b) for p, f, b in zip(image.field("path").to_pylist(), files, blobs)]
    return decode_rows(blobs, batch.column(label_column).to_pylist(), ids, **kw)


def decode_wds_batch(batch, scheme, **kw) -> dict[str, np.ndarray]:
    keys = [k for k in WDS_IMAGE_KEYS if k in batch.columns]
    blobs = [next((r[k] for k in keys if isinstance(r[k], bytes)), None) for r in batch[keys].to_dict("records")]
    labels = [parse_cls(v) for v in (batch["cls"] if "cls" in batch.columns else [None] * len(batch))]
    ids = [f"{storage.to_uri(scheme, u)}#{k}" for u, k in zip(batch["__url__"], batch["__key__"])]
    return decode_rows(blobs, labels, ids, **kw)


def parse_cls(value) -> int | None:
    try:
        return int(value.decode("utf-8").strip()) if isinstance(value, bytes) else None
    except (UnicodeDecodeError, ValueError):
        return None

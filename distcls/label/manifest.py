"""What a labeling job lists: its `Source` (a prefix, or a manifest's keys), the `Lister`s (the plan's read
tasks), and the key lists a manifest can be: CSV, Parquet or JSONL (a `path` column of full URIs, or a `key`
column below --input), gzipped or not, read as a stream; or an S3 Inventory manifest.json (one lister per data
file). Nothing read here is trusted: the plan confines every path (label/confine.py) before it is read.
"""

from __future__ import annotations

import csv
import fnmatch
import gzip
import hashlib
import io
import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

from distcls import DistclsError, storage
from distcls.images import IMAGE_EXTENSIONS

BLOCK_ROWS = 10_000  # rows per batch when a manifest is read


@dataclass(frozen=True)
class Source:
    """What a job labels: everything under `input` (by extension, or `include`), or a manifest's keys."""

    input: str | None
    include: str | None = None
    manifest: str | None = None

    def wants(self, path: str) -> bool:
        if self.include:
            name = path.rsplit("/", 1)[-1]
            below = path[len(self.input.rstrip("/")) + 1 :] if self.input and path.startswith(self.input) else path
            return fnmatch.fnmatch(below, self.include) or fnmatch.fnmatch(name, self.include)
        return path.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Lister:
    """One read task of the plan: `kind` tree (everything below each uri), files (the files directly in uri),
    or manifest (a key list: format csv, parquet, jsonl, inventory-csv, inventory-parquet)."""

    kind: str
    uris: tuple[str, ...]
    format: str = ""

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps([self.kind, self.uris, self.format]).encode()).hexdigest()[:16]


# ---- key lists ----------------------------------------------------------------------------------------------


def manifest_listers(uri: str) -> list[Lister]:
    """A CSV, Parquet or JSONL key list (one lister), or an S3 Inventory manifest.json (one per data file)."""
    if uri.endswith("manifest.json"):
        return inventory_listers(uri)
    name = uri.lower().removesuffix(".gz")
    for ext, fmt in ((".csv", "csv"), (".parquet", "parquet"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl")):
        if name.endswith(ext):
            if not storage.exists(uri):
                raise DistclsError(f"label: --manifest {uri} does not exist; check the URI")
            return [Lister("manifest", (uri,), fmt)]
    raise DistclsError(
        f"label: --manifest {uri}: unknown format; give a .csv, .parquet or .jsonl key list "
        "(a path or key column) or an S3 Inventory manifest.json"
    )


def read_inventory(uri: str) -> tuple[str, str, list[str], list[str], str]:
    """An S3 Inventory manifest.json -> (format, destination bucket, data file keys, schema, source bucket)."""
    try:
        manifest = json.loads(storage.read_text(uri))
        fmt = manifest["fileFormat"].lower()
        dest = manifest["destinationBucket"].rsplit(":", 1)[-1]
        files = [f["key"] for f in manifest["files"]]
        schema = [c.strip() for c in manifest.get("fileSchema", "").split(",")]
        source_bucket = manifest["sourceBucket"]
        if not isinstance(source_bucket, str) or not source_bucket or "/" in source_bucket:
            raise ValueError(f"sourceBucket {source_bucket!r} is not a bucket name")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DistclsError(f"label: --manifest {uri} is not an S3 Inventory manifest.json ({exc!r}); check the file") from None
    if fmt not in ("csv", "parquet"):
        raise DistclsError(f"label: --manifest {uri}: inventory format {fmt!r} is not supported; use CSV or Parquet")
    return fmt, dest, files, schema, source_bucket


def inventory_listers(uri: str) -> list[Lister]:
    fmt, dest, files, schema, source_bucket = read_inventory(uri)
    # The schema rides in the format string so that each lister reads its file alone.
    detail = json.dumps({"schema": schema, "bucket": source_bucket})
    return [Lister("manifest", (f"s3://{dest}/{key}",), f"inventory-{fmt}:{detail}") for key in files]


def iter_manifest(uri: str, fmt: str, root: str | None) -> Iterator[str]:
    """Full URIs from a key list: a `path` column (full URIs), or a `key` column below --input."""
    if fmt.startswith("inventory-"):
        yield from iter_inventory(uri, fmt)
        return
    for column, values in iter_manifest_columns(uri, fmt):
        if column == "key" and not root:
            raise DistclsError(
                f"label: --manifest {uri} has a key column; give --input, the prefix the keys are "
                "under (or a path column of full URIs)"
            )
        for value in values:
            if value:
                yield storage.join_uri(root, value.lstrip("/")) if column == "key" else value


def iter_manifest_columns(uri: str, fmt: str) -> Iterator[tuple[str, list[str]]]:
    """(column name, values) per batch of a CSV / Parquet / JSONL key list, read as a stream: the first
    batch (what `source_root` reads) does not read the whole file."""
    fs, path = storage.get_filesystem(uri)
    with storage.storage_errors(uri), fs.open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if uri.endswith(".gz") else raw
        if stream is not raw and fmt == "parquet":  # the footer is at the end, where gzip cannot seek
            stream = io.BytesIO(stream.read())
        yield from manifest_batches(uri, fmt, stream)


def manifest_batches(uri: str, fmt: str, stream) -> Iterator[tuple[str, list[str]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        reader = pq.ParquetFile(stream)
        column = pick_column(uri, reader.schema_arrow.names)
        for batch in reader.iter_batches(columns=[column], batch_size=BLOCK_ROWS):
            yield column, batch.column(0).cast(pa.string()).to_pylist()
        return
    if fmt == "csv":
        rows = csv.reader(io.TextIOWrapper(stream, encoding="utf-8", newline=""))
        header = next(rows, None) or []
        column = pick_column(uri, [h.strip() for h in header])
        index = [h.strip() for h in header].index(column)
        batch: list[str] = []
        for row in rows:
            if len(row) > index:
                batch.append(row[index])
            if len(batch) >= BLOCK_ROWS:
                yield column, batch
                batch = []
        yield column, batch
        return
    batch, column = [], None
    for n, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DistclsError(f"label: --manifest {uri} line {n} is not JSON; fix the line") from None
        column = column or pick_column(uri, list(record))
        batch.append(record.get(column))
        if len(batch) >= BLOCK_ROWS:
            yield column, batch
            batch = []
    if column:
        yield column, batch


def pick_column(uri: str, names: list[str]) -> str:
    for name in ("path", "key"):
        if name in names:
            return name
    raise DistclsError(
        f"label: --manifest {uri} has no path or key column (columns: {', '.join(names) or 'none'}); "
        "name the column of URIs `path`, or of keys below --input `key`"
    )


def iter_inventory(uri: str, fmt: str) -> Iterator[str]:
    """Keys of one S3 Inventory data file (CSV: gzip, no header, URL-encoded keys; Parquet: bucket/key columns)."""
    import pyarrow.parquet as pq

    detail = json.loads(fmt.split(":", 1)[1])
    if fmt.startswith("inventory-parquet"):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["bucket", "key"])
        for bucket, key in zip(table.column("bucket").to_pylist(), table.column("key").to_pylist(), strict=True):
            if key and not key.endswith("/"):
                yield f"s3://{bucket}/{key}"
        return
    schema = [c.lower() for c in detail["schema"]]
    b, k = schema.index("bucket"), schema.index("key")
    data = storage.read_bytes(uri)
    text = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    for row in csv.reader(io.TextIOWrapper(io.BytesIO(text), encoding="utf-8", newline="")):
        key = urllib.parse.unquote_plus(row[k])
        if key and not key.endswith("/"):
            yield f"s3://{row[b]}/{key}"

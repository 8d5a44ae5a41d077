"""The labeling plan: which keys a job labels, listed page by page (or read from a manifest) by Ray Data read
tasks that feed the pipeline as they go, and kept under OUTPUT/_plan/ so that a rerun and `--status` read it
instead of listing again.

OUTPUT/_plan/ holds:
  _plan.json              what is listed (input, include, manifest) and by which listers; written first
  <lister>-<seq>.parquet  a shard of keys (columns path, error), written by the lister as it lists
  <lister>.done.json      that lister finished: its key and shard counts
The plan is complete when every lister has its done marker. A lister lists one top-level prefix of the input
(several when there are many), the files directly under the input, or one manifest file; listers run in
parallel and each streams its keys, so the driver never holds the key list and labeling starts with the
first page.

Nothing in a manifest or in OUTPUT/_plan is trusted: every path is confined (`confine`, vectorised on the
Arrow column) to the job's root before it can be read: --input; without it an S3 Inventory's sourceBucket,
or the scheme and bucket of a manifest's first path. A path outside gets an `outside_input` error row.
"""

from __future__ import annotations

import csv
import datetime as dt
import fnmatch
import gzip
import hashlib
import io
import json
import os
import posixpath
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from distcls import DistclsError, storage
from distcls.images import IMAGE_EXTENSIONS

PLAN_DIR = "_plan"
PLAN_META = "_plan.json"
# Ray Data holds a read task's output until it passes the dataset's target block size (128 MiB by default):
# the label dataset's target is BLOCK_BYTES, and a lister cuts a block (and a plan shard) just past it, so
# each block goes on as soon as it is listed (~16,000 keys of 80 bytes).
BLOCK_BYTES = 1 << 20
TEST_BLOCK_BYTES = 16 << 10  # with the test hook: blocks of a few hundred keys
BLOCK_ROWS = 10_000  # rows per batch when a manifest is read
MAX_LISTERS = 32  # top-level prefixes are grouped onto at most this many listers
MAX_TOP_LEVEL = 10_000  # a top level wider than this (a flat bucket) is listed by one lister, page by page
S3_PAGE = 1000  # keys per LIST request (the S3 maximum)
BAD_NAME = "bad_name: the file name is not valid UTF-8 (shown with \\x escapes); rename it to label it"
OUTSIDE = "outside_input"
DOT_SEGMENT = r"/\.\.?(/|$)"  # a `.` or `..` segment: such paths are normalised (in Python) before the check
# Test hook, not a user option: "1" makes each lister, after its first block, wait (up to HOLD_S) until the
# output has a part, so a test can see labeling start while listing runs. Read in the driver, passed on.
LIST_HOLD_ENV = "DISTCLS_TEST_LIST_HOLD"
HOLD_S = 120


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


def plan_dir(output: str) -> str:
    return storage.join_uri(output, PLAN_DIR)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ---- choosing the listers ---------------------------------------------------------------------------------


def make_listers(source: Source) -> list[Lister]:
    """The read tasks that list `source`: one per manifest file, else one per top-level prefix (grouped)."""
    if source.manifest:
        return manifest_listers(source.manifest)
    root = source.input.rstrip("/")
    scheme, path = storage.split_uri(root)
    with storage.storage_errors(root):
        if scheme == "file":
            dirs, has_files = top_level_local(path)
        elif scheme == "s3":
            dirs, has_files = top_level_s3(path)
        else:
            return [Lister("tree", (root,))]
    if dirs is None:  # too wide to split: one lister, page by page
        return [Lister("tree", (root,))]
    listers = [Lister("files", (root,))] if has_files else []
    groups = max(1, min(MAX_LISTERS, len(dirs)))
    chunk = -(-len(dirs) // groups) if dirs else 1
    listers += [Lister("tree", tuple(dirs[i : i + chunk])) for i in range(0, len(dirs), chunk)]
    return listers


def top_level_local(path: str) -> tuple[list[str] | None, bool]:
    if not os.path.exists(path):
        raise DistclsError(f"storage: {path} does not exist; check the path (nothing to list)")
    if not os.path.isdir(path):
        raise DistclsError(f"storage: {path} is a file, not a folder or prefix")
    dirs, has_files = [], False
    with os.scandir(path) as entries:
        for n, entry in enumerate(entries):
            if n >= MAX_TOP_LEVEL:
                return None, True
            if entry.is_dir(follow_symlinks=False):
                dirs.append(entry.path)
            else:
                has_files = True
    return sorted(dirs), has_files


def top_level_s3(path: str) -> tuple[list[str] | None, bool]:
    bucket, _, prefix = path.partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = storage.s3_client()
    dirs, has_files, seen = [], False, 0
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, Delimiter="/", PaginationConfig={"PageSize": S3_PAGE}
    )
    for page in pages:
        dirs += [f"s3://{bucket}/{p['Prefix'].rstrip('/')}" for p in page.get("CommonPrefixes", [])]
        has_files = has_files or bool(page.get("Contents"))
        seen += page.get("KeyCount", 0)
        if seen > MAX_TOP_LEVEL:
            return None, True
    if not dirs and not has_files and not storage.exists(f"s3://{path}"):
        raise DistclsError(f"storage: s3://{path} does not exist; check the path (nothing to list)")
    return dirs, has_files


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


# ---- confinement: the paths a job may read -----------------------------------------------------------------


def source_root(source: Source) -> str | None:
    """The prefix every path of the job must be under: --input; without it, an S3 Inventory's sourceBucket,
    or the scheme and bucket of a manifest's first path (any local path when that is local: one scheme); None
    when a manifest holds no path. An inventory with an --input outside its sourceBucket is refused. Cheap:
    the driver reads manifest.json, or a key list's first batch."""
    inventory = bool(source.manifest) and source.manifest.endswith("manifest.json")
    bucket = read_inventory(source.manifest)[4] if inventory else None
    if source.input:
        root = storage.to_uri(*storage.split_uri(source.input))
        if bucket and not root_prefix(root).startswith(f"s3://{bucket}/"):
            raise DistclsError(
                f"label: --input {source.input} is outside the S3 Inventory's sourceBucket s3://{bucket} "
                f"({source.manifest}); give an --input under s3://{bucket}, or leave --input out"
            )
        return root
    if bucket:
        return f"s3://{bucket}"
    listers = manifest_listers(source.manifest)
    first = next((p for lister in listers for p in iter_manifest(lister.uris[0], lister.format, None)), None)
    if first is None:
        return None
    scheme, path = storage.split_uri(first)
    return "/" if scheme == "file" else f"{scheme}://{path.split('/', 1)[0]}"


def root_prefix(root: str) -> str:
    """What every path under `root` starts with: 's3://b/in/' for s3://b/in, '/data/in/' for a local root."""
    scheme, path = storage.split_uri(root)
    return path.rstrip("/") + "/" if scheme == "file" else f"{scheme}://{path}/"


def paths_under_root(paths, root: str) -> np.ndarray:
    """Which of `paths` (an Arrow string column) are under `root`, segment by segment (s3://b/in does not
    admit s3://b/input2/x), as a bool array. Arrow compute does the work; the rare path with a `.` or `..`
    segment is normalised (with duplicate slashes) in Python and must stay below the root too. A local root
    admits absolute paths and file:// URIs only (a relative path would resolve against a worker's folder)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    paths = pa.chunked_array([paths]) if isinstance(paths, pa.Array) else paths
    prefix = root_prefix(root)
    if storage.split_uri(root)[0] == "file":
        paths = pc.replace_substring_regex(paths, pattern="^file://", replacement="", max_replacements=1)
    ok = np.array(pc.fill_null(pc.starts_with(paths, prefix), False).to_numpy(zero_copy_only=False), dtype=bool)
    dotted = np.asarray(pc.fill_null(pc.match_substring_regex(paths, DOT_SEGMENT), False).to_numpy(zero_copy_only=False))
    rows = np.flatnonzero(ok & dotted.astype(bool))
    for i, path in zip(rows, paths.take(pa.array(rows, pa.int64())).to_pylist(), strict=True):
        ok[i] = posixpath.normpath("r/" + path[len(prefix) :]).startswith("r/")  # `r`: the root itself
    return ok


def confine(table, root: str | None):
    """(path, error) rows -> the same rows, those not under `root` with an `outside_input` error instead (a row
    with an error is never read). `root` None (--allow-any-path) confines nothing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if root is None or not len(table):
        return table
    outside = ~paths_under_root(table.column("path"), root)
    if not outside.any():
        return table
    message = f"{OUTSIDE}: not under {root}, where this job's paths must be; not read (--allow-any-path reads it)"
    error = pc.if_else(pa.array(outside), message, table.column("error").combine_chunks())
    return table.set_column(table.schema.get_field_index("error"), "error", error)


# ---- listing (inside the read tasks) ----------------------------------------------------------------------


def iter_keys(lister: Lister, source: Source) -> Iterator[tuple[str, str]]:
    """(path, error) for every key the lister covers that the source wants, in listing order."""
    if lister.kind == "manifest":
        for path in iter_manifest(lister.uris[0], lister.format, source.input):
            if source.wants(path):
                yield path, ""
        return
    for uri in lister.uris:
        scheme, path = storage.split_uri(uri)
        with storage.storage_errors(uri):
            if scheme == "file":
                keys = walk_local(path, recursive=lister.kind == "tree")
            elif scheme == "s3":
                keys = ((p, "") for p in walk_s3(path, recursive=lister.kind == "tree"))
            else:
                keys = ((p, "") for p in storage.iter_files(uri))
            for key, error in keys:
                if error or source.wants(key):
                    yield key, error


def walk_local(root: str, recursive: bool) -> Iterator[tuple[str, str]]:
    """Files below root in sorted order, depth first, without collecting them. A name that is not valid
    UTF-8 comes back \\x-escaped, with an error."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                yield from walk_local(entry.path, recursive)
            continue
        try:
            entry.path.encode("utf-8")
            yield entry.path, ""
        except UnicodeEncodeError:
            yield os.fsencode(entry.path).decode("utf-8", "backslashreplace"), BAD_NAME


def walk_s3(path: str, recursive: bool) -> Iterator[str]:
    bucket, _, prefix = path.partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    kwargs = {"Bucket": bucket, "Prefix": prefix, "PaginationConfig": {"PageSize": S3_PAGE}}
    if not recursive:
        kwargs["Delimiter"] = "/"
    for page in storage.s3_client().get_paginator("list_objects_v2").paginate(**kwargs):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                yield f"s3://{bucket}/{obj['Key']}"


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


# ---- the read tasks ---------------------------------------------------------------------------------------


def plan_blocks(
    lister: Lister,
    source: Source,
    plan_uri: str,
    done,
    block_bytes: int = BLOCK_BYTES,
    hold_for: str | None = None,
    root: str | None = None,
):
    """Ray Data read function: list, confine each block to `root` (see `confine`), write it as a plan shard,
    yield the keys not in `done` (an Arrow array of labeled paths, or None), and mark the lister done. A
    retried task rewrites the same shards. `hold_for` (the test hook): after the first block, wait until that
    output has a part."""
    import pyarrow as pa
    import pyarrow.compute as pc

    seq = total = size = 0
    paths: list[str] = []
    errors: list[str] = []

    def flush():
        nonlocal seq, total, size
        size = 0
        table = pa.table({"path": pa.array(paths, pa.string()), "error": pa.array(errors, pa.string())})
        table = confine(table, root)
        write_table(storage.join_uri(plan_uri, f"{lister.id}-{seq:06d}.parquet"), table)
        seq, total = seq + 1, total + len(table)
        paths.clear()
        errors.clear()
        if done is not None and len(done):
            table = table.filter(pc.invert(pc.is_in(table.column("path"), value_set=done)))
        return table

    for path, error in iter_keys(lister, source):
        paths.append(path)
        errors.append(error)
        size += len(path) + len(error) + 8  # Arrow: the bytes and two offsets
        if size > block_bytes * 1.25:
            table = flush()
            if len(table):
                yield table
            if hold_for and seq == 1:
                wait_for_a_part(hold_for)
    if paths:
        table = flush()
        if len(table):
            yield table
    marker = {"lister": asdict(lister), "keys": total, "shards": seq, "finished_at": now()}
    storage.write_text(storage.join_uri(plan_uri, f"{lister.id}.done.json"), json.dumps(marker))


def wait_for_a_part(output: str) -> None:
    from distcls.label.parts import existing_parts

    deadline = time.monotonic() + HOLD_S
    while not existing_parts(output) and time.monotonic() < deadline:
        time.sleep(0.2)


def write_table(uri: str, table) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def plan_datasource(
    listers: list[Lister], source: Source, plan_uri: str, done_ref, block_bytes: int, hold_for: str | None, root: str | None
):
    """A Ray Data datasource with one streaming read task per lister, each confining its keys to `root`."""
    import pyarrow as pa
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PlanDatasource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def read(lister):
                def fn():
                    done = ray.get(done_ref) if done_ref is not None else None
                    yield from plan_blocks(lister, source, plan_uri, done, block_bytes, hold_for, root)

                return fn

            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            schema = pa.schema([("path", pa.string()), ("error", pa.string())])
            return [ReadTask(read(lister), meta, schema=schema) for lister in listers]

        def get_name(self):
            return "ListPlan"

    return PlanDatasource()


# ---- the stored plan --------------------------------------------------------------------------------------


class UnreadablePlan(DistclsError):
    """OUTPUT/_plan holds a file that is not what a job writes (edited, truncated, or not from distcls)."""


@dataclass
class StoredPlan:
    """OUTPUT/_plan as found: the source it lists, its listers, and which of them finished."""

    uri: str
    source: Source | None
    listers: list[Lister]
    finished: dict[str, dict]  # lister id -> its done marker

    @property
    def complete(self) -> bool:
        return bool(self.listers) and all(lister.id in self.finished for lister in self.listers)

    @property
    def keys(self) -> int:
        return sum(m["keys"] for m in self.finished.values())

    @classmethod
    def read(cls, output: str) -> StoredPlan:
        """The plan under `output` (an empty one when there is none). UnreadablePlan when _plan.json or a done
        marker is not what a job writes."""
        uri = plan_dir(output)
        meta_uri = storage.join_uri(uri, PLAN_META)
        if not storage.exists(meta_uri):
            return cls(uri, None, [], {})
        markers = [p for p in storage.list_files(uri) if p.endswith(".done.json")]
        with ThreadPoolExecutor(16) as pool:
            texts = list(pool.map(storage.read_text, [meta_uri, *markers]))
        try:
            meta = json.loads(texts[0])
            listers = [parse_lister(lst) for lst in meta["listers"]]
            if not all(isinstance(v, str | None) for v in meta["source"].values()):
                raise TypeError("the source's fields must be strings")
            source = Source(**meta["source"])
            finished = {}
            for text in texts[1:]:
                marker = json.loads(text)
                if not isinstance(marker["keys"], int):
                    raise TypeError("a done marker's keys must be a count")
                finished[parse_lister(marker["lister"]).id] = marker
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UnreadablePlan(
                f"label: {uri} is not a plan this tool wrote ({type(exc).__name__}: {str(exc)[:80]}); run the "
                "job again with --replan to list the input anew"
            ) from None
        return cls(uri, source, listers, finished)

    @classmethod
    def start(cls, output: str, source: Source, listers: list[Lister]) -> StoredPlan:
        """A new plan: any old one is removed, then _plan.json is written (before any lister runs)."""
        uri = plan_dir(output)
        storage.remove(uri, recursive=True)
        meta = {"source": asdict(source), "listers": [asdict(lst) for lst in listers], "created_at": now()}
        storage.write_text(storage.join_uri(uri, PLAN_META), json.dumps(meta, indent=1))
        return cls(uri, source, listers, {})

    def shards(self) -> list[str]:
        ids = {lister.id for lister in self.listers}
        return [p for p in storage.list_files(self.uri, [".parquet"]) if p.rsplit("/", 1)[-1].split("-")[0] in ids]

    def table(self):
        """Every planned key (path, error) as one Arrow table, the shards read in parallel."""
        import pyarrow as pa

        from distcls.label.parts import read_tables

        try:
            return read_tables(self.shards(), ["path", "error"])
        except (pa.ArrowException, KeyError) as exc:
            raise UnreadablePlan(
                f"label: a shard under {self.uri} is not a plan shard ({str(exc)[:80]}); run the job again with "
                "--replan to list the input anew"
            ) from None


def parse_lister(record: dict) -> Lister:
    kind, uris, fmt = record["kind"], record["uris"], record.get("format", "")
    if not (isinstance(kind, str) and isinstance(fmt, str) and isinstance(uris, list)):
        raise TypeError("a lister is {kind, uris, format}")
    if not all(isinstance(u, str) for u in uris):
        raise TypeError("a lister's uris must be strings")
    return Lister(kind, tuple(uris), fmt)

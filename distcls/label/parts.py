"""A label output's Parquet parts: listing (the output's own level only), the set of labeled paths read with
Arrow, the duplicate repair, the nested-output check, and the counts `--status` and `_SUCCESS.json` report.

A part is the unit of progress. Duplicate rows come from runs that overlap on one output (a killed run's Ray
workers can outlive their driver by seconds and still commit parts; or two reruns started together). The
repair keeps, for each path, its first row (parts in name order, rows in order) and never loses a row:
- a part with rows to drop is rewritten without them under a name derived from what it keeps (two repairs
  at once write the same object), and only then is the original deleted;
- a part written by the pass itself is never deleted by it, and a part that vanished mid-pass (another run
  repairing) stops the pass;
- after a pass the parts are listed again, until a pass finds nothing to repair.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from distcls import DistclsError, storage

PART_PREFIX = "part-"
SUCCESS = "_SUCCESS.json"
READ_THREADS = 16
REPAIR_PASSES = 5


def output_schema(embeddings: bool = False):
    """The label output. `score`/`topk_scores` are calibrated probabilities when the model is calibrated;
    `margin` (top-1 minus top-2 probability), `entropy` (nats) and `ood_score` (energy: higher = less like
    the training data) say how far to trust a row. With --embeddings: `embedding` (float16 pooled features)
    and `thumb` (a 16x16 grey thumbnail of the model input, 256 bytes: what `dedup` confirms pairs with)."""
    import pyarrow as pa

    fields = [
        ("path", pa.string()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("topk_labels", pa.list_(pa.string())),
        ("topk_scores", pa.list_(pa.float32())),
        ("margin", pa.float32()),
        ("entropy", pa.float32()),
        ("ood_score", pa.float32()),
        ("error", pa.string()),
        ("model", pa.string()),
        ("labeled_at", pa.timestamp("us", tz="UTC")),
    ]
    extra = [("embedding", pa.list_(pa.float16())), ("thumb", pa.binary(256))] if embeddings else []
    return pa.schema(fields + extra)


def is_part(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.startswith(PART_PREFIX) and name.endswith(".parquet")


def own_level(uri: str) -> tuple[list[str], list[str]]:
    """(files, folders) directly under uri, as full URIs (not recursive); empty when it does not exist."""
    scheme, _ = storage.split_uri(uri)
    fs, path = storage.get_filesystem(uri)
    with storage.storage_errors(uri):
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return [], []
    files, dirs = [], []
    for entry in entries:
        full = storage.to_uri(scheme, entry["name"] if scheme == "file" else entry["name"].lstrip("/"))
        (dirs if entry.get("type") == "directory" else files).append(full)
    return sorted(files), sorted(dirs)


def existing_parts(output: str) -> list[str]:
    """The output's committed parts, in name order: its own level only (a folder inside is not its)."""
    return [p for p in own_level(output)[0] if is_part(p)]


def is_output(uri: str) -> bool:
    files, dirs = own_level(uri)
    return any(is_part(p) for p in files) or any(d.rstrip("/").endswith("/_plan") for d in dirs)


def check_not_nested(output: str) -> None:
    """Refuse an output inside another label output, or one that holds another (out/ and out/v2/)."""
    scheme, path = storage.split_uri(output)
    parts = path.rstrip("/").split("/")
    for i in range(len(parts) - 1, 0, -1):  # every ancestor: up to the bucket, or to /
        parent = storage.to_uri(scheme, "/".join(parts[:i]) or "/")
        if is_output(parent):
            raise DistclsError(
                f"label: --output {output} is inside another label output ({parent} has parts or a "
                "plan); choose a folder outside it"
            )
    for folder in own_level(output)[1]:
        if not folder.rstrip("/").endswith("/_plan") and is_output(folder):
            raise DistclsError(
                f"label: --output {output} holds another label output ({folder}); give each job a "
                "folder of its own that contains no other output"
            )


def read_labels(output: str, columns: list[str] | None = None):
    """A labeling job's output folder (its parts at that level) as one Arrow table; `columns` picks some."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(io.BytesIO(storage.read_bytes(p)), columns=columns) for p in existing_parts(output)]
    if tables:
        return pa.concat_tables(tables, promote_options="default")  # parts of older versions lack newer columns
    empty = output_schema().empty_table()
    return empty if columns is None else empty.select(columns)


def read_tables(uris: list[str], columns: list[str]):
    """The given columns of Parquet files as one Arrow table (files in the given order, read in parallel),
    with a `_file` column (the index into uris) and a `_row` column. FileNotFoundError if one vanished."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def one(i_uri):
        i, uri = i_uri
        scheme, path = storage.split_uri(uri)
        if scheme == "file":
            table = pq.read_table(path, columns=columns)
        else:
            try:
                table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)
            except DistclsError as exc:
                if "does not exist" in str(exc) or "NoSuchKey" in str(exc) or "not found" in str(exc).lower():
                    raise FileNotFoundError(uri) from None
                raise
        n = len(table)
        return table.append_column("_file", pa.array(np.full(n, i, dtype=np.int32))).append_column(
            "_row", pa.array(np.arange(n, dtype=np.int32))
        )

    schema = pa.schema([(c, pa.string()) for c in columns] + [("_file", pa.int32()), ("_row", pa.int32())])
    if not uris:
        return schema.empty_table()
    with ThreadPoolExecutor(min(READ_THREADS, len(uris))) as pool:
        tables = list(pool.map(one, enumerate(uris)))
    return pa.concat_tables(tables)


@dataclass
class Snapshot:
    """The parts of an output at one moment and their (path, error) rows."""

    parts: list[str]
    table: object  # pyarrow Table: path, error, _file, _row

    @classmethod
    def take(cls, output: str) -> Snapshot:
        for _ in range(REPAIR_PASSES):
            parts = existing_parts(output)
            try:
                return cls(parts, read_tables(parts, ["path", "error"]))
            except FileNotFoundError:
                continue  # a part was removed while reading (another run repairing): list again
        raise DistclsError(
            f"label: the parts of {output} kept changing while being read; is another job repairing "
            "this output? Run again when it has finished"
        )

    def duplicated(self) -> list[str]:
        import pyarrow.compute as pc

        counts = self.table.group_by("path").aggregate([("path", "count")])
        return counts.filter(pc.greater(counts.column("path_count"), 1)).column("path").to_pylist()

    def losers(self, duplicated: list[str]) -> dict[int, set[int]]:
        """Part index -> rows that are second copies (each path keeps its first row in part-name order)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        rows = self.table.filter(pc.is_in(self.table.column("path"), value_set=pa.array(duplicated, pa.string())))
        first: dict[str, tuple[int, int]] = {}
        for path, f, r in zip(*(rows.column(c).to_pylist() for c in ("path", "_file", "_row")), strict=True):
            first[path] = min(first.get(path, (f, r)), (f, r))
        out: dict[int, set[int]] = {}
        for path, f, r in zip(*(rows.column(c).to_pylist() for c in ("path", "_file", "_row")), strict=True):
            if (f, r) != first[path]:
                out.setdefault(f, set()).add(r)
        return out


def repair_pass(output: str, parts: list[str], losers: dict[int, set[int]]) -> int:
    """Remove second copies once (see the module doc): `losers` maps an index into `parts` to the rows to drop.
    Returns the rows removed. Raises FileNotFoundError when a part to rewrite vanished (another run
    repairing): the caller lists again."""
    import pyarrow.parquet as pq

    written: set[str] = set()
    rewrites: list[str] = []
    removed = 0
    for f, drop in sorted(losers.items()):
        part = parts[f]
        scheme, path = storage.split_uri(part)
        if scheme == "file":
            try:
                table = pq.read_table(path)
            except FileNotFoundError:
                raise FileNotFoundError(part) from None
        else:
            table = pq.read_table(io.BytesIO(storage.read_bytes(part)))
        keep = [i for i in range(len(table)) if i not in drop]
        removed += len(table) - len(keep)
        if keep:
            name = hashlib.sha256(f"{part}:{keep}".encode()).hexdigest()[:32]
            target = storage.join_uri(output, f"{PART_PREFIX}{name}.parquet")
            write_parquet(target, table.take(keep))
            written.add(target)
        rewrites.append(part)
    for part in rewrites:  # deletes only after every rewrite is committed
        if part not in written:
            storage.remove(part)
    return removed


def done_snapshot(output: str, repair: bool = True) -> tuple[Snapshot, int]:
    """The output's rows after removing duplicates (when `repair`), and how many rows were removed."""
    removed = 0
    for _ in range(REPAIR_PASSES):
        snap = Snapshot.take(output)
        duplicated = snap.duplicated() if len(snap.table) else []
        if not duplicated or not repair:
            return snap, removed
        try:
            removed += repair_pass(output, snap.parts, snap.losers(duplicated))
        except FileNotFoundError:
            continue
    return Snapshot.take(output), removed


def done_paths(output: str, repair: bool = True) -> tuple[set[str], int]:
    """Paths that have a row in the output, and the duplicate rows removed (a Python set: for tests and small
    outputs; the job itself keeps them in Arrow)."""
    snap, removed = done_snapshot(output, repair)
    return set(snap.table.column("path").to_pylist()), removed


def write_parquet(uri: str, table) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def write_parts(table, output: str, part_mb: float) -> int:
    """Write `table` as one new part, split in halves while a part would exceed part_mb; returns parts written."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    if buf.tell() > part_mb * 2**20 and len(table) > 1:
        half = len(table) // 2
        return write_parts(table.slice(0, half), output, part_mb) + write_parts(table.slice(half), output, part_mb)
    storage.write_bytes(storage.join_uri(output, f"{PART_PREFIX}{uuid.uuid4().hex}.parquet"), buf.getvalue())
    return 1


@dataclass
class OutputStats:
    """What an output holds: rows, distinct paths and errors by kind."""

    parts: int = 0
    rows: int = 0
    distinct: int = 0
    errors: int = 0
    errors_by_kind: dict = field(default_factory=dict)

    @classmethod
    def of(cls, snap: Snapshot) -> OutputStats:
        import pyarrow.compute as pc

        table = snap.table
        errors = table.column("error").drop_null()
        errors = errors.filter(pc.not_equal(errors, ""))
        kinds = Counter()
        if len(errors):  # the kind is the text before the first ":"
            heads = pc.list_element(pc.split_pattern(errors, ":", max_splits=1), 0)
            kinds.update({v["values"]: v["counts"] for v in pc.value_counts(heads).to_pylist()})
        distinct = len(pc.unique(table.column("path"))) if len(table) else 0
        return cls(len(snap.parts), len(table), distinct, len(errors), dict(kinds))

"""Partitioned subtraction: what is left to label, the duplicate rows to repair and the output's counts, computed
bucket by bucket so that no process (the driver least of all) holds the planned or the labeled set.

Every key goes to bucket hash(path) % B (pandas' stable SipHash of the path, the same in every process). Map
tasks read groups of plan shards (path, error; confined to the job's root) and of parts (path, error, and the
part and row each came from) and split them by bucket; one reduce task per bucket then holds about
ROWS_PER_BUCKET keys of each side and returns:
- the planned keys with no row in the output (each once), kept in the object store for the pipeline;
- counts: planned, to do, rows, distinct paths, errors by kind; and the second copies of duplicated paths
  (part, row), each path keeping its first row in part-name order, for the repair.
The layout on disk is the one jobs have always written (plan shards, parts): nothing to migrate. With
`remote=False` (small outputs, `--status`) the same functions run in this process.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from distcls.label.confine import confine

ROWS_PER_BUCKET = 250_000  # keys per reduce task (each side): ~50 MB of Arrow and hash tables
ROWS_PER_MAP = 500_000  # rows a map task reads before it splits them
PART_ROWS_GUESS = 2000
SAMPLE_PER_BUCKET, SAMPLE = (
    16,
    64,
)  # paths for the runtime's compile check  # rows per part when planning the map tasks (the --part-rows default)


def bucket_of(paths, buckets: int) -> np.ndarray:
    """The bucket (0..buckets-1) of each path of an Arrow string column: deterministic across processes."""
    import pandas as pd
    import pyarrow.compute as pc

    values = pc.fill_null(paths, "").to_numpy(zero_copy_only=False)
    return (pd.util.hash_array(values, categorize=False) % np.uint64(buckets)).astype(np.int64)


def split(table, buckets: int) -> list:
    """`table` as `buckets` tables by bucket_of(path), each a compact copy (what a task returns is only its rows)."""
    if buckets == 1:
        return [table.combine_chunks()]
    table = table.combine_chunks()  # one chunk: each take below gathers from contiguous buffers
    b = bucket_of(table.column("path"), buckets)
    order = np.argsort(b, kind="stable")
    ends = np.cumsum(np.bincount(b, minlength=buckets))
    return [table.take(order[end - n : end]) for n, end in zip(np.diff(ends, prepend=0), ends, strict=True)]


def map_plan(shards: list[str], buckets: int, root: str | None) -> list:
    """Plan shards -> (path, error) per bucket, confined to `root` (the shards are not trusted)."""
    from distcls.label.parts import read_tables

    return split(confine(read_tables(shards, ["path", "error"]).select(["path", "error"]), root), buckets)


def map_parts(parts: list[str], first: int, buckets: int) -> list:
    """Parts -> (path, error, _file, _row) per bucket; `_file` indexes the job's whole list of parts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from distcls.label.parts import read_tables

    table = read_tables(parts, ["path", "error"])
    index = table.schema.get_field_index("_file")
    return split(table.set_column(index, "_file", pc.add(table.column("_file"), pa.scalar(first, pa.int32()))), buckets)


def reduce_bucket(n_plan: int, *tables) -> tuple:
    """One bucket: (the planned keys without a row, each once; counts and duplicate rows), see the module doc."""
    import pyarrow as pa
    import pyarrow.compute as pc

    empty = pa.table({"path": pa.array([], pa.string()), "error": pa.array([], pa.string())})
    plan = pa.concat_tables(tables[:n_plan]) if n_plan else empty
    done = pa.concat_tables(tables[n_plan:]) if len(tables) > n_plan else None
    paths = done.column("path").combine_chunks() if done is not None else pa.array([], pa.string())
    todo = plan.filter(pc.invert(pc.is_in(plan.column("path"), value_set=paths))) if len(paths) else plan
    distinct_todo = pc.count_distinct(todo.column("path")).as_py() if len(todo) else 0
    if distinct_todo < len(todo):  # a manifest that names a key twice: label it once
        todo = todo.group_by("path", use_threads=False).aggregate([("error", "first")]).rename_columns(["path", "error"])
    ok = todo.filter(pc.equal(pc.fill_null(todo.column("error"), ""), "")).column("path")
    stats = {
        "planned": pc.count_distinct(plan.column("path")).as_py() if len(plan) else 0,
        "todo": len(todo),
        "sample": ok.slice(0, SAMPLE_PER_BUCKET).to_pylist(),
        **done_counts(done),
    }
    return todo.combine_chunks(), stats


def done_counts(done) -> dict:
    """rows, distinct, errors and errors by kind of a bucket's labeled rows, and its second copies."""
    import pyarrow.compute as pc

    if done is None or not len(done):
        return {"rows": 0, "distinct": 0, "errors": 0, "kinds": {}, "losers": []}
    distinct = pc.count_distinct(done.column("path")).as_py()
    errors = pc.fill_null(done.column("error"), "")
    errors = errors.filter(pc.not_equal(errors, ""))
    kinds = Counter()
    if len(errors):  # the kind is the text before the first ":"
        heads = pc.list_element(pc.split_pattern(errors, ":", max_splits=1), 0)
        kinds.update({v["values"]: v["counts"] for v in pc.value_counts(heads).to_pylist()})
    return {
        "rows": len(done),
        "distinct": distinct,
        "errors": len(errors),
        "kinds": dict(kinds),
        "losers": losers(done) if distinct < len(done) else [],
    }


def losers(done) -> list[tuple[int, int]]:
    """(part, row) of every second copy: each duplicated path keeps its first row in (part, row) order."""
    import pyarrow.compute as pc

    counts = done.group_by("path").aggregate([("path", "count")])
    duplicated = counts.filter(pc.greater(counts.column("path_count"), 1)).column("path")
    rows = done.filter(pc.is_in(done.column("path"), value_set=duplicated.combine_chunks()))
    rows = rows.sort_by([("path", "ascending"), ("_file", "ascending"), ("_row", "ascending")])
    path, f, r = (rows.column(c).to_numpy(zero_copy_only=False) for c in ("path", "_file", "_row"))
    first = np.ones(len(path), dtype=bool)
    first[1:] = path[1:] != path[:-1]
    return [(int(a), int(b)) for a, b in zip(f[~first], r[~first], strict=True)]


@dataclass
class Index:
    """The output against its plan, bucket by bucket (see the module doc). `todo`: per bucket with keys left,
    an object ref (remote) or an Arrow table (local) of (path, error)."""

    parts: list[str]
    buckets: int
    todo: list = field(default_factory=list)
    planned: int = 0
    todo_rows: int = 0
    rows: int = 0
    distinct: int = 0
    errors: int = 0
    errors_by_kind: dict = field(default_factory=dict)
    losers: dict[int, set[int]] = field(default_factory=dict)  # part index -> rows that are second copies
    removed: int = 0  # second copies the repair removed before this count
    sample: list[str] = field(default_factory=list)  # a few paths to do without an error

    def add(self, todo, stats: dict) -> None:
        if stats["todo"]:
            self.todo.append(todo)
        self.sample += stats["sample"][: SAMPLE - len(self.sample)]
        self.planned += stats["planned"]
        self.todo_rows += stats["todo"]
        for key in ("rows", "distinct", "errors"):
            setattr(self, key, getattr(self, key) + stats[key])
        for kind, n in stats["kinds"].items():
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + n
        for f, r in stats["losers"]:
            self.losers.setdefault(f, set()).add(r)

    @property
    def duplicates(self) -> int:
        return sum(len(rows) for rows in self.losers.values())


def groups(files: list[str], rows_per_file: float) -> list[tuple[int, list[str]]]:
    """(index of the first file, files) for each map task: about ROWS_PER_MAP rows each."""
    per = max(1, int(ROWS_PER_MAP // max(rows_per_file, 1)))
    return [(i, files[i : i + per]) for i in range(0, len(files), per)]


def bucket_count(rows: int) -> int:
    return max(1, math.ceil(rows / ROWS_PER_BUCKET))


def build_index(shards: list[str], planned: int, parts: list[str], root: str | None, remote: bool = True) -> Index:
    """The plan's shards (`planned` keys in all) against the output's parts, bucket by bucket. Raises
    FileNotFoundError when a part vanished while being read (another run repairing): list the parts again."""
    buckets = bucket_count(max(planned, len(parts) * PART_ROWS_GUESS))
    plan_groups = groups(shards, planned / max(len(shards), 1))
    part_groups = groups(parts, PART_ROWS_GUESS)
    index = Index(parts, buckets)
    if not remote:
        plan_split = [map_plan(g, buckets, root) for _, g in plan_groups]
        part_split = [map_parts(g, first, buckets) for first, g in part_groups]
        for b in range(buckets):
            index.add(*reduce_bucket(len(plan_split), *(s[b] for s in plan_split), *(s[b] for s in part_split)))
        return index
    return build_remote(index, plan_groups, part_groups, root)


def as_returns(fn):
    """`fn`'s list of bucket tables as a task's returns: the one table itself when there is one bucket."""

    def task(*args):
        tables = fn(*args)
        return tables[0] if len(tables) == 1 else tables

    task.__name__ = fn.__name__
    return task


def build_remote(index: Index, plan_groups: list, part_groups: list, root: str | None) -> Index:
    import ray

    b = index.buckets

    def refs(result) -> list:
        return [result] if b == 1 else list(result)

    map_p = ray.remote(num_cpus=1, num_returns=b)(as_returns(map_plan))
    map_d = ray.remote(num_cpus=1, num_returns=b)(as_returns(map_parts))
    plan_refs = [refs(map_p.remote(g, b, root)) for _, g in plan_groups]
    part_refs = [refs(map_d.remote(g, first, b)) for first, g in part_groups]
    reduce = ray.remote(num_cpus=1, num_returns=2)(reduce_bucket)
    outs = [reduce.remote(len(plan_refs), *(r[k] for r in plan_refs), *(r[k] for r in part_refs)) for k in range(b)]
    del plan_refs, part_refs  # each reduce task keeps its inputs alive until it has run
    try:
        stats = ray.get([s for _, s in outs])
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, FileNotFoundError):
            raise FileNotFoundError(str(exc.cause)) from None
        raise
    for (todo, _), s in zip(outs, stats, strict=True):
        index.add(todo, s)
    return index


def index_output(output: str, plan, root: str | None, repair: bool = True, remote: bool = True) -> Index:
    """The output's parts against `plan` (a StoredPlan), second copies removed first when `repair` (see
    parts.py: a part is rewritten before the original is deleted). The parts are listed again when one
    vanishes while being read (another run repairing)."""
    from distcls import DistclsError
    from distcls.label.parts import REPAIR_PASSES, existing_parts, repair_pass

    shards = plan.shards() if plan.listers else []
    removed = 0
    for _ in range(REPAIR_PASSES):
        parts = existing_parts(output)
        try:
            index = build_index(shards, plan.keys, parts, root, remote)
            if repair and index.losers:
                removed += repair_pass(output, parts, index.losers)
                continue  # the rows and parts changed: count them again
        except FileNotFoundError:
            continue
        index.removed = removed
        return index
    raise DistclsError(
        f"label: the parts of {output} kept changing while being read; is another job repairing this output? "
        "Run again when it has finished"
    )

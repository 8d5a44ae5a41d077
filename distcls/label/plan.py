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

What a job lists (Source, Lister, the manifest readers) is in manifest.py; every block a lister writes is
confined to the job's root first (confine.py): nothing in a manifest or in OUTPUT/_plan is trusted.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from distcls import DistclsError, storage
from distcls.label.confine import confine
from distcls.label.manifest import Lister, Source, iter_manifest, manifest_listers

PLAN_DIR = "_plan"
PLAN_META = "_plan.json"
# Ray Data holds a read task's output until it passes the dataset's target block size (128 MiB by default):
# the label dataset's target is BLOCK_BYTES, and a lister cuts a block (and a plan shard) just past it, so
# each block goes on as soon as it is listed (~16,000 keys of 80 bytes).
BLOCK_BYTES = 1 << 20
TEST_BLOCK_BYTES = 16 << 10  # with the test hook: blocks of a few hundred keys
MAX_LISTERS = 32  # top-level prefixes are grouped onto at most this many listers
MAX_TOP_LEVEL = 10_000  # a top level wider than this (a flat bucket) is listed by one lister, page by page
S3_PAGE = 1000  # keys per LIST request (the S3 maximum)
BAD_NAME = "bad_name: the file name is not valid UTF-8 (shown with \\x escapes); rename it to label it"
# Test hook, not a user option: "1" makes each lister, after its first block, wait (up to HOLD_S) until the
# output has a part, so a test can see labeling start while listing runs. Read in the driver, passed on.
LIST_HOLD_ENV = "DISTCLS_TEST_LIST_HOLD"
HOLD_S = 120


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


# ---- listing (inside the read tasks) ----------------------------------------------------------------------


def iter_keys(lister: Lister, source: Source, after: str | None = None, skip: int = 0) -> Iterator[tuple[str, str]]:
    """(path, error) for every key the lister covers that the source wants, in listing order; when resuming,
    only those listed after `after` (the last key of the last shard written), or past the first `skip` keys
    where a listing cannot start after a key (a manifest, other stores, a name that is not UTF-8)."""
    if after is not None and not resumable(lister, after):
        keys = iter_keys(lister, source)
        for _ in itertools.islice(keys, skip):
            pass
        yield from keys
        return
    if lister.kind == "manifest":
        for path in iter_manifest(lister.uris[0], lister.format, source.input):
            if source.wants(path):
                yield path, ""
        return
    for uri in lister.uris:
        resume = None
        if after is not None:
            if not after.startswith(under(uri)):
                continue  # listed before the kill (the uris are listed in order)
            resume, after = after[len(under(uri)) :], None
        scheme, path = storage.split_uri(uri)
        with storage.storage_errors(uri):
            if scheme == "file":
                keys = walk_local(path, lister.kind == "tree", tuple(resume.split("/")) if resume else None)
            elif scheme == "s3":
                keys = ((p, "") for p in walk_s3(path, recursive=lister.kind == "tree", start_after=resume))
            else:
                keys = ((p, "") for p in storage.iter_files(uri))
            for key, error in keys:
                if error or source.wants(key):
                    yield key, error


def under(uri: str) -> str:
    """What every key listed below `uri` starts with."""
    scheme, path = storage.split_uri(uri)
    return path.rstrip("/") + "/" if scheme == "file" else f"{scheme}://{path.rstrip('/')}/"


def resumable(lister: Lister, after: str) -> bool:
    """Whether the listing can start right after the key `after` (local and S3 prefixes: they list in order)."""
    schemes = {storage.split_uri(u)[0] for u in lister.uris}
    return (
        lister.kind != "manifest"
        and schemes <= {"file", "s3"}
        and "\\x" not in after
        and any(after.startswith(under(u)) for u in lister.uris)
    )


def walk_local(root: str, recursive: bool, after: tuple[str, ...] | None = None) -> Iterator[tuple[str, str]]:
    """Files below root in sorted order, depth first, without collecting them; with `after` (the path below
    root, split by /), only those that come after it in that order. A name that is not valid UTF-8 comes
    back \\x-escaped, with an error."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in entries:
        rest = None
        if after:
            if entry.name < after[0]:
                continue
            if entry.name == after[0]:
                if len(after) == 1 or not entry.is_dir(follow_symlinks=False):
                    continue  # the last key listed before the kill
                rest = after[1:]
            after = None  # past the resume point: everything from here on
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                yield from walk_local(entry.path, recursive, rest)
            continue
        try:
            entry.path.encode("utf-8")
            yield entry.path, ""
        except UnicodeEncodeError:
            yield os.fsencode(entry.path).decode("utf-8", "backslashreplace"), BAD_NAME


def walk_s3(path: str, recursive: bool, start_after: str | None = None) -> Iterator[str]:
    bucket, _, prefix = path.partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    kwargs = {"Bucket": bucket, "Prefix": prefix, "PaginationConfig": {"PageSize": S3_PAGE}}
    if not recursive:
        kwargs["Delimiter"] = "/"
    if start_after:
        kwargs["StartAfter"] = prefix + start_after
    for page in storage.s3_client().get_paginator("list_objects_v2").paginate(**kwargs):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                yield f"s3://{bucket}/{obj['Key']}"


# ---- the read tasks ---------------------------------------------------------------------------------------


def read_progress(plan_uri: str, lister: Lister) -> dict:
    """Where `lister` stopped: shards written (seq), keys in them, the last key; zeros when it never wrote one."""
    uri = storage.join_uri(plan_uri, f"{lister.id}.progress.json")
    try:
        record = json.loads(storage.read_text(uri)) if storage.exists(uri) else {}
        start = {"seq": int(record.get("seq", 0)), "keys": int(record.get("keys", 0)), "after": record.get("after")}
    except (ValueError, TypeError, AttributeError, DistclsError):
        start = {}
    if not start or not isinstance(start["after"], str | None):
        return {"seq": 0, "keys": 0, "after": None}  # unreadable: list this lister again from the start
    return start


def shard_blocks(
    lister: Lister,
    plan_uri: str,
    keys: Iterator[tuple[str, str]],
    root: str | None,
    block_bytes: int = BLOCK_BYTES,
    start: dict | None = None,
    hold_for: str | None = None,
):
    """(path, error) keys -> plan shards of about block_bytes, each confined to `root` (see `confine`), written
    and then recorded in <lister>.progress.json (the resume point), and yielded; the done marker at the end.
    `start`: the progress to continue from. `hold_for` (the test hook): after the first block, wait until
    that output has a part."""
    import pyarrow as pa

    start = start or {"seq": 0, "keys": 0, "after": None}
    seq, total, size = start["seq"], start["keys"], 0
    paths: list[str] = []
    errors: list[str] = []

    def flush():
        nonlocal seq, total, size
        table = confine(pa.table({"path": pa.array(paths, pa.string()), "error": pa.array(errors, pa.string())}), root)
        write_table(storage.join_uri(plan_uri, f"{lister.id}-{seq:06d}.parquet"), table)
        seq, total, size = seq + 1, total + len(table), 0
        progress = {"seq": seq, "keys": total, "after": paths[-1]}
        storage.write_text(storage.join_uri(plan_uri, f"{lister.id}.progress.json"), json.dumps(progress))
        paths.clear()
        errors.clear()
        return table

    for path, error in keys:
        paths.append(path)
        errors.append(error)
        size += len(path) + len(error) + 8  # Arrow: the bytes and two offsets
        if size > block_bytes * 1.25:
            yield flush()
            if hold_for and seq == 1:
                wait_for_a_part(hold_for)
    if paths:
        yield flush()
    marker = {"lister": asdict(lister), "keys": total, "shards": seq, "finished_at": now()}
    storage.write_text(storage.join_uri(plan_uri, f"{lister.id}.done.json"), json.dumps(marker))


def plan_blocks(
    lister: Lister,
    source: Source,
    plan_uri: str,
    block_bytes: int = BLOCK_BYTES,
    hold_for: str | None = None,
    root: str | None = None,
):
    """Ray Data read function: the lister's keys as plan shards (shard_blocks), resumed from its last shard
    when an earlier run (or this task's earlier try) wrote some."""
    start = read_progress(plan_uri, lister)
    yield from shard_blocks(
        lister, plan_uri, iter_keys(lister, source, start["after"], start["keys"]), root, block_bytes, start, hold_for
    )


def finish_listing(plan: StoredPlan, root: str | None) -> None:
    """Run the plan's unfinished listers to the end (Ray tasks, each from where it stopped), keys to shards only."""
    import ray

    def run(lister: Lister) -> int:
        return sum(len(t) for t in plan_blocks(lister, plan.source, plan.uri, BLOCK_BYTES, None, root))

    task = ray.remote(num_cpus=0.25)(run)
    ray.get([task.remote(lister) for lister in plan.listers if lister.id not in plan.finished])


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
    listers: list[Lister], source: Source, plan_uri: str, block_bytes: int, hold_for: str | None, root: str | None
):
    """A Ray Data datasource with one streaming read task per lister, each confining its keys to `root`."""
    import pyarrow as pa
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PlanDatasource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def read(lister):
                def fn():
                    yield from plan_blocks(lister, source, plan_uri, block_bytes, hold_for, root)

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

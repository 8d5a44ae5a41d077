"""Labeling at internet scale: the partitioned subtraction (bucket by bucket, in this process and in Ray tasks)
against plain set arithmetic, an output in the layout jobs wrote before it finished exactly once, a lister
stopped after some shards resumed from its last one (local and S3), and the progress file behind --status."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distcls import storage
from distcls.cli import main
from distcls.config import LabelConfig
from distcls.label import buckets, run_labeling
from distcls.label.manifest import Lister, Source
from distcls.label.parts import PART_PREFIX, existing_parts
from distcls.label.plan import StoredPlan, iter_keys, plan_blocks, read_progress
from distcls.label.status import write_progress
from tests.conftest import label_rows
from tests.test_label_scale import ckpt32, read_rows, write_tree  # noqa: F401 (ckpt32: a fixture)


def write_plan(output: str, source: Source, shards: list[list[str]], errors: dict | None = None) -> StoredPlan:
    """A finished plan in the layout every job has written: _plan.json, <lister>-<seq>.parquet, <lister>.done.json."""
    lister = Lister("tree", (source.input,))
    plan = StoredPlan.start(output, source, [lister])
    for seq, keys in enumerate(shards):
        err = [(errors or {}).get(k, "") for k in keys]
        pq.write_table(
            pa.table({"path": pa.array(keys, pa.string()), "error": pa.array(err, pa.string())}),
            f"{plan.uri}/{lister.id}-{seq:06d}.parquet",
        )
    marker = {
        "lister": {"kind": "tree", "uris": [source.input], "format": ""},
        "keys": sum(map(len, shards)),
        "shards": len(shards),
    }
    storage.write_text(f"{plan.uri}/{lister.id}.done.json", json.dumps(marker))
    return StoredPlan.read(output)


@pytest.mark.parametrize("remote", [False, True])
def test_partitioned_subtraction_equals_set_arithmetic(tmp_path, monkeypatch, remote, request):
    """Buckets of 40 keys: to do = planned - labeled (each once, also when a manifest names a key twice), the
    second copies are found in (part, row) order, and the counts match the sets."""
    if remote:
        request.getfixturevalue("ray_local")
    monkeypatch.setattr(buckets, "ROWS_PER_BUCKET", 40)
    monkeypatch.setattr(buckets, "ROWS_PER_MAP", 100)
    root, out = "s3://b/in", str(tmp_path / "out")
    keys = [f"{root}/d{i % 7}/{i:05d}.jpg" for i in range(500)]
    plan = write_plan(out, Source(input=root), [keys[:200], keys[200:] + keys[:3]])  # three keys planned twice
    labeled = keys[::3]
    parts = [labeled[:60], labeled[60:] + labeled[:5], labeled[10:12]]  # 7 second copies
    for i, paths in enumerate(parts):
        table = label_rows(paths)
        table = table.set_column(
            8, "error", pa.array(["truncated: x" if p.endswith("3.jpg") else None for p in paths], pa.string())
        )
        pq.write_table(table, f"{out}/{PART_PREFIX}{i}.parquet")

    index = buckets.build_index(plan.shards(), plan.keys, existing_parts(out), root, remote=remote)
    assert index.buckets > 1
    todo = []
    for t in index.todo:
        todo += (t if not remote else request.getfixturevalue("ray_local").get(t)).column("path").to_pylist()
    assert sorted(todo) == sorted(set(keys) - set(labeled)) and index.todo_rows == len(todo)
    assert (index.planned, index.rows, index.distinct) == (500, sum(map(len, parts)), len(labeled))
    assert index.errors == sum(p.endswith("3.jpg") for ps in parts for p in ps)
    assert index.errors_by_kind == {"truncated": index.errors}
    assert index.losers == {1: set(range(len(parts[1]) - 5, len(parts[1]))), 2: {0, 1}}
    assert all(not p.endswith(".txt") for p in index.sample) and len(index.sample) <= buckets.SAMPLE

    fixed = buckets.index_output(out, plan, root, remote=remote)
    assert fixed.removed == 7 and fixed.rows == fixed.distinct == len(labeled) and not fixed.losers
    assert sorted(read_rows(out).column("path").to_pylist()) == sorted(labeled)


def test_an_output_in_the_old_layout_finishes_exactly_once(ray_local, ckpt32, photo, tmp_path, monkeypatch):  # noqa: F811
    """A half-done output as jobs wrote it before buckets (plan shards and done marker, parts with a second copy,
    no progress files): the rerun reads it as it is, labels only what is missing, and every object ends with
    one row; --status shows the job's last progress."""
    monkeypatch.setattr(buckets, "ROWS_PER_BUCKET", 16)
    root = tmp_path / "in"
    paths = write_tree(root, photo, {"a": 30, "b": 20})
    out = str(tmp_path / "out")
    plan = write_plan(out, Source(input=str(root)), [paths[:25], paths[25:]])
    pq.write_table(label_rows(paths[:20]), f"{out}/{PART_PREFIX}old1.parquet")
    pq.write_table(label_rows(paths[15:22]), f"{out}/{PART_PREFIX}old2.parquet")
    assert plan.complete and not os.path.exists(f"{plan.uri}/{plan.listers[0].id}.progress.json")

    summary = run_labeling(LabelConfig(checkpoint=ckpt32, input=str(root), output=out, batch_size=16, part_rows=10))
    assert summary["labeled"] == 50 - 22 and summary["duplicates_removed"] == 5 and summary["complete"]
    rows = read_rows(out).column("path").to_pylist()
    assert sorted(rows) == sorted(paths)
    record = json.loads(storage.read_text(f"{out}/_progress.json"))
    assert record["state"] == "finished" and record["done"] == 28 and record["eta_s"] == 0


def test_status_shows_the_eta_of_a_running_job(tmp_path, capsys):
    out = str(tmp_path / "out")
    write_plan(out, Source(input="s3://b/in"), [[f"s3://b/in/{i}.jpg" for i in range(10)]])
    pq.write_table(label_rows([f"s3://b/in/{i}.jpg" for i in range(4)]), f"{out}/{PART_PREFIX}1.parquet")
    write_progress(out, {"done": 4, "total": 10, "rate": 2.0, "eta_s": 3.0, "elapsed_s": 2.0})
    assert main(["label", "--status", "--output", out]) == 1
    text = capsys.readouterr().out
    assert "job:      running (4/10 labeled, 2.0 images/s, ETA 3s" in text and "(6 to do;" in text


def stop_after(blocks, n: int) -> int:
    """Consume `n` blocks of a lister's read task and drop it: the process dies after its n-th shard."""
    return sum(len(next(blocks)) for _ in range(n))


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_lister_resumes_from_its_last_shard(tmp_path, store, request):
    """A lister stopped after two shards continues after the last key they hold: the shards written stay as
    they are, and the plan ends with every key exactly once, in listing order."""
    names = [f"{d}/{i:04d}.png" for d in ("a", "b/c", "b/d", "b-e") for i in range(60)]
    if store == "local":
        root = str(tmp_path / "in")
        for name in names:
            os.makedirs(os.path.dirname(f"{root}/{name}"), exist_ok=True)
            open(f"{root}/{name}", "wb").close()  # listing reads names only
    else:
        request.getfixturevalue("s3_server")
        root = "s3://resume-lister/in"
        storage.ensure_bucket(root)
        storage.write_many((f"{root}/{name}", b"x") for name in names)
    source, out, block = Source(input=root), str(tmp_path / "out"), 2048  # blocks of about 40 keys
    lister = Lister("tree", (root,))
    plan = StoredPlan.start(out, source, [lister])
    assert stop_after(plan_blocks(lister, source, plan.uri, block), 2) > 0
    first = sorted(storage.list_files(plan.uri, [".parquet"]))
    stamps = [os.stat(p).st_mtime_ns for p in first]
    assert len(first) == 2 and read_progress(plan.uri, lister)["seq"] == 2 and not StoredPlan.read(out).complete

    assert sum(len(t) for t in plan_blocks(lister, source, plan.uri, block)) < len(names) - 40
    assert [os.stat(p).st_mtime_ns for p in first] == stamps, "a shard written before the stop was written again"
    done = StoredPlan.read(out)
    keys = done.table().column("path").to_pylist()
    assert done.complete and done.keys == len(keys) == len(names)
    assert keys == [p for p, _ in iter_keys(lister, source)] and sorted(keys) == sorted(f"{root}/{n}" for n in names)

"""`distcls label` reads only under the job's root: planted plan shards, manifest keys that climb out of
--input, `path` columns that change scheme or bucket, S3 Inventory rows of another bucket, a manifest
without --input that spans two buckets; --allow-any-path lifts it; --status on a corrupt output is one line."""

import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distcls import DistclsError, storage
from distcls.cli import main
from distcls.config import LabelConfig
from distcls.label.confine import OUTSIDE, paths_under_root, source_root
from distcls.label.job import open_plan
from distcls.label.manifest import Source
from distcls.label.parts import PART_PREFIX
from distcls.label.plan import StoredPlan, make_listers, plan_blocks
from tests.conftest import make_checkpoint
from tests.test_label_scale import crops, read_rows
from tests.test_label_scale import write_part as write_fake_part

BUCKET = "s3://confine"
OTHER = "s3://confine-private"
ROOT = f"{BUCKET}/in"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("ck") / "tiny"), classes=3)


@pytest.fixture(scope="module")
def objects(s3_server, photo, tmp_path_factory):
    """Four images under ROOT and, outside it, real images whose read would succeed: one in a sibling prefix
    that shares ROOT's name as a string prefix, one in another bucket, one beside ROOT, one on local disk."""
    storage.ensure_bucket(BUCKET)
    storage.ensure_bucket(OTHER)
    images = crops(photo, 8)
    inside = [f"{ROOT}/{i}.png" for i in range(4)]
    local = tmp_path_factory.mktemp("local") / "outside.png"
    local.write_bytes(images[7])
    outside = {
        "sibling": f"{BUCKET}/input2/secret.png",
        "other_bucket": f"{OTHER}/secret.png",
        "beside": f"{BUCKET}/private.png",
        "local": f"file://{local}",
    }
    on_s3 = [*inside, outside["sibling"], outside["other_bucket"], outside["beside"]]
    storage.write_many(zip(on_s3, images, strict=False))
    return inside, outside


def planned(source: Source, root: str | None, plan_uri: str) -> dict[str, str]:
    """path -> error for every key the plan's real read tasks produce (run here, without Ray)."""
    rows: dict[str, str] = {}
    for lister in make_listers(source):
        for table in plan_blocks(lister, source, plan_uri, root=root):
            rows.update(zip(table.column("path").to_pylist(), table.column("error").to_pylist(), strict=True))
    return rows


def outside(error: str | None) -> bool:
    return bool(error) and error.startswith(OUTSIDE + ": ")


def test_paths_under_root_is_segment_aware_and_normalises():
    cases = {
        f"{ROOT}/a.png": True,
        f"{ROOT}/sub//b.png": True,
        f"{ROOT}/a/../b.png": True,
        f"{ROOT}/./c.png": True,
        f"{BUCKET}/input2/x.png": False,  # shares the string prefix, not the segment
        f"{ROOT}/../private/x.png": False,
        f"{ROOT}/a//../../x.png": False,
        f"{ROOT}/..": False,
        f"{OTHER}/in/a.png": False,
        "s3a://confine/in/a.png": False,
        "/confine/in/a.png": False,
        "file:///confine/in/a.png": False,
        ROOT: False,
    }
    got = paths_under_root(pa.array(list(cases), pa.string()), ROOT)
    assert dict(zip(cases, got.tolist(), strict=True)) == cases
    local = {"/data/in/a.png": True, "file:///data/in/b.png": True, "/data/in2/a.png": False, "in/a.png": False}
    local |= {"/data/in/../etc/x.png": False, "file://host/data/in/a.png": False, "s3://data/in/a.png": False}
    got = paths_under_root(pa.array(list(local), pa.string()), "/data/in/")
    assert dict(zip(local, got.tolist(), strict=True)) == local


def test_planted_plan_shard_rows_are_never_read(ray_local, ckpt, objects):
    """Rows added to a finished plan's shards that point outside --input (at images a read would label) get
    `outside_input` rows; with --allow-any-path the same planted rows are read and labeled,
    as every run did before the check."""
    inside, targets = objects
    out, loose = f"{BUCKET}/out-planted", f"{BUCKET}/out-planted-loose"
    planted = [targets["sibling"], targets["other_bucket"], f"{ROOT}/../private.png", targets["local"]]
    source = Source(input=ROOT)
    for output in (out, loose):  # a finished plan, as a first run leaves it (by its own read tasks), then a row added
        plan = StoredPlan.start(output, source, make_listers(source))
        assert planned(source, ROOT, plan.uri) == dict.fromkeys(inside, "") and StoredPlan.read(output).complete
        buf = io.BytesIO()
        pq.write_table(pa.table({"path": planted, "error": pa.array([""] * len(planted), pa.string())}), buf)
        storage.write_bytes(f"{plan.uri}/{plan.listers[0].id}-900000.parquet", buf.getvalue())

    cmd = ["label", "--checkpoint", ckpt, "--input", ROOT, "--batch-size", "8", "--output"]
    assert main([*cmd, out]) == 0
    rows = {r["path"]: r for r in read_rows(out).to_pylist()}
    assert set(rows) == {*inside, *planted}
    for path in planted:
        assert outside(rows[path]["error"]) and rows[path]["label"] is None, rows[path]
    assert all(rows[p]["error"] is None and rows[p]["label"] for p in inside)
    assert json.loads(storage.read_text(f"{out}/_SUCCESS.json"))["errors_by_kind"] == {OUTSIDE: len(planted)}

    assert main([*cmd, loose, "--allow-any-path"]) == 0
    loose_rows = {r["path"]: r for r in read_rows(loose).to_pylist()}
    for path in (targets["sibling"], targets["other_bucket"], targets["local"]):
        assert loose_rows[path]["error"] is None and loose_rows[path]["label"], loose_rows[path]


def test_manifest_without_input_is_confined_to_one_bucket(ray_local, ckpt, objects, tmp_path, capsys):
    """A `path` manifest without --input spanning two buckets and a local file: the job prints the bucket it
    keeps to (the first path's), labels those, and gives the rest `outside_input` rows; --allow-any-path
    reads them all."""
    inside, targets = objects
    paths = [*inside[:2], targets["other_bucket"], targets["local"], targets["local"].removeprefix("file://")]
    manifest = f"{BUCKET}/lists/mixed.csv"
    storage.write_text(manifest, "path\n" + "".join(f"{p}\n" for p in paths))
    out = f"{BUCKET}/out-mixed"
    assert main(["label", "--checkpoint", ckpt, "--manifest", manifest, "--output", out]) == 0
    assert f"every manifest path must be under {BUCKET};" in capsys.readouterr().out
    rows = {r["path"]: r for r in read_rows(out).to_pylist()}
    assert set(rows) == set(paths)
    assert all(rows[p]["label"] for p in inside[:2])
    assert all(outside(rows[p]["error"]) and rows[p]["label"] is None for p in paths[2:])

    loose = f"{BUCKET}/out-mixed-loose"
    assert main(["label", "--checkpoint", ckpt, "--manifest", manifest, "--output", loose, "--allow-any-path"]) == 0
    assert all(r["error"] is None and r["label"] for r in read_rows(loose).to_pylist())


def test_manifest_keys_cannot_climb_out_of_a_local_input(tmp_path, photo):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "private").mkdir()
    for path, data in zip(["in/a.png", "in/sub/b.png", "private/x.png"], crops(photo, 3), strict=True):
        (tmp_path / path).write_bytes(data)
    keys = ["a.png", "sub/./b.png", "sub/../a.png", "../private/x.png", "/../private/x.png", "sub/../../private/x.png"]
    pq.write_table(pa.table({"key": keys}), tmp_path / "keys.parquet")
    source = Source(input=str(root), manifest=str(tmp_path / "keys.parquet"))
    rows = planned(source, source_root(source), str(tmp_path / "plan"))
    assert [outside(rows[f"{root}/{k.lstrip('/')}"]) for k in keys] == [False, False, False, True, True, True]
    assert not any(map(outside, planned(source, None, str(tmp_path / "plan")).values()))  # --allow-any-path


def test_path_manifest_under_an_s3_input_keeps_to_it(objects, tmp_path):
    """file:// and plain local paths, another bucket and a sibling prefix are all outside an s3:// --input."""
    inside, targets = objects
    refused = [targets["local"], targets["local"].removeprefix("file://"), targets["other_bucket"], targets["sibling"]]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": p}) + "\n" for p in [*inside, *refused]))
    source = Source(input=ROOT, manifest=str(tmp_path / "m.jsonl"))
    rows = planned(source, source_root(source), str(tmp_path / "plan"))
    assert {p for p, e in rows.items() if outside(e)} == set(refused)
    assert all(rows[p] == "" for p in inside)


def test_inventory_rows_must_be_in_the_source_bucket(objects, tmp_path):
    inside, targets = objects
    rows = io.StringIO()
    listed = [*inside, targets["other_bucket"], targets["sibling"]]
    csv.writer(rows).writerows([[p[5:].split("/", 1)[0], p[5:].split("/", 1)[1], "1"] for p in listed])
    storage.write_bytes(f"{OTHER}/inv/data/a.csv.gz", gzip.compress(rows.getvalue().encode()))
    manifest = {
        "sourceBucket": "confine",
        "destinationBucket": "arn:aws:s3:::confine-private",
        "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, Size",
        "files": [{"key": "inv/data/a.csv.gz"}],
    }
    uri = f"{OTHER}/inv/manifest.json"
    storage.write_text(uri, json.dumps(manifest))
    source = Source(input=None, manifest=uri)
    assert source_root(source) == BUCKET
    got = planned(source, source_root(source), str(tmp_path / "plan"))
    assert {p for p, e in got.items() if outside(e)} == {targets["other_bucket"]}
    narrowed = Source(input=ROOT, manifest=uri)
    got = planned(narrowed, source_root(narrowed), str(tmp_path / "plan2"))
    assert {p for p, e in got.items() if outside(e)} == {targets["other_bucket"], targets["sibling"]}
    with pytest.raises(DistclsError, match="outside the S3 Inventory's sourceBucket"):
        source_root(Source(input=f"{OTHER}/x", manifest=uri))


@pytest.mark.parametrize(
    "name, text",
    [("_SUCCESS.json", "[1, 2]"), ("_SUCCESS.json", "{not json"), ("_plan/_plan.json", "{not json"), ("_plan/_plan.json", "[]")],
)
def test_status_of_a_corrupt_output_is_one_line(tmp_path, capsys, name, text):
    out = tmp_path / "out"
    (out / "_plan").mkdir(parents=True)
    write_fake_part(str(out), f"{PART_PREFIX}1.parquet", ["a", "b"])
    (out / name).write_text(text)
    assert main(["label", "--status", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("distcls: error: label") and name.split("/")[0] in err


def test_a_run_lists_again_when_the_stored_plan_is_unreadable(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out" / "_plan").mkdir(parents=True)
    (tmp_path / "out" / "_plan" / "_plan.json").write_text("{not json")
    cfg = LabelConfig(checkpoint="unused", input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    plan, how = open_plan(cfg)
    assert "the stored plan is unreadable" in how and plan.source == Source(input=str(tmp_path / "in"))


@pytest.mark.parametrize("pipeline", ["split", "fused"])
def test_max_object_mb_reaches_the_decode_tasks(ray_local, ckpt, photo, pipeline):
    """--max-object-mb on both pipelines (decode in Ray Data tasks, or in the model actors): an object over it is
    a too_large row."""
    from PIL import Image

    from tests.conftest import encode

    root = f"{BUCKET}/sizes-{pipeline}"
    big = encode(Image.fromarray(photo), "PNG")  # ~200 KB
    small = crops(photo, 2)
    storage.ensure_bucket(root)
    storage.write_many([(f"{root}/big.png", big), (f"{root}/a.png", small[0]), (f"{root}/b.png", small[1])])
    out = f"{BUCKET}/out-sizes-{pipeline}"
    cmd = ["label", "--checkpoint", ckpt, "--input", root, "--output", out, "--pipeline", pipeline, "--max-object-mb", "0.05"]
    assert main(cmd) == 0
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in read_rows(out).to_pylist()}
    assert rows["big.png"]["error"].startswith("too_large: ") and rows["big.png"]["label"] is None
    assert rows["a.png"]["label"] and rows["b.png"]["label"]

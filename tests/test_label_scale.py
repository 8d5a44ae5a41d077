"""Labeling at bucket scale: the streaming plan, manifests, the repair that cannot lose rows, nested outputs,
--status, _SUCCESS.json, a replaced checkpoint, file names that are not UTF-8."""

import csv
import gzip
import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distcls import DistclsError, storage
from distcls.cli import main
from distcls.config import LabelConfig
from distcls.label import done_paths, existing_parts, label_status, run_labeling
from distcls.label.manifest import Source, manifest_listers
from distcls.label.parts import PART_PREFIX
from distcls.label.plan import LIST_HOLD_ENV, iter_keys
from tests.conftest import label_rows


@pytest.fixture(scope="module")
def ckpt32(tmp_path_factory):
    """The bundled EfficientNet-Lite0 at 32 px: real weights, cheap to run."""
    from distcls.checkpoint import from_pretrained

    out = str(tmp_path_factory.mktemp("ck") / "lite0-32")
    from_pretrained(out=out, image_size=32)
    return out


def crops(photo: np.ndarray, n: int, seed: int = 0) -> list[bytes]:
    """n 32x32 PNG crops of a real photo."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = int(rng.integers(0, photo.shape[0] - 32)), int(rng.integers(0, photo.shape[1] - 32))
        buf = io.BytesIO()
        Image.fromarray(photo[y : y + 32, x : x + 32]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_tree(root, photo, per_dir: dict[str, int]) -> list[str]:
    paths = []
    for folder, n in per_dir.items():
        os.makedirs(root / folder, exist_ok=True)
        for i, data in enumerate(crops(photo, n, seed=len(paths))):
            (root / folder / f"{i:05d}.png").write_bytes(data)
            paths.append(str(root / folder / f"{i:05d}.png"))
    return paths


def read_rows(output: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(io.BytesIO(storage.read_bytes(p))) for p in existing_parts(output))


def test_labeling_starts_before_listing_ends(ray_local, ckpt32, photo, tmp_path, monkeypatch, capsys):
    """One run, observed: a part is committed while a lister is still listing (the test hook makes each lister
    wait after its first block until a part exists, or 120 s: a pipeline that does not stream fails); a file
    name that is not UTF-8 gets an error row; the plan, --status and _SUCCESS.json agree; a rerun plans from
    the stored plan and adds nothing."""
    root = tmp_path / "in"
    paths = write_tree(root, photo, {"a": 520, "b": 20})
    bad = os.fsencode(str(root / "b")) + b"/caf\xe9.png"
    with open(bad, "wb") as f:
        f.write(crops(photo, 1)[0])
    out = str(tmp_path / "out")
    monkeypatch.setenv(LIST_HOLD_ENV, "1")
    summary = run_labeling(LabelConfig(checkpoint=ckpt32, input=str(root), output=out, part_rows=50, batch_size=32))
    n = len(paths) + 1
    assert summary["labeled"] == summary["total"] == summary["distinct"] == n and summary["complete"]

    table = read_rows(out)
    assert len(table) == len(set(table.column("path").to_pylist())) == n
    finished = {}
    for marker in (tmp_path / "out" / "_plan").glob("*.done.json"):
        record = json.loads(marker.read_text())
        finished[tuple(record["lister"]["uris"])] = record
    assert finished[(str(root / "a"),)]["keys"] == 520 and finished[(str(root / "a"),)]["shards"] >= 2
    listing_ended = max(np.datetime64(r["finished_at"][:19]) for r in finished.values())
    first_part = table.column("labeled_at").to_numpy().min().astype("datetime64[s]")
    assert first_part < listing_ended, "no part was committed before listing ended"

    bad_rows = [r for r in table.to_pylist() if r["error"]]
    assert len(bad_rows) == 1 and bad_rows[0]["error"].startswith("bad_name: ")
    assert bad_rows[0]["path"].endswith("/b/caf\\xe9.png") and bad_rows[0]["label"] is None

    success = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert success["objects"] == success["rows"] == success["distinct_paths"] == n
    assert success["errors_by_kind"] == {"bad_name": 1} and success["model"] == summary["model"]
    status = label_status(out)
    assert (status["planned"], status["rows"], status["distinct_paths"], status["complete"]) == (n, n, n, True)
    assert status["errors_by_kind"] == {"bad_name": 1}
    assert main(["label", "--status", "--output", out]) == 0
    assert "complete: yes" in capsys.readouterr().out

    monkeypatch.delenv(LIST_HOLD_ENV)
    rerun = run_labeling(LabelConfig(checkpoint=ckpt32, input=str(root), output=out))
    assert rerun["labeled"] == 0 and rerun["skipped_done"] == n
    assert f"{n} objects planned" in capsys.readouterr().out


def test_manifest_formats_give_the_same_keys(tmp_path):
    """A key list as CSV (path column), Parquet (key column below --input), JSONL, gzip CSV, and an S3
    Inventory manifest.json with a CSV.gz (URL-encoded keys) and a Parquet data file."""
    keys = ["a/1.jpg", "a/2.png", "b/with space.jpg", "b/notes.txt", "c/3.JPEG"]
    wanted = [f"s3://bkt/in/{k}" for k in keys if not k.endswith(".txt")]
    (tmp_path / "m.csv").write_text("path,size\n" + "".join(f"s3://bkt/in/{k},1\n" for k in keys))
    pq.write_table(pa.table({"key": keys}), tmp_path / "m.parquet")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": f"s3://bkt/in/{k}"}) + "\n" for k in keys))
    (tmp_path / "m.csv.gz").write_bytes(gzip.compress((tmp_path / "m.csv").read_bytes()))
    for name, root in (("m.csv", None), ("m.parquet", "s3://bkt/in"), ("m.jsonl", None), ("m.csv.gz", None)):
        source = Source(input=root, manifest=str(tmp_path / name))
        listers = manifest_listers(source.manifest)
        got = [p for lister in listers for p, _ in iter_keys(lister, source)]
        assert got == wanted, name

    data = tmp_path / "inv" / "data"
    data.mkdir(parents=True)
    rows = io.StringIO()
    csv.writer(rows).writerows([["bkt", "in/" + k.replace(" ", "+"), "1"] for k in keys[:3]])
    (data / "one.csv.gz").write_bytes(gzip.compress(rows.getvalue().encode()))
    pq.write_table(pa.table({"bucket": ["bkt"] * 2, "key": ["in/" + k for k in keys[3:]], "size": [1, 1]}), data / "two.parquet")
    for fmt, files in (("CSV", ["one.csv.gz"]), ("Parquet", ["two.parquet"])):
        manifest = {
            "sourceBucket": "bkt",
            "destinationBucket": "arn:aws:s3:::inventory",
            "fileFormat": fmt,
            "fileSchema": "Bucket, Key, Size",
            "files": [{"key": f"data/{f}", "size": 1} for f in files],
        }
        (tmp_path / "inv" / "manifest.json").write_text(json.dumps(manifest))
        listers = manifest_listers(str(tmp_path / "inv" / "manifest.json"))
        assert [lst.uris[0] for lst in listers] == [f"s3://inventory/data/{f}" for f in files]
    # Inventory data files are read from the destination bucket: check the readers on the local copies.
    from distcls.label.manifest import iter_inventory

    schema = json.dumps({"schema": ["Bucket", "Key", "Size"], "bucket": "bkt"})
    assert list(iter_inventory(str(data / "one.csv.gz"), "inventory-csv:" + schema)) == [f"s3://bkt/in/{k}" for k in keys[:3]]
    assert list(iter_inventory(str(data / "two.parquet"), "inventory-parquet:" + schema)) == [
        f"s3://bkt/in/{k}" for k in keys[3:]
    ]

    (tmp_path / "bad.csv").write_text("name\nx.jpg\n")
    source = Source(input=None, manifest=str(tmp_path / "bad.csv"))
    with pytest.raises(DistclsError, match="no path or key column"):
        list(iter_keys(manifest_listers(source.manifest)[0], source))
    with pytest.raises(DistclsError, match="unknown format"):
        manifest_listers(str(tmp_path / "m.txt"))


def test_label_from_an_inventory_manifest_on_s3(ray_local, ckpt32, photo, s3_server):
    """End to end on the S3 server: an S3 Inventory report (manifest.json + CSV.gz) instead of a LIST."""
    root = "s3://scale-inv/photos"
    keys = [f"x/{i:03d}.png" for i in range(12)] + ["y/not listed.png"]
    storage.ensure_bucket(root)
    storage.ensure_bucket("s3://scale-inv-reports")
    storage.write_many((f"{root}/{k}", data) for k, data in zip(keys, crops(photo, len(keys)), strict=True))
    rows = io.StringIO()
    csv.writer(rows).writerows([["scale-inv", "photos/" + k, "100"] for k in keys[:12]])
    storage.write_bytes("s3://scale-inv-reports/inv/data/a.csv.gz", gzip.compress(rows.getvalue().encode()))
    manifest = {
        "sourceBucket": "scale-inv",
        "destinationBucket": "arn:aws:s3:::scale-inv-reports",
        "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, Size",
        "files": [{"key": "inv/data/a.csv.gz"}],
    }
    storage.write_text("s3://scale-inv-reports/inv/manifest.json", json.dumps(manifest))
    out = "s3://scale-inv/labels"
    assert main(["label", "--checkpoint", ckpt32, "--manifest", "s3://scale-inv-reports/inv/manifest.json", "--output", out]) == 0
    paths = read_rows(out).column("path").to_pylist()
    assert sorted(paths) == [f"{root}/{k}" for k in keys[:12]]
    assert json.loads(storage.read_text(f"{out}/_SUCCESS.json"))["objects"] == 12


def write_part(output, name: str, paths: list[str]) -> str:
    table = label_rows(paths)
    uri = f"{output}/{name}"
    pq.write_table(table, uri)
    return uri


@pytest.mark.parametrize("order", ["rewrite-sorts-after", "rewrite-sorts-before"])
def test_repair_after_a_crash_between_rewrite_and_delete_loses_nothing(tmp_path, order):
    """Parts P1 {a}, P2 {a, b} and the rewrite P2' {b} that a crash between the rewrite and the delete leaves
    (P2' named as the repair names it). Every path must end with exactly one row, whichever sorts first."""
    out = str(tmp_path / "out")
    os.makedirs(out)
    write_part(out, f"{PART_PREFIX}0.parquet", ["a"])
    for i in range(1000):
        p2 = f"{PART_PREFIX}{i:04d}x.parquet"
        rewrite = PART_PREFIX + hashlib.sha256(f"{out}/{p2}:[1]".encode()).hexdigest()[:32] + ".parquet"
        if (rewrite > p2) == (order == "rewrite-sorts-after"):
            break
    write_part(out, p2, ["a", "b"])
    write_part(out, rewrite, ["b"])
    done, removed = done_paths(out)
    assert done == {"a", "b"} and removed == 2
    rows = read_rows(out).column("path").to_pylist()
    assert sorted(rows) == ["a", "b"], rows
    assert done_paths(out) == ({"a", "b"}, 0)


def test_nested_outputs_are_refused_and_never_absorbed(tmp_path, ckpt32):
    """Part listing is the output's own level: out/v2's parts are not out's. A job is refused an output
    inside another output, or one holding another."""
    out, inner = str(tmp_path / "out"), str(tmp_path / "out" / "v2")
    os.makedirs(inner)
    write_part(out, f"{PART_PREFIX}1.parquet", ["a", "b"])
    write_part(inner, f"{PART_PREFIX}1.parquet", ["a", "c"])
    assert done_paths(out) == ({"a", "b"}, 0) and done_paths(inner) == ({"a", "c"}, 0)
    assert len(existing_parts(out)) == len(existing_parts(inner)) == 1
    os.makedirs(tmp_path / "in")
    with pytest.raises(DistclsError, match="is inside another label output"):
        run_labeling(LabelConfig(checkpoint=ckpt32, input=str(tmp_path / "in"), output=inner))
    with pytest.raises(DistclsError, match="holds another label output"):
        run_labeling(LabelConfig(checkpoint=ckpt32, input=str(tmp_path / "in"), output=out))


def test_an_actor_refuses_a_model_other_than_the_one_verified(ckpt32):
    """The driver verifies the checkpoint and passes its sha256; an actor that finds other weights (the
    checkpoint replaced mid-run) refuses instead of mixing two models' rows."""
    from distcls.infer.batch import DecodeAndPredict

    meta = json.loads(storage.read_text(f"{ckpt32}/distcls.json"))
    DecodeAndPredict(ckpt32, runtime="torch", expected_model=meta["weights_sha256"])
    with pytest.raises(DistclsError, match="changed while the job ran"):
        DecodeAndPredict(ckpt32, runtime="torch", expected_model="0" * 64)


def test_status_of_a_missing_or_unplanned_output(tmp_path, capsys):
    assert main(["label", "--status", "--output", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    out = str(tmp_path / "old")
    os.makedirs(out)
    write_part(out, f"{PART_PREFIX}1.parquet", ["a", "b", "a"])
    assert main(["label", "--status", "--output", out]) == 1
    text = capsys.readouterr().out
    assert "no plan" in text and "3 rows, 2 distinct paths" in text and "complete: no" in text

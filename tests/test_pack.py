"""`distcls pack`: real photos (scikit-image) and hostile objects packed on the session's Ray, locally and on the
loopback S3 server; the shards read back with the Hugging Face `datasets` library; a pack SIGKILLed mid-job and
resumed, every input object exactly once in a shard or in _rejected.parquet."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distcls import DistclsError, storage
from distcls.config import ConfigError
from distcls.config.data import PackConfig
from distcls.images import sniff_format
from distcls.pack import Listing, plan_shards, run_pack, summary_line
from distcls.packed_format import DATASET_JSON
from tests.conftest import encode

CLASSES = ("astronaut", "cat", "coffee")


def photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {"astronaut": data.astronaut(), "cat": data.chelsea(), "coffee": data.coffee()}


def make_image_folder(root: str, per_class: int = 6, size: int = 96) -> list[str]:
    """root/<class>/<i>.jpg|png: crops of real photos (JPEGs and PNGs), `size` px on the long side."""
    paths = []
    rng = np.random.default_rng(0)
    for name, photo in photos().items():
        os.makedirs(f"{root}/{name}", exist_ok=True)
        for i in range(per_class):
            y, x = int(rng.integers(0, photo.shape[0] // 3)), int(rng.integers(0, photo.shape[1] // 3))
            img = Image.fromarray(photo[y:, x:]).resize((size, size * 3 // 4))
            ext, fmt = ("jpg", "JPEG") if i % 2 == 0 else ("png", "PNG")
            path = f"{root}/{name}/{i:03d}.{ext}"
            with open(path, "wb") as f:
                f.write(encode(img, fmt, **({"quality": 85} if fmt == "JPEG" else {})))
            paths.append(path)
    return paths


def add_bad_objects(root: str, bad_images: dict) -> dict[str, str]:
    """Undecodable images, a FIFO and an object over 0.1 MB into root/cat/: path -> the kind it must be rejected as."""
    kinds = {}
    for name, (data, kind) in bad_images.items():
        with open(f"{root}/cat/{name}", "wb") as f:
            f.write(data)
        kinds[f"{root}/cat/{name}"] = kind
    os.mkfifo(f"{root}/cat/fifo.jpg")
    kinds[f"{root}/cat/fifo.jpg"] = "not_a_file"
    noise = np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(f"{root}/coffee/huge.png")  # ~120 KB of noise: over --max-object-mb 0.1
    kinds[f"{root}/coffee/huge.png"] = "too_large"
    return kinds


def shard_rows(out: str) -> list[dict]:
    """Every row of every shard listed in _dataset.json (path, label, width, height, sha256, bytes, format)."""
    meta = json.loads(storage.read_text(storage.join_uri(out, DATASET_JSON)))
    rows = []
    for split, info in meta["splits"].items():
        for shard in info["shards"]:
            table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join_uri(out, shard["name"]))))
            image = table.column("image").combine_chunks()
            for i, (blob, path) in enumerate(zip(image.field("bytes").to_pylist(), image.field("path").to_pylist())):
                rows.append({"split": split, "path": path, "bytes": blob, "label": table.column("label")[i].as_py()})
                rows[-1] |= {k: table.column(k)[i].as_py() for k in ("width", "height", "sha256")}
    return rows


def rejected_rows(out: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join_uri(out, "_rejected.parquet")))).to_pylist()


def assert_exactly_once(out: str, inputs: list[str]) -> None:
    seen = [r["path"] for r in shard_rows(out)] + [r["path"] for r in rejected_rows(out)]
    assert sorted(seen) == sorted(inputs), "each input exactly once across shards + _rejected.parquet"


@pytest.fixture(scope="module")
def packed(tmp_path_factory, ray_local, bad_images):
    root = str(tmp_path_factory.mktemp("pack"))
    good = make_image_folder(f"{root}/src", per_class=8)
    kinds = add_bad_objects(f"{root}/src", bad_images)
    with open(f"{root}/src/README.txt", "w") as f:
        f.write("not an image: ignored at listing, as train ignores it")
    cfg = PackConfig(data=f"{root}/src", out=f"{root}/out", val_fraction=0.25, shard_mb=0.02, max_side=64, max_object_mb=0.1)
    summary = run_pack(cfg, progress=False)
    return {"root": root, "out": f"{root}/out", "good": good, "kinds": kinds, "summary": summary, "cfg": cfg}


def test_pack_writes_shards_rejected_rows_and_dataset_json(packed):
    out, s = packed["out"], packed["summary"]
    meta = json.loads(storage.read_text(f"{out}/{DATASET_JSON}"))
    assert meta["format"] == "distcls-pack" and meta["format_version"] == 1 and meta["distcls_version"]
    assert meta["class_names"] == list(CLASSES) and meta["source"] == f"{packed['root']}/src" and meta["created_at"]
    assert meta["listed"] == len(packed["good"]) + len(packed["kinds"]) and meta["ignored"] == 1
    assert sorted(os.listdir(out)) == ["_dataset.json", "_rejected.parquet", "train", "val"]  # _pack/ is gone
    # Stratified over what was listed: astronaut 8 (2 to val), cat 15 with its bad objects (4), coffee 9 (2).
    val = meta["splits"]["val"]["counts"]
    assert val["astronaut"] == 2 and val["cat"] <= 4 and val["coffee"] <= 2
    assert meta["splits"]["train"]["counts"]["astronaut"] == 6
    assert s["images"] == len(packed["good"]) == 24 and s["rejected"] == len(packed["kinds"])
    rows = shard_rows(out)
    assert len(rows) == 24 and {r["path"] for r in rows} == set(packed["good"])
    for split, info in meta["splits"].items():
        assert info["rows"] == sum(sh["rows"] for sh in info["shards"]) == sum(info["counts"].values())
        for sh in info["shards"]:
            assert sh["bytes"] == os.path.getsize(f"{out}/{sh['name']}") and sh["name"].startswith(f"{split}/shard-")
    assert len(meta["splits"]["train"]["shards"]) >= 3  # --shard-mb 0.02: several shards, classes mixed
    rejected = {r["path"]: r for r in rejected_rows(out)}
    assert {p: r["error"].split(":")[0] for p, r in rejected.items()} == packed["kinds"]
    assert rejected[f"{packed['root']}/src/cat/fifo.jpg"]["label"] == "cat"
    assert meta["rejected"]["rows"] == len(rejected) and sum(meta["rejected"]["by_kind"].values()) == len(rejected)
    assert_exactly_once(out, packed["good"] + list(packed["kinds"]))
    line = summary_line(s)
    assert line.startswith("packed 24 images of 3 classes (train ") and "rejected 8" in line and "\n" not in line


def test_max_side_reencodes_keeping_jpeg_and_hashes_what_is_stored(packed):
    for r in shard_rows(packed["out"]):
        assert max(r["width"], r["height"]) == 64 and Image.open(io.BytesIO(r["bytes"])).size == (r["width"], r["height"])
        assert sniff_format(r["bytes"]) == ("JPEG" if r["path"].endswith(".jpg") else "PNG")
        assert r["sha256"] == hashlib.sha256(r["bytes"]).hexdigest()
        assert r["label"] == CLASSES.index(r["path"].split("/")[-2])


def test_shards_are_a_hugging_face_dataset_with_its_split_names(packed, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    expected = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(CLASSES)),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "sha256": datasets.Value("string"),
        }
    )
    # What `datasets` itself writes for these features is what a shard's schema metadata holds.
    own = tmp_path / "own.parquet"
    blank = {"image": [{"bytes": b"", "path": "x"}], "label": [0], "width": [1], "height": [1], "sha256": ["x"]}
    datasets.Dataset.from_dict(blank, features=expected).to_parquet(str(own))
    # The first train shard (shard numbers have gaps where a planned shard held only rejected objects).
    shard = str(sorted(pathlib.Path(packed["out"], "train").glob("shard-*.parquet"))[0])
    assert pq.read_schema(shard).metadata[b"huggingface"] == pq.read_schema(own).metadata[b"huggingface"]
    assert pq.read_schema(shard).remove_metadata() == pq.read_schema(own).remove_metadata()
    loaded = datasets.load_dataset("parquet", data_dir=packed["out"], cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train", "validation"} and loaded["train"].features == expected
    meta = json.loads(storage.read_text(f"{packed['out']}/{DATASET_JSON}"))
    assert loaded["train"].num_rows == meta["splits"]["train"]["rows"]
    assert loaded["validation"].num_rows == meta["splits"]["val"]["rows"]
    row = loaded["validation"][0]
    assert row["image"].size == (row["width"], row["height"]) and 0 <= row["label"] < 3
    files = {"train": f"{packed['out']}/train/*.parquet", "validation": f"{packed['out']}/val/*.parquet"}
    by_files = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache2"))
    assert by_files["validation"].num_rows == loaded["validation"].num_rows


def listing(n_per_class: dict[str, int], size: int = 1000) -> Listing:
    paths = [f"/d/{c}/{i}.jpg" for c, n in n_per_class.items() for i in range(n)]
    labels = [k for k, n in enumerate(n_per_class.values()) for _ in range(n)]
    return Listing(paths, labels, [size] * len(paths), list(n_per_class), "f")


def test_split_and_shard_plan_are_stratified_deterministic_and_mixed():
    lst = listing({"a": 40, "b": 10, "c": 1})
    shard_of, shards = plan_shards(lst, 0.2, seed=3, shard_bytes=10_000)
    assert (shard_of, shards) == plan_shards(lst, 0.2, seed=3, shard_bytes=10_000)
    split = {p: shards[s]["split"] for p, s in zip(lst.paths, shard_of)}
    val = [p for p, s in split.items() if s == "val"]
    assert sum("/a/" in p for p in val) == 8 and sum("/b/" in p for p in val) == 2 and not any("/c/" in p for p in val)
    rows = {s["id"]: [lst.labels[i] for i, x in enumerate(shard_of) if x == s["id"]] for s in shards}
    assert all(1 <= len(r) <= 10 for r in rows.values()) and len(set(rows[0])) > 1  # 10 x 1000 bytes; classes mixed
    assert [s["name"] for s in shards if s["split"] == "val"] == ["val/shard-00000.parquet"]
    other = plan_shards(lst, 0.2, seed=4, shard_bytes=10_000)
    assert val != [p for p, s in zip(lst.paths, other[0]) if other[1][s]["split"] == "val"]
    # Adding an image moves no other image between splits of its class (the hash decides, not the position).
    more = listing({"a": 41, "b": 10, "c": 1})
    shard_of2, shards2 = plan_shards(more, 0.2, seed=3, shard_bytes=10_000)
    split2 = {p: shards2[s]["split"] for p, s in zip(more.paths, shard_of2)}
    assert sum(split[p] != split2[p] for p in split) <= 1


def test_pack_refusals_are_one_line(packed, tmp_path):
    src = f"{packed['root']}/src"
    with pytest.raises(DistclsError, match=r"^pack: --out .* is not empty; pass --resume") as err:
        run_pack(PackConfig(data=src, out=packed["out"]))
    assert "\n" not in str(err.value)
    with pytest.raises(DistclsError, match=r"--out .* is inside --data"):
        run_pack(PackConfig(data=src, out=f"{src}/packed"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(DistclsError, match=r"holds no pack to resume"):
        run_pack(PackConfig(data=src, out=str(tmp_path / "other"), resume=True))
    with pytest.raises(DistclsError, match=r"other options .*--max-side 32 \(was 64\)"):
        run_pack(PackConfig(**{**vars(packed["cfg"]), "max_side": 32, "resume": True}))
    done = run_pack(PackConfig(**{**vars(packed["cfg"]), "resume": True}), progress=False)
    assert done["kept_shards"] == sum(v["shards"] for v in done["splits"].values()) and done["images"] == 24
    with pytest.raises(ConfigError, match=r"--val-fraction 1.0: must be in \[0, 1\).*--shard-mb 0: must be in \(0, 1024\]"):
        PackConfig(data="a", out="b", val_fraction=1.0, shard_mb=0)


def test_killed_pack_resumes_with_every_object_exactly_once(tmp_path, ray_local, bad_images):
    """The driver SIGKILLs itself after 2 shards (a real kill: its running tasks die with it), a finished shard is
    then truncated, and --resume finishes the pack: kept shards are those whose footers verify."""
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    inputs = make_image_folder(src, per_class=5, size=64) + list(add_bad_objects(src, bad_images))
    cfg = dict(data=src, out=out, shard_mb=0.005, max_object_mb=0.1, concurrency=1)
    code = f"from distcls.config.data import PackConfig; from distcls.pack import run_pack; run_pack(PackConfig(**{cfg!r}))"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "DISTCLS_TEST_PACK_FAULT": "2:kill"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not os.path.exists(f"{out}/{DATASET_JSON}")  # (its progress line comes every 10 s: none before the kill)
    state = json.loads(storage.read_text(f"{out}/_pack/state.json"))
    done = [s for s in state["shards"] if os.path.exists(f"{out}/_pack/rejected-{s['id']:05d}.parquet")]
    written = [s["name"] for s in done if os.path.exists(f"{out}/{s['name']}")]  # (a shard of bad objects only has none)
    assert 2 <= len(done) < len(state["shards"]) and written
    with open(f"{out}/{written[0]}", "r+b") as f:  # a finished shard damaged after the kill: it is packed again
        f.truncate(os.path.getsize(f"{out}/{written[0]}") // 2)
    with open(f"{src}/astronaut/new.png", "wb") as f:
        f.write(encode(Image.fromarray(photos()["cat"]).resize((40, 30)), "PNG"))
    with pytest.raises(DistclsError, match=r"^pack: --data .* changed since the pack in .* started"):
        run_pack(PackConfig(**cfg, resume=True))
    os.remove(f"{src}/astronaut/new.png")
    s = run_pack(PackConfig(**cfg, resume=True), progress=False)
    # The truncated shard is packed again (a task that was running at the kill may have finished a shard more).
    assert len(done) - 1 <= s["kept_shards"] <= len(done)
    assert s["images"] + s["rejected"] == len(inputs) and s["rejected"] == 8
    assert_exactly_once(out, inputs)
    assert not any(".tmp-" in name for _r, _d, files in os.walk(out) for name in files)


def test_pack_from_s3_to_s3(s3_server, ray_local, tmp_path):
    local = str(tmp_path / "src")
    paths = make_image_folder(local, per_class=3, size=48)
    storage.ensure_bucket("s3://pack-src")
    for p in paths:
        storage.write_bytes("s3://pack-src/imgs/" + p[len(local) + 1 :], storage.read_bytes(p))
    storage.write_bytes("s3://pack-src/imgs/cat/empty.jpg", b"")
    s = run_pack(PackConfig(data="s3://pack-src/imgs", out="s3://pack-src/packed", val_fraction=0.34), progress=False)
    assert s["images"] == 9 and s["rejected_by_kind"] == {"empty": 1} and 2 <= s["splits"]["val"]["rows"] <= 3
    inputs = ["s3://pack-src/imgs/" + p[len(local) + 1 :] for p in paths] + ["s3://pack-src/imgs/cat/empty.jpg"]
    assert_exactly_once("s3://pack-src/packed", inputs)
    assert not storage.exists("s3://pack-src/packed/_pack/state.json")
    manifest = "s3://pack-src/list.csv"
    storage.write_text(manifest, "path,label\n" + "".join(f"imgs/{p[len(local) + 1 :]},{p.split('/')[-2]}\n" for p in paths))
    m = run_pack(PackConfig(data=manifest, out="s3://pack-src/packed-manifest"), progress=False)
    assert m["images"] == 9 and m["rejected"] == 0 and m["classes"] == 3

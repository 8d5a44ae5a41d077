"""Readers of packed data (distcls/packed.py): a distcls pack, Parquet written by the Hugging Face `datasets`
library, WebDataset tars written by the `webdataset` library; the batches equal build_dataset's for the same
images; damaged sets are one-line errors naming the file; Ray Data's per-epoch shard shuffle is deterministic."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distcls import DistclsError, storage
from distcls.config.data import PackConfig
from distcls.datasets import build_dataset, load_labeled_index
from distcls.pack import run_pack
from distcls.packed import ShardInfo, open_packed
from distcls.packed_format import DATASET_JSON
from distcls.transforms import PreprocessSpec
from tests.conftest import encode
from tests.test_pack import CLASSES, make_image_folder, photos

SPEC = PreprocessSpec(image_size=32)


def rows_by_path(ds) -> dict[str, tuple]:
    out = {}
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        assert set(batch) == {"image", "label", "path", "error"}
        assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int64
        for img, label, path, err in zip(batch["image"], batch["label"], batch["path"], batch["error"]):
            out[path] = (img, int(label), err)
    return out


@pytest.fixture(scope="module")
def pack(tmp_path_factory, ray_local):
    root = str(tmp_path_factory.mktemp("readers"))
    make_image_folder(f"{root}/src", per_class=4, size=80)
    run_pack(PackConfig(data=f"{root}/src", out=f"{root}/out", val_fraction=0.25, shard_mb=0.01), progress=False)
    return {"src": f"{root}/src", "out": f"{root}/out", "root": root}


def test_a_distcls_pack_reads_as_build_dataset_reads_its_source(pack):
    p = open_packed(pack["out"])
    meta = json.loads(storage.read_text(f"{pack['out']}/{DATASET_JSON}"))
    assert p.kind == "distcls" and p.source == pack["out"] and p.class_names == list(CLASSES) and p.splits == ["train", "val"]
    assert p.num_rows("train") == 9 and p.num_rows("validation") == 3 and p.counts("val") == dict.fromkeys(CLASSES, 1)
    assert p.shards("train") == [
        ShardInfo(f"{pack['out']}/{s['name']}", s["rows"], s["bytes"]) for s in meta["splits"]["train"]["shards"]
    ]
    index = load_labeled_index(pack["src"])
    expected = rows_by_path(build_dataset(index, SPEC))
    got = {**rows_by_path(p.dataset("train", SPEC)), **rows_by_path(p.dataset("val", SPEC))}
    assert set(got) == set(expected) == set(index.paths)  # the sample id is the original object's path
    for path, (img, label, err) in got.items():
        assert err == "" and label == expected[path][1] and np.array_equal(img, expected[path][0])
    ids, labels = p.paths_and_labels("val")
    assert len(ids) == 3 and [CLASSES[x] for x in labels] == [i.split("/")[-2] for i in ids]
    with pytest.raises(DistclsError, match=r"has no split 'test'; it has train, val"):
        p.dataset("test", SPEC)


def test_class_names_of_another_set_reindex_labels(pack):
    p = open_packed(pack["out"], class_names=["zebra", *CLASSES])
    assert p.class_names == ["zebra", *CLASSES] and p.counts("val") == {"zebra": 0, **dict.fromkeys(CLASSES, 1)}
    rows = rows_by_path(p.dataset("val", SPEC))
    assert {path: label for path, (_img, label, _err) in rows.items()} == {
        path: 1 + CLASSES.index(path.split("/")[-2]) for path in rows
    }
    assert sorted(p.paths_and_labels("val")[1]) == [1, 2, 3]
    again = p.with_class_names(["coffee", "zebra", "cat", "astronaut"])  # a second re-indexing composes
    assert again.counts("val") == {"coffee": 1, "zebra": 0, "cat": 1, "astronaut": 1}
    assert sorted(zip(*again.paths_and_labels("val"))) == sorted(
        (path, ["coffee", "zebra", "cat", "astronaut"].index(path.split("/")[-2])) for path in rows
    )
    with pytest.raises(DistclsError, match=r"has classes \['astronaut', 'coffee'\] that the training data does not"):
        open_packed(pack["out"], class_names=["cat"])


def first_paths(p) -> dict[str, str]:
    """The path of each train shard's first row -> the shard."""
    return {pq.read_table(s.uri, columns=["image.path"]).column(0)[0].as_py(): s.uri for s in p.shards("train")}


def shard_orders(p, seed: int, epochs: int) -> list[list[str]]:
    """The order in which each epoch (execution) of one dataset with `seed` reads the train shards."""
    first = first_paths(p)
    ds = p.dataset("train", SPEC, shuffle_seed=seed)
    return [[first[x] for x in ds.to_pandas()["path"] if x in first] for _ in range(epochs)]


def test_shard_order_is_a_function_of_seed_and_epoch(pack, monkeypatch):
    """Ray 2.60's FileShuffleConfig(seed, reseed_after_execution=True) seeds each execution with (seed, execution
    index): the epochs of one dataset read the shards in different orders, a new dataset with the same seed repeats
    that sequence, another seed gives another. Row order is made observable with preserve_order."""
    import ray.data

    monkeypatch.setattr(ray.data.DataContext.get_current().execution_options, "preserve_order", True)
    p = open_packed(pack["out"])
    assert len(p.shards("train")) >= 4
    a = shard_orders(p, 5, 3)
    assert len({tuple(e) for e in a}) == 3 and all(sorted(e) == sorted(s.uri for s in p.shards("train")) for e in a)
    assert shard_orders(p, 5, 3) == a and shard_orders(p, 6, 1)[0] != a[0]


def copy_pack(pack, name: str) -> str:
    dst = f"{pack['root']}/{name}"
    shutil.copytree(pack["out"], dst)
    return dst


def test_damaged_packs_are_one_line_errors_naming_the_file(pack):
    meta = json.loads(storage.read_text(f"{pack['out']}/{DATASET_JSON}"))
    shard = meta["splits"]["train"]["shards"][0]["name"]

    def fails(out: str, pattern: str) -> None:
        with pytest.raises(DistclsError, match=pattern) as err:
            open_packed(out)
        assert "\n" not in str(err.value)

    out = copy_pack(pack, "missing")
    os.remove(f"{out}/{shard}")
    fails(out, rf"^packed: shard {out}/{shard} does not exist; .*--resume")
    out = copy_pack(pack, "truncated")
    with open(f"{out}/{shard}", "r+b") as f:
        f.truncate(100)
    fails(out, rf"^packed: {out}/{shard} is not a readable Parquet file \(.*\); it is truncated or damaged")
    out = copy_pack(pack, "schema")
    table = pq.read_table(f"{out}/{shard}")
    pq.write_table(table.set_column(1, "label", table.column("label").cast(pa.string())), f"{out}/{shard}")
    fails(out, rf"^packed: {out}/{shard} has the wrong schema \(column 'label' is string, not an integer\)")
    pq.write_table(table.slice(0, 0), f"{out}/{shard}")
    fails(out, rf"^packed: shard {out}/{shard} has 0 rows")
    out = copy_pack(pack, "names")
    changed = {**meta, "class_names": ["coffee", "cat", "astronaut"]}
    changed["splits"] = {k: {**v, "counts": dict(reversed(v["counts"].items()))} for k, v in meta["splits"].items()}
    storage.write_text(f"{out}/{DATASET_JSON}", json.dumps(changed))
    fails(out, r"^packed: class names of .*\.parquet \(astronaut, cat, coffee\) disagree with .*_dataset.json")


def write_hf_parquet(folder: str, bad_jpeg: bytes) -> dict[str, list]:
    """Parquet written by `datasets` (data/train-*.parquet, data/validation-*.parquet): -> split -> labels."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    imgs = [Image.fromarray(p).resize((40, 30)) for p in photos().values()]
    labels = {"train": [0, 1, 2, 0, 1, 2, 2], "validation": [0, 1, 2]}
    os.makedirs(f"{folder}/data", exist_ok=True)
    for split, ys in labels.items():
        images = [{"bytes": encode(imgs[y], "PNG"), "path": f"{split}/{i}.png"} for i, y in enumerate(ys)]
        if split == "validation":
            images[0] = {"bytes": bad_jpeg, "path": None}  # undecodable, and no path: the id is the shard's + a hash
        ds = datasets.Dataset.from_dict({"image": images, "label": ys}, features=features)
        ds.to_parquet(f"{folder}/data/{split}-00000-of-00001.parquet")
    return labels


def test_hugging_face_parquet_from_s3_with_an_error_row(ray_local, s3_server, tmp_path, bad_images, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    labels = write_hf_parquet(str(tmp_path), bad_images["truncated.jpg"][0])
    for split in labels:
        name = f"data/{split}-00000-of-00001.parquet"
        storage.ensure_bucket("s3://hf-sets")
        storage.write_bytes(f"s3://hf-sets/fashion/{name}", (tmp_path / name).read_bytes())
    p = open_packed("s3://hf-sets/fashion")
    assert p.kind == "hf-parquet" and p.class_names == list(CLASSES) and p.splits == ["train", "val"]
    assert p.num_rows("train") == 7 and p.counts("train") == {"astronaut": 2, "cat": 2, "coffee": 3}
    rows = rows_by_path(p.dataset("validation", SPEC))
    shard = "s3://hf-sets/fashion/data/validation-00000-of-00001.parquet"
    bad = [k for k in rows if k.startswith(f"{shard}#sha256:")]
    assert len(bad) == 1 and rows[bad[0]][2].startswith("truncated: ") and not rows[bad[0]][0].any()
    assert {k: v[1:] for k, v in rows.items() if k not in bad} == {"validation/1.png": (1, ""), "validation/2.png": (2, "")}
    assert p.paths_and_labels("val") == ([bad[0], "validation/1.png", "validation/2.png"], [0, 1, 2])
    one = open_packed(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    assert one.splits == ["train"] and one.num_rows("train") == 7
    # Not packed data: a manifest (Parquet without `datasets` features), an ImageFolder prefix.
    pq.write_table(pa.table({"path": ["a.png"], "label": ["cat"]}), str(tmp_path / "manifest.parquet"))
    assert open_packed(str(tmp_path / "manifest.parquet")) is None
    assert open_packed(str(tmp_path / "nothing-here.parquet")) is None


def test_empty_hugging_face_shard_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    write_hf_parquet(str(tmp_path), b"")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    empty = datasets.Dataset.from_dict({"image": [], "label": []}, features=features)
    empty.to_parquet(str(tmp_path / "data" / "test-0.parquet"))
    with pytest.raises(DistclsError, match=r"^packed: shard .*/data/test-0.parquet has 0 rows"):
        open_packed(str(tmp_path))


def write_webdataset(folder: str, bad_jpeg: bytes) -> list[tuple[str, int]]:
    """train-00000{0,1}.tar and val-000000.tar written by `webdataset`: (shard file, key) -> label."""
    import webdataset as wds

    imgs = [Image.fromarray(p).resize((40, 30)) for p in photos().values()]
    written = []
    for name, ys in (("train-000000.tar", [0, 1, 2, 0]), ("train-000001.tar", [1, 2]), ("val-000000.tar", [0, 1, 2])):
        with wds.TarWriter(f"{folder}/{name}") as sink:
            for i, y in enumerate(ys):
                key = f"{name[:-4]}-s{i:03d}"
                image = {"jpg": encode(imgs[y], "JPEG")} if i % 2 else {"png": encode(imgs[y], "PNG")}
                if name.startswith("val") and i == 2:
                    image = {"jpg": bad_jpeg}
                sink.write({"__key__": key, "cls": y, **image})
                written.append((f"{folder}/{name}#{key}", y))
    return written


def test_webdataset_tars_with_and_without_class_names(ray_local, tmp_path, bad_images):
    written = write_webdataset(str(tmp_path), bad_images["corrupt.jpg"][0])
    p = open_packed(str(tmp_path))
    assert p.kind == "webdataset" and p.splits == ["train", "val"] and p.class_names == ["0", "1", "2"]
    assert p.num_rows("train") == 6 and p.counts("train") == {"0": 2, "1": 2, "2": 2}
    assert [s.rows for s in p.shards("train")] == [None, None] and all(s.bytes > 0 for s in p.shards("train"))
    assert open_packed(str(tmp_path), class_names=list(CLASSES)).class_names == list(CLASSES)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    p = open_packed(str(tmp_path))
    assert p.class_names == list(CLASSES)
    rows = {**rows_by_path(p.dataset("train", SPEC, shuffle_seed=1)), **rows_by_path(p.dataset("val", SPEC))}
    assert {k: v[1] for k, v in rows.items()} == dict(written)
    bad = f"{tmp_path}/val-000000.tar#val-000000-s002"
    assert rows[bad][2].startswith("corrupt: ") and all(v[2] == "" for k, v in rows.items() if k != bad)
    assert sorted(zip(*p.paths_and_labels("val"))) == sorted(w for w in written if "/val-" in w[0])
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DistclsError, match=r"^packed: WebDataset shard .*/empty.tar is empty"):
        open_packed(str(tmp_path))


def test_an_image_folder_is_not_packed_data(pack):
    assert open_packed(pack["src"]) is None

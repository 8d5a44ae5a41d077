"""Ray Data datasets over the loopback S3 server: ImageFolder, manifests, skip-and-count, splits."""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distcls import DistclsError, storage
from distcls.datasets import ErrorTally, build_dataset, class_index, format_counts, load_labeled_index, stratified_split
from distcls.transforms import PreprocessSpec

SPEC = PreprocessSpec(image_size=32)


@pytest.fixture(scope="module")
def image_folder(s3_server, good_images, bad_images):
    """s3://ds-test/<id>/{cat,dog,fish}/...: every good image in 'cat' and 'dog', the bad ones in 'fish'."""
    root = f"s3://ds-test/{os.urandom(4).hex()}"
    storage.ensure_bucket(root)
    items = []
    for cls in ("cat", "dog"):
        items += [(f"{root}/{cls}/{name}", data) for name, data in good_images.items()]
    items += [(f"{root}/fish/{name}", data) for name, (data, _) in bad_images.items()]
    items += [
        (f"{root}/fish/good.jpg", good_images["rgb.jpg"]),
        (f"{root}/README.txt", b"not data"),
        (f"{root}/fish/notes.txt", b"ignored by extension"),
    ]
    storage.write_many(items)
    return root


def collect(ds) -> tuple[dict, ErrorTally]:
    tally = ErrorTally()
    parts = [tally.drop_errors(b) for b in ds.iter_batches(batch_size=7, batch_format="numpy")]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, tally


def test_image_folder_counts_classes_shapes(ray_local, image_folder, good_images, bad_images):
    index = load_labeled_index(image_folder)
    assert index.class_names == ["cat", "dog", "fish"]
    assert index.counts() == {"cat": len(good_images), "dog": len(good_images), "fish": len(bad_images) + 1}
    assert sorted(index.ignored) == [f"{image_folder}/README.txt", f"{image_folder}/fish/notes.txt"]
    rows, tally = collect(build_dataset(index, SPEC))
    n_good = 2 * len(good_images) + 1
    assert rows["image"].shape == (n_good, 3, 32, 32) and rows["image"].dtype == np.uint8
    assert rows["label"].dtype == np.int64 and np.bincount(rows["label"]).tolist() == [len(good_images)] * 2 + [1]
    assert (rows["error"] == "").all()
    # Each bad object is skipped and counted, with its kind.
    assert tally.count == len(bad_images)
    assert dict(tally.by_kind) == {"corrupt": 1, "truncated": 1, "empty": 1, "not_image": 1, "too_large": 2}
    assert len(tally.examples) == 5 and all(e.startswith(f"{image_folder}/fish/") for e in tally.examples)


def test_eval_images_equal_the_single_preprocessing_function(ray_local, image_folder, good_images):
    from distcls.transforms import preprocess_bytes

    index = load_labeled_index(image_folder)
    rows, _ = collect(build_dataset(index, SPEC))
    i = list(rows["path"]).index(f"{image_folder}/dog/cmyk.jpg")
    np.testing.assert_array_equal(rows["image"][i], preprocess_bytes(good_images["cmyk.jpg"], SPEC))


def test_train_dataset_yields_shuffled_base_squares(ray_local, image_folder):
    index = load_labeled_index(image_folder)
    ds = build_dataset(index, SPEC, train=True, shuffle_seed=3)
    first, _ = collect(ds)
    second, _ = collect(ds)
    assert list(first["path"]) == list(second["path"]) != sorted(first["path"])
    assert first["image"].shape[1:] == (3, SPEC.resize_size, SPEC.resize_size)
    np.testing.assert_array_equal(first["image"], second["image"])  # cacheable: augmentation comes later


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_manifest_with_relative_and_absolute_paths(ray_local, image_folder, fmt):
    rows = [
        {"path": "cat/rgb.jpg", "label": "kitten"},
        {"path": "dog/grey.png", "label": "puppy"},
        {"path": f"{image_folder}/dog/tiny.bmp", "label": "puppy"},
        {"path": "fish/empty.png", "label": "kitten"},
    ]
    uri = f"{image_folder}/manifest.{fmt}"
    if fmt == "csv":
        data = ("path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in rows)).encode()
    elif fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        data = buf.getvalue()
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    storage.write_bytes(uri, data)
    index = load_labeled_index(uri)
    assert index.class_names == ["kitten", "puppy"]
    assert index.paths[0] == f"{image_folder}/cat/rgb.jpg"
    assert index.labels == [0, 1, 1, 0]
    got, tally = collect(build_dataset(index, SPEC))
    assert len(got["label"]) == 3 and tally.count == 1 and tally.by_kind == {"empty": 1}


def test_manifest_errors_name_the_problem(s3_server, tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("file,class\na.jpg,x\n")
    with pytest.raises(DistclsError, match=r"lacks column\(s\) path, label \(has file, class\)"):
        load_labeled_index(str(bad))
    empty_label = tmp_path / "e.csv"
    empty_label.write_text("path,label\na.jpg,\n")
    with pytest.raises(DistclsError, match="row 1 has an empty path or label"):
        load_labeled_index(str(empty_label))


def test_validation_classes_must_be_known(image_folder):
    with pytest.raises(DistclsError, match=r"has classes \['fish'\] that the training data does not"):
        load_labeled_index(image_folder, class_names=["cat", "dog"])


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.txt").write_text("x")
    with pytest.raises(DistclsError, match="no images found under"):
        load_labeled_index(str(tmp_path))


def test_class_index_is_deterministic_and_numeric_aware():
    assert list(class_index(["b", "a", "c", "a"])) == ["a", "b", "c"]
    assert list(class_index(["10", "2", "1"])) == ["1", "2", "10"]


def test_stratified_split_keeps_class_proportions(image_folder):
    from distcls.datasets import LabeledIndex

    labels = [0] * 80 + [1] * 20 + [2] * 1
    index = LabeledIndex([f"p{i}" for i in range(len(labels))], labels, ["a", "b", "c"], "x")
    train, val = stratified_split(index, 0.25, seed=0)
    assert val.counts() == {"a": 20, "b": 5, "c": 0}
    assert train.counts() == {"a": 60, "b": 15, "c": 1}
    assert not set(train.paths) & set(val.paths)
    assert stratified_split(index, 0.25, seed=0)[1].paths == val.paths
    text = format_counts(index, "imbalanced")
    assert "imbalance (largest/smallest class): 80.00" in text

"""Packed data in every command that reads labeled data: `train` on a distcls pack with 2 workers presents every
image exactly once per epoch (a consumption log per worker), validation from the pack's own val split, nothing per
image in what the driver sends the workers; --sampler balanced in the pipeline; evaluate, calibrate, compare, soup
and export --sample on a distcls pack, Parquet written by Hugging Face `datasets` and WebDataset tars written by
`webdataset`. Real photos (scikit-image), the session's Ray, real files."""

from __future__ import annotations

import glob
import json
import os
from collections import Counter

import pyarrow.parquet as pq
import pytest

from distcls import DistclsError, storage
from distcls.config import CalibrateConfig, CompareConfig, EvaluateConfig, SoupConfig, TrainConfig
from distcls.config.data import PackConfig
from distcls.pack import run_pack
from distcls.packed import open_packed
from distcls.splits import ObjectSplit, PackedSplit, open_labeled
from distcls.train.data import CONSUMPTION_ENV, balanced_copies, load_splits, sample_native_size, training_datasets
from distcls.transforms import PreprocessSpec
from tests.conftest import make_checkpoint
from tests.test_pack import CLASSES, make_image_folder
from tests.test_packed_readers import write_hf_parquet, write_webdataset


@pytest.fixture(scope="module")
def packs(tmp_path_factory, ray_local):
    """A distcls pack of 42 photos (train 30, val 12, shards of a few images) and one without a val split."""
    root = str(tmp_path_factory.mktemp("packed-train"))
    make_image_folder(f"{root}/src", per_class=14, size=48)
    run_pack(PackConfig(data=f"{root}/src", out=f"{root}/pack", val_fraction=0.25, shard_mb=0.01), progress=False)
    run_pack(PackConfig(data=f"{root}/src", out=f"{root}/noval", shard_mb=0.05), progress=False)
    return {"root": root, "src": f"{root}/src", "pack": f"{root}/pack", "noval": f"{root}/noval"}


def read_ids(path: str) -> list[str]:
    with open(path) as f:
        return f.read().split()


def tiny(packs, name: str, **kw) -> TrainConfig:
    base = dict(data=packs["pack"], image_size=32, batch_size=4, num_workers=2, epochs=2, cache_data=False)
    return TrainConfig(**{**base, "storage": f"{packs['root']}/runs", "name": name, **kw})


def test_two_workers_train_on_every_image_exactly_once_per_epoch(packs, monkeypatch):
    from distcls.train.trainer import run_training

    log = f"{packs['root']}/consumed"
    os.makedirs(log)
    monkeypatch.setenv(CONSUMPTION_ENV, log)
    result = run_training(tiny(packs, "once"))
    train_ids, _ = open_packed(packs["pack"]).paths_and_labels("train")
    assert len(train_ids) == 30
    for epoch in (0, 1):
        per_rank = [read_ids(f) for f in sorted(glob.glob(f"{log}/epoch-{epoch}-rank-*.txt"))]
        assert len(per_rank) == 2 and all(per_rank), "both workers trained on real images"
        assert Counter(i for rank in per_rank for i in rank) == Counter(train_ids)  # each sample id exactly once
    orders = [read_ids(f"{log}/epoch-{e}-rank-0.txt") for e in (0, 1)]
    assert orders[0] != orders[1]  # shards and rows reshuffled per epoch
    assert result["metrics"]["val_samples"] == 12 and [h["epoch"] for h in result["epochs"]] == [1, 2]
    assert result["calibration"]["images"] == 12 and result["calibration"]["data"] == f"{packs['pack']} (val split)"


def test_the_driver_sends_no_per_image_list_and_val_is_a_dataset(packs):
    from distcls.train.trainer import build_trainer, resolve_recipe

    cfg = tiny(packs, "lists")
    train, val = load_splits(cfg)
    assert isinstance(train, PackedSplit) and (train.split, val.split, len(train), len(val)) == ("train", "val", 30, 12)
    assert sample_native_size(train) == 36  # the recipe's probe: the first rows' headers (48x36 photos)
    cfg, _ = resolve_recipe(cfg, train)
    trainer = build_trainer(cfg, train, val)
    assert set(trainer.datasets) == {"train", "val"}
    sizes = [len(v) for v in trainer.train_loop_config.values() if isinstance(v, (list, tuple))]
    assert max(sizes) <= len(CLASSES) and "val_paths" not in trainer.train_loop_config


def test_packed_data_without_a_val_split_is_refused_with_the_fix(packs):
    refusal = r"^train: packed data .*noval has no val split \(train\); pack it with --val-fraction"
    with pytest.raises(DistclsError, match=refusal):
        load_splits(tiny(packs, "refused", data=packs["noval"]))
    train, val = load_splits(tiny(packs, "valdata", data=packs["noval"], val_data=packs["pack"]))
    assert (train.split, val.split, len(train), len(val)) == ("train", "val", 42, 12)
    per_object = load_splits(tiny(packs, "objects", data=packs["src"]))
    assert all(isinstance(s, ObjectSplit) for s in per_object) and sum(map(len, per_object)) == 42


def test_tune_trials_read_the_packed_set_as_it_is(packs, tmp_path):
    from distcls.config import TuneConfig
    from distcls.train.tune import base_train_config, split_manifests

    cfg = TuneConfig(data=packs["pack"], storage=str(tmp_path), name="search")
    assert split_manifests(cfg, str(tmp_path / "search")) == (None, None)  # no train.csv / val.csv of the images
    base = base_train_config(cfg, None, None)
    assert base["data"] == packs["pack"] and base["val_data"] is None and TrainConfig(**base).data == packs["pack"]
    with pytest.raises(DistclsError, match=r"has no val split"):
        split_manifests(TuneConfig(data=packs["noval"], storage=str(tmp_path), name="s2"), str(tmp_path / "s2"))


def test_balanced_sampler_gives_each_class_an_equal_expected_share(packs):
    """The pipeline's stochastic rounding on an imbalanced pack (10/4/2): over epochs, each class ~1/3 of the rows;
    the draws are a function of --seed and the epoch."""
    src = f"{packs['root']}/imbalanced"
    make_image_folder(src, per_class=10, size=40)
    for name, keep in (("cat", 4), ("coffee", 2)):
        for path in sorted(glob.glob(f"{src}/{name}/*"))[keep:]:
            os.remove(path)
    run_pack(PackConfig(data=src, out=f"{src}-pack", shard_mb=0.01), progress=False)
    train = open_labeled(f"{src}-pack")
    assert balanced_copies([10, 4, 2]).tolist() == pytest.approx([16 / 30, 16 / 12, 16 / 6])
    cfg = tiny(packs, "balanced", data=f"{src}-pack", sampler="balanced", random_crops=False)

    def epochs(seed: int, n: int = 6) -> list[list[str]]:
        spec = PreprocessSpec(image_size=32)
        ds = training_datasets(TrainConfig(**{**cfg.__dict__, "seed": seed}), spec, train, train, 1 << 20)["train"]
        ds.context.execution_options.preserve_order = True
        return [[str(p) for p in ds.to_pandas()["path"]] for _ in range(n)]

    drawn = epochs(seed=1)
    shares = Counter(p.split("/")[-2] for epoch in drawn for p in epoch)
    total = sum(shares.values())
    assert abs(total / len(drawn) - 16) <= 4  # the epoch keeps its size in expectation
    assert all(abs(shares[c] / total - 1 / 3) < 0.1 for c in CLASSES)
    assert len({tuple(e) for e in drawn}) == len(drawn) and drawn == epochs(seed=1) and drawn != epochs(seed=2)


@pytest.fixture(scope="module")
def model(packs):
    return make_checkpoint(f"{packs['root']}/model", classes=list(CLASSES), image_size=32)


@pytest.fixture(scope="module")
def hf_and_wds(tmp_path_factory, bad_images):
    root = tmp_path_factory.mktemp("hf-wds")
    os.makedirs(root / "hf")
    os.makedirs(root / "wds")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    write_hf_parquet(str(root / "hf"), bad_images["truncated.jpg"][0])
    write_webdataset(str(root / "wds"), bad_images["corrupt.jpg"][0])
    return {"hf": str(root / "hf"), "wds": str(root / "wds")}


def predictions(out: str) -> dict[str, str]:
    table = pq.read_table(f"{out}/predictions.parquet").to_pylist()
    return {r["path"]: r["label"] for r in table}


def test_evaluate_reads_a_pack_hf_parquet_and_webdataset(packs, model, hf_and_wds):
    from distcls.evaluate import run_evaluation

    ids, labels = open_packed(packs["pack"]).paths_and_labels("val")
    report = run_evaluation(EvaluateConfig(checkpoint=model, data=packs["pack"], out=f"{packs['root']}/ev-pack"))
    assert report["split"] == "val" and report["num_samples"] == 12 and report["skipped"] == 0
    assert predictions(f"{packs['root']}/ev-pack") == {i: CLASSES[y] for i, y in zip(ids, labels)}
    report = run_evaluation(EvaluateConfig(checkpoint=model, data=hf_and_wds["hf"], out=f"{packs['root']}/ev-hf"))
    assert (report["split"], report["num_samples"], report["skipped_by_kind"]) == ("val", 2, {"truncated": 1})
    assert predictions(f"{packs['root']}/ev-hf") == {"validation/1.png": "cat", "validation/2.png": "coffee"}
    # WebDataset without classes.txt: --class-names names its `cls` integers (here in another order than the model's)
    wds = EvaluateConfig(
        checkpoint=model, data=hf_and_wds["wds"], out=f"{packs['root']}/ev-wds", class_names=("coffee", "cat", "astronaut")
    )
    report = run_evaluation(wds)
    assert (report["split"], report["num_samples"], report["skipped_by_kind"]) == ("val", 2, {"corrupt": 1})
    shard = f"{hf_and_wds['wds']}/val-000000.tar"
    assert predictions(f"{packs['root']}/ev-wds") == {f"{shard}#val-000000-s000": "coffee", f"{shard}#val-000000-s001": "cat"}


def test_calibrate_compare_soup_and_export_read_packed_data(packs, model, hf_and_wds):
    from distcls.calibrate import run_calibrate
    from distcls.compare import run_compare
    from distcls.train.soup import run_soup

    out = run_calibrate(CalibrateConfig(checkpoint=model, data=packs["pack"], out=f"{packs['root']}/calibrated"))
    assert out["calibration"]["images"] == 12 and out["calibration"]["data"] == f"{packs['pack']} (val split)"
    record = run_compare(CompareConfig(models=(model,), data=hf_and_wds["wds"], out=f"{packs['root']}/cmp", speed_batches=1))
    assert record["setup"]["split"] == "val" and record["models"][0]["num_samples"] == 2 and record["models"][0]["skipped"] == 1
    limited = run_compare(
        CompareConfig(models=(model,), data=packs["pack"], out=f"{packs['root']}/cmp2", limit_per_class=2, speed_batches=1)
    )
    assert limited["models"][0]["num_samples"] == 6
    other = make_checkpoint(f"{packs['root']}/model2", classes=list(CLASSES), image_size=32, seed=1)
    soup = run_soup(SoupConfig(checkpoints=(model, other), data=packs["pack"], out=f"{packs['root']}/soup"))
    assert soup["val_samples"] == 12 and soup["calibration"]["data"] == packs["pack"]


def test_training_objects_and_packed_splits_agree_on_counts(packs):
    index_split = open_labeled(packs["src"])
    packed = open_labeled(packs["noval"])
    assert index_split.counts() == packed.counts() == dict.fromkeys(CLASSES, 14)
    assert len(packed.sample_bytes(5)) == 5 and packed.sample_images(PreprocessSpec(image_size=32)).shape[1:] == (3, 32, 32)
    meta = json.loads(storage.read_text(f"{packs['noval']}/_dataset.json"))
    assert sum(s["rows"] for s in meta["splits"]["train"]["shards"]) == len(packed)


@pytest.mark.slow
def test_export_checks_its_agreement_on_packed_sample_images(packs, model):
    from distcls.config import ExportConfig
    from distcls.export import run_export

    meta = run_export(ExportConfig(checkpoint=model, out=f"{packs['root']}/onnx", sample=packs["pack"], sample_size=8))
    assert meta["export"]["agreement"]["images"] == 8 and meta["export"]["sample"] == packs["pack"]


def test_label_reads_packed_rows_and_resumes_by_their_path(packs, model):
    from distcls.config import LabelConfig
    from distcls.label.job import run_labeling
    from distcls.label.parts import existing_parts

    packed = open_packed(packs["pack"])
    ids = packed.paths_and_labels("train")[0] + packed.paths_and_labels("val")[0]
    out = f"{packs['root']}/labels"
    cfg = LabelConfig(checkpoint=model, input=packs["pack"], output=out, part_rows=10)
    summary = run_labeling(cfg, progress=False)
    assert summary["complete"] and summary["labeled"] == summary["total"] == 42

    def rows() -> list[dict]:
        return [r for part in existing_parts(out) for r in pq.read_table(part).to_pylist()]

    assert sorted(r["path"] for r in rows()) == sorted(ids) and all(r["label"] in CLASSES for r in rows())
    lost = existing_parts(out)[0]
    n_lost = pq.read_metadata(lost).num_rows
    os.remove(lost)
    again = run_labeling(cfg, progress=False)  # the rows of the lost part, and no other, are labeled again
    assert again["labeled"] == n_lost and again["complete"] and sorted(r["path"] for r in rows()) == sorted(ids)


@pytest.mark.slow
def test_find_label_issues_folds_packed_data_by_a_hash_of_the_sample_id(packs):
    from distcls.config.curate import FindLabelIssuesConfig
    from distcls.curate.label_issues import hash_folds, run_find_label_issues

    out = f"{packs['root']}/issues"
    cfg = FindLabelIssuesConfig(data=packs["noval"], out=out, folds=2, epochs=1, image_size=32, batch_size=8, max_concurrent=1)
    summary = run_find_label_issues(cfg)
    ids = open_packed(packs["noval"]).paths_and_labels("train")[0]
    table = pq.read_table(f"{out}/label_issues.parquet").to_pylist()
    assert summary["images"] == summary["predicted"] == 42 and sorted(r["path"] for r in table) == sorted(ids)
    assert {r["path"]: r["fold"] for r in table} == dict(zip(ids, hash_folds(ids, 2, 0).tolist()))
    assert not storage.exists(f"{out}/folds/manifests")  # the folds read the shards, no per-image manifests

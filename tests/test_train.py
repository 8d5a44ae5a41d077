"""`distcls train` / `evaluate` end to end on the loopback S3 server and the shared local Ray instance."""

import json
import os
import subprocess
import sys

import pytest
import torch

from distcls import DistclsError, storage
from distcls.checkpoint import checkpoint_id, load_checkpoint, read_meta
from distcls.cli import main
from distcls.config import TrainConfig
from distcls.models import create_model
from distcls.tools.config import FASHION_MNIST_DEFAULT_DIR
from distcls.train.trainer import run_training
from tests.conftest import tiny_fashion_mnist, tiny_train_config

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DEFAULT_DIR), reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)"
)
BUCKET = "s3://train-test"
TINY = [
    "--model",
    "efficientnet_lite0",
    "--weights",
    "bundled",
    "--image-size",
    "32",
    "--batch-size",
    "8",
    "--num-workers",
    "2",
    "--storage",
    f"{BUCKET}/runs",
]


@pytest.fixture(scope="module")
def fm(s3_server, ray_local):
    return tiny_fashion_mnist(BUCKET)


def train_cfg(fm, name: str, **kw) -> TrainConfig:
    return tiny_train_config(fm, f"{BUCKET}/runs", name, **kw)


def test_train_then_evaluate_contracts(fm, tmp_path, capsys):
    code = main(["train", "--data", fm["train"], "--val-data", fm["val"], "--epochs", "2", "--name", "t1", "--keep", "1", *TINY])
    assert code == 0, capsys.readouterr().err
    result = json.loads(storage.read_text(f"{BUCKET}/runs/t1/result.json"))
    ckpt = result["checkpoint"]
    assert ckpt.startswith(f"{BUCKET}/runs/t1/checkpoint_")
    assert storage.exists(f"{ckpt}/model.safetensors") and storage.exists(f"{ckpt}/distcls.json")
    assert storage.read_bytes(f"{BUCKET}/runs/t1/curves.png")[:4] == b"\x89PNG"
    meta = read_meta(ckpt)
    assert meta["class_names"] == sorted(meta["class_names"]) and len(meta["class_names"]) == 10
    assert meta["config"]["epochs"] == 2 and meta["preprocessing"]["image_size"] == 32
    assert [h["epoch"] for h in result["epochs"]] == [1, 2]
    # the best checkpoint was calibrated on the 40 validation images: its record and id say so
    cal = meta["calibration"]
    assert cal["images"] == 40 and cal["temperature"] > 0 and cal == result["calibration"]
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9 and cal["data"] == fm["val"]
    assert checkpoint_id(meta) != meta["weights_sha256"]
    m = result["metrics"]
    for key in (
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_top5_accuracy",
        "val_macro_precision",
        "val_macro_recall",
        "val_macro_f1",
    ):
        assert key in m
    assert m["val_samples"] == 40 and m["val_accuracy"] == max(h["val_accuracy"] for h in result["epochs"])
    # keep=1: the best and the latest survive, nothing else.
    kept = {p.split("/")[4] for p in storage.list_files(f"{BUCKET}/runs/t1") if "/checkpoint_" in p}
    assert 1 <= len(kept) <= 2

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", ckpt, "--data", fm["val"], "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    assert report["calibrated"] and report["temperature"] == pytest.approx(cal["temperature"])
    assert report["ece"] == pytest.approx(cal["ece_after"], abs=1e-6) and report["nll"] == pytest.approx(cal["nll_after"])
    assert 0 <= report["brier"] <= 2 and sum(report["reliability"]["count"]) == 40
    assert "| accuracy |" in (out / "report.md").read_text()
    for key in (
        "accuracy",
        "top5_accuracy",
        "macro_precision",
        "macro_recall",
        "macro_f1",
        "weighted_f1",
        "per_class",
        "confusion_matrix",
        "num_samples",
        "skipped",
    ):
        assert key in report
    assert report["num_samples"] == 40 and report["skipped"] == 0
    assert sum(map(sum, report["confusion_matrix"])) == 40
    # Training-time validation and `evaluate` see the same model and data: the same accuracy.
    assert report["accuracy"] == pytest.approx(m["val_accuracy"], abs=1e-9)


def test_worker_failure_is_recovered_and_epochs_continue(fm, monkeypatch):
    # 80 images / 2 workers / batch 8 = 5 steps per epoch; step 7 is in epoch 2.
    monkeypatch.setenv("DISTCLS_TEST_FAULT", "7")
    result = run_training(train_cfg(fm, "fail1", max_failures=1, epochs=2))
    assert storage.exists(f"{BUCKET}/runs/fail1/fault-injected.txt")
    assert [h["epoch"] for h in result["epochs"]] == [1, 2]


def test_failure_without_retries_is_one_clear_error(fm, monkeypatch):
    monkeypatch.setenv("DISTCLS_TEST_FAULT", "1")
    with pytest.raises(DistclsError, match=r"train: run s3://train-test/runs/fail0 failed: .*fault injection"):
        run_training(train_cfg(fm, "fail0", max_failures=0, epochs=1))


def test_resume_continues_a_stopped_run(fm):
    first = run_training(train_cfg(fm, "r1", epochs=1))
    with pytest.raises(DistclsError, match="already exists; pass --resume"):
        run_training(train_cfg(fm, "r1", epochs=2))
    resumed = run_training(train_cfg(fm, "r1", epochs=2, resume=True))
    assert [h["epoch"] for h in resumed["epochs"]] == [1, 2]
    assert resumed["epochs"][0] == first["epochs"][0]  # epoch 1 was not redone
    with pytest.raises(DistclsError, match="nothing to resume"):
        run_training(train_cfg(fm, "never-ran", resume=True))


def test_linear_probe_leaves_backbone_unchanged(fm):
    result = run_training(train_cfg(fm, "probe", freeze="backbone", epochs=1, lr=0.01))
    trained, _ = load_checkpoint(result["checkpoint"])
    pretrained = create_model("efficientnet_lite0", 10, "bundled", image_size=32)
    before, after = pretrained.net.state_dict(), trained.net.state_dict()
    backbone = [k for k in before if not k.startswith("_fc.")]
    assert all(torch.equal(before[k], after[k]) for k in backbone)  # BN statistics included
    assert not torch.equal(before["_fc.weight"], after["_fc.weight"])


def test_jobs_entrypoint_help():
    result = subprocess.run([sys.executable, "jobs/train.py", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--max-failures" in result.stdout


@pytest.mark.parametrize("dataset", ["fashion-mnist", pytest.param("digits", marks=pytest.mark.slow)])
def test_default_recipe_learns_and_is_recorded(fm, tmp_path, dataset):
    """Nothing but data, budget and size given: the adaptive recipe trains on two different real datasets
    (photos of products; 8x8 handwritten digits read from local files), and says what it chose."""
    if dataset == "digits":
        from distcls.tools.recipe_data import write_digits

        write_digits(str(tmp_path / "digits"), test_size=200)
        data = dict(
            data=str(tmp_path / "digits" / "train"), val_data=str(tmp_path / "digits" / "test"), storage=str(tmp_path / "runs")
        )
    else:
        data = dict(data=fm["train"], val_data=fm["val"], storage=f"{BUCKET}/runs")
    result = run_training(TrainConfig(**data, image_size=32, batch_size=8, num_workers=2, epochs=5, name=f"recipe-{dataset}"))
    losses = [h["train_loss"] for h in result["epochs"]]
    # it learns within its steps (80 Fashion-MNIST images at 32 px is a hard, tiny set: a smaller factor)
    assert losses[-1] < (0.75 if dataset == "digits" else 0.9) * losses[0], losses
    recipe = result["recipe"]
    assert recipe["random_crops"] is False and recipe["backbone_lr_scale"] == 1.0 and recipe["cache_data"] is True
    meta = read_meta(result["checkpoint"])
    assert meta["recipe"] == recipe
    # The resolved values are the run's config: a reader of distcls.json sees what was used, never None.
    assert meta["config"]["backbone_lr_scale"] == 1.0 and meta["config"]["warmup_epochs"] == pytest.approx(0.5)
    assert meta["preprocessing"]["hflip"] is False
    assert result["metrics"]["val_accuracy"] > (0.3 if dataset == "digits" else 0.1)  # chance is 0.1

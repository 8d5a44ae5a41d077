"""What `distcls train --resume` checks before it continues a run: the checkpoint it resumes from must
verify (else the newest one that does is used, and the run says so), and must have been trained on the
same class names in index order, architecture and preprocessing. One real run (real Fashion-MNIST,
1 worker, 32 px, local storage) serves every test; the refusals happen on the driver, before Ray Train."""

import os
import shutil

import pytest

from distcls import DistclsError, storage
from distcls.checkpoint import WEIGHTS, verify_checkpoint
from distcls.cli import main
from distcls.config import TrainConfig
from distcls.models import default_spec
from distcls.tools.config import FASHION_MNIST_DEFAULT_DIR
from distcls.train.resume import TRAIN_STATE, compare_with_checkpoint, list_checkpoints
from distcls.train.trainer import run_training
from tests.conftest import tiny_fashion_mnist

needs_fm = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DEFAULT_DIR), reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    """A finished 2-epoch run: two checkpoints (epoch 1, epoch 2) in <storage>/first."""
    root = tmp_path_factory.mktemp("resume")
    fm = tiny_fashion_mnist(str(root / "data"))
    cfg = train_cfg(fm, str(root / "runs"))
    result = run_training(cfg)
    return {"fm": fm, "cfg": cfg, "root": root, "result": result, "run": result["run"]}


def train_cfg(fm: dict, runs: str, **kw) -> TrainConfig:
    base = dict(
        data=fm["train"],
        val_data=fm["val"],
        image_size=32,
        batch_size=8,
        num_workers=1,
        storage=runs,
        name="first",
        epochs=2,
        seed=7,
    )
    return TrainConfig(**{**base, **kw})


def rename_class(fm: dict, root, old: str, new: str) -> dict:
    """A copy of the data with one class folder renamed (same class count, so the model's head still fits)."""
    out = {}
    for split in ("train", "val"):
        copy = root / f"renamed-{split}"
        shutil.copytree(fm[split], copy)
        os.rename(copy / old, copy / new)
        out[split] = str(copy)
    return out


def argv(cfg: TrainConfig, data: dict) -> list[str]:
    return [
        "train",
        "--data",
        data["train"],
        "--val-data",
        data["val"],
        "--image-size",
        str(cfg.image_size),
        "--batch-size",
        "8",
        "--num-workers",
        "1",
        "--storage",
        cfg.storage,
        "--name",
        cfg.name,
        "--epochs",
        "2",
        "--seed",
        "7",
        "--resume",
    ]


@needs_fm
def test_resume_with_renamed_class_folder_is_refused(run, capsys):
    """'coat' renamed 'parka': still 10 classes, but sorted, index 2 is now 'dress' (it was 'coat') and every
    class up to 'parka' moved down by one. Resuming would train under a permuted mapping: refused, one line."""
    before = list_checkpoints(run["run"])
    renamed = rename_class(run["fm"], run["root"], "coat", "parka")
    capsys.readouterr()
    assert main(argv(run["cfg"], renamed)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(
        f"distcls: error: train: cannot resume run {run['run']}: class names differ from its "
        "checkpoint (index 2: 'coat' there, 'dress' here); resume with the data, --model and "
        "--image-size it was started with, or start a new run with another --name"
    ), err
    assert list_checkpoints(run["run"]) == before  # refused before any worker started

    with pytest.raises(DistclsError) as refused:
        run_training(train_cfg(run["fm"], run["cfg"].storage, image_size=40, model="mobilenet_v3_small", resume=True))
    message = str(refused.value)
    assert "architecture differs from its checkpoint ('efficientnet_lite0' there, 'mobilenet_v3_small' here)" in message
    assert "preprocessing differs from its checkpoint (image_size: 32 there, 40 here; resize_size: 36 there, " in message
    assert "class names" not in message and list_checkpoints(run["run"]) == before


@needs_fm
def test_checkpoints_record_train_state_sha256(run):
    """What the training worker writes: train_state.pt's sha256 in distcls.json, next to the weights'."""
    for ckpt in list_checkpoints(run["run"]):
        meta = verify_checkpoint(ckpt, files=(TRAIN_STATE,))
        assert set(meta["files_sha256"]) == {TRAIN_STATE}


@needs_fm
@pytest.mark.slow
def test_resume_with_damaged_latest_checkpoint_falls_back(run, capfd):
    """The latest checkpoint's weights are damaged after the run (a flipped byte): --resume restarts from
    epoch 1's checkpoint, says so in one line, and redoes epoch 2."""
    latest, previous = list_checkpoints(run["run"])[:2]
    assert verify_checkpoint(latest)["metrics"]["epoch"] == 2 and verify_checkpoint(previous)["metrics"]["epoch"] == 1
    weights = bytearray(storage.read_bytes(f"{latest}/{WEIGHTS}"))
    weights[-100] ^= 0x01
    storage.write_bytes(f"{latest}/{WEIGHTS}", bytes(weights))
    capfd.readouterr()

    resumed = run_training(train_cfg(run["fm"], run["cfg"].storage, resume=True))
    out = capfd.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("train: resuming run")]
    assert (
        lines
        == [
            line
            for line in lines
            if line.startswith(
                f"train: resuming run {run['run']} from {previous}, the newest checkpoint that verifies; skipped 1 newer: "
                f"checkpoint: {latest}/{WEIGHTS} has sha256 "
            )
        ]
        and len(lines) == 1
    ), out
    assert "the weights were changed or damaged, refusing to load" in lines[0]
    assert [h["epoch"] for h in resumed["epochs"]] == [1, 2]
    assert [h["restored_from_epoch"] for h in resumed["epochs"]] == [0, 1]
    assert resumed["epochs"][0] == run["result"]["epochs"][0]  # epoch 1 came from the checkpoint, not redone
    assert resumed["checkpoint"] != latest
    assert verify_checkpoint(resumed["checkpoint"], files=(TRAIN_STATE,))


def test_comparison_names_each_difference():
    """Without Ray: every difference of class map, architecture and input preprocessing is named; the
    training augmentation (which the recipe may choose anew on resume) and decode limits are not compared."""
    import dataclasses

    spec = default_spec("efficientnet_lite0", 32)
    meta = {"class_names": ["bag", "coat", "dress"], "architecture": "efficientnet_lite0", "preprocessing": spec.to_dict()}
    assert compare_with_checkpoint(meta, ["bag", "coat", "dress"], "efficientnet_lite0", spec) == []
    augment = dataclasses.replace(spec, crop_scale=(0.5, 1.0), hflip=False, max_pixels=spec.max_pixels // 2)
    assert compare_with_checkpoint(meta, ["bag", "coat", "dress"], "efficientnet_lite0", augment) == []
    assert compare_with_checkpoint(meta, ["bag", "dress", "coat"], "efficientnet_lite0", spec) == [
        "class names differ from its checkpoint (index 1: 'coat' there, 'dress' here)"
    ]
    assert compare_with_checkpoint(meta, ["bag", "coat"], "efficientnet_lite0", spec) == [
        "class names differ from its checkpoint (3 classes there, 2 here; index 2: 'dress' there, none here)"
    ]
    other = dataclasses.replace(spec, interpolation="nearest", mean=(0.5, 0.5, 0.5))
    assert compare_with_checkpoint(meta, ["bag", "coat", "dress"], "resnet18", other) == [
        "architecture differs from its checkpoint ('efficientnet_lite0' there, 'resnet18' here)",
        f"preprocessing differs from its checkpoint (mean: {list(spec.mean)!r} there, [0.5, 0.5, 0.5] here; "
        f"interpolation: {spec.interpolation!r} there, 'nearest' here)",
    ]
    broken = {**meta, "preprocessing": {"image_size": -1}}
    assert compare_with_checkpoint(broken, ["bag", "coat", "dress"], "efficientnet_lite0", spec)[0].startswith(
        "preprocessing differs from its checkpoint (the recorded spec is not valid: "
    )

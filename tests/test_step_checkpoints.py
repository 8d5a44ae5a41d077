"""Mid-epoch (step) checkpoints and the exact resume: a worker SIGKILLed in the middle of an epoch after a step
checkpoint; Ray Train restores the step checkpoint and the epoch goes on at the next unseen sample. Real Ray
Train, real Fashion-MNIST images, a real SIGKILL (the fault hook), per-sample consumption logs."""

from __future__ import annotations

import glob
from collections import Counter

import pytest

from distcls import storage
from distcls.checkpoint import load_checkpoint, read_meta
from distcls.config import ConfigError, TrainConfig
from distcls.train.data import CONSUMPTION_ENV
from distcls.train.position import drop_consumed, hash_ids, position_bytes, read_position
from distcls.train.resume import list_checkpoints
from tests.conftest import tiny_fashion_mnist, tiny_train_config


@pytest.fixture(scope="module")
def fm(ray_local, tmp_path_factory):
    return tiny_fashion_mnist(str(tmp_path_factory.mktemp("stepdata")))


def read_log(folder: str, epoch: int) -> list[str]:
    ids = []
    for path in sorted(glob.glob(f"{folder}/epoch-{epoch}-rank-*.txt")):
        with open(path) as f:
            ids += f.read().split()
    return ids


def one_worker(fm, runs: str, name: str, **kw) -> TrainConfig:
    # 80 images, batch 8, 1 worker: 10 steps in the epoch; a step checkpoint every 3 steps.
    base = dict(num_workers=1, epochs=1, checkpoint_every_steps=3, random_crops=False, val_data=fm["val"])
    return tiny_train_config(fm, runs, name, **{**base, **kw})


def killed_run(fm, runs: str, log, monkeypatch) -> dict:
    """A run SIGKILLed before step 7 (its last checkpoint: after 6 steps) and restored by Ray Train."""
    from distcls.train.trainer import run_training

    log.mkdir()
    monkeypatch.setenv(CONSUMPTION_ENV, str(log))
    monkeypatch.setenv("DISTCLS_TEST_FAULT", "7:kill")
    result = run_training(one_worker(fm, runs, "killed", max_failures=1, keep=1))
    assert storage.exists(f"{runs}/killed/fault-injected.txt")
    monkeypatch.delenv("DISTCLS_TEST_FAULT")
    monkeypatch.delenv(CONSUMPTION_ENV)
    return result


def test_a_run_killed_mid_epoch_resumes_at_the_next_unseen_sample(fm, tmp_path, monkeypatch):
    runs = str(tmp_path / "runs")
    killed_run(fm, runs, tmp_path / "consumed", monkeypatch)
    seen = Counter(read_log(str(tmp_path / "consumed"), 0))
    assert len(seen) == 80  # the epoch's union is exactly the dataset
    repeats = sum(seen.values()) - 80
    # Logged after the checkpoint and before the kill: the batches of steps 6 and 7 (7's was read, not trained on).
    assert repeats == 16, f"{repeats} repeated samples; only the 2 batches after the checkpoint may repeat"
    # Retention: Ray keeps --keep + --keep-step-checkpoints (1 + 2), epoch checkpoints first, then the newest
    # step ones: the step checkpoint at 3 steps went, those at 6 (the one restored) and 9 steps are kept.
    metas = [read_meta(uri)["metrics"] for uri in list_checkpoints(f"{runs}/killed")]
    assert sorted(m["step"] for m in metas if m.get("mid_epoch")) == [6, 9]
    assert [m["epoch"] for m in metas if not m.get("mid_epoch")] == [1]


@pytest.mark.slow  # two training runs
def test_a_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(fm, tmp_path, monkeypatch):
    from distcls.train.trainer import run_training

    runs = str(tmp_path / "runs")
    killed = killed_run(fm, runs, tmp_path / "consumed", monkeypatch)
    straight = run_training(one_worker(fm, runs, "straight", keep=1))
    a, _ = load_checkpoint(killed["checkpoint"])
    b, _ = load_checkpoint(straight["checkpoint"])
    diffs = [float((x.float() - y.float()).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values())]
    assert max(diffs) == 0.0, f"weights differ by up to {max(diffs)}"  # same batches, same RNG states, CPU: bitwise
    assert killed["metrics"]["train_loss"] == pytest.approx(straight["metrics"]["train_loss"], rel=1e-6)
    assert not read_meta(straight["checkpoint"])["metrics"].get("mid_epoch")  # a step checkpoint is never the best


def test_drop_consumed_keeps_the_order_of_the_rest_and_only_in_its_epoch():
    import numpy as np

    ids = np.asarray([f"s3://b/{i}.png" for i in range(10)], dtype=object)
    consumed = read_position(position_bytes(hash_ids(ids[[7, 2, 3]])))
    batch = {"path": ids, "label": np.arange(10)}
    kept = drop_consumed(batch, epoch=0, consumed=consumed)  # outside Ray Data the execution index is 0
    assert kept["label"].tolist() == [0, 1, 4, 5, 6, 8, 9]
    assert drop_consumed(batch, epoch=1, consumed=consumed)["label"].tolist() == list(range(10))


def test_num_workers_takes_a_range_and_an_elastic_run_tolerates_lost_nodes():
    cfg = TrainConfig(data="d", num_workers=(1, 2))
    assert (cfg.scaling_workers, cfg.max_workers, cfg.max_failures) == ((1, 2), 2, 3)
    assert TrainConfig(data="d", num_workers=2).scaling_workers == 2 and TrainConfig(data="d").max_failures == 0
    assert TrainConfig(data="d", num_workers=(1, 2), max_failures=0).max_failures == 0  # given: kept
    with pytest.raises(ConfigError, match=r"--num-workers '3,1': give N or MIN,MAX with 1 <= MIN <= MAX"):
        TrainConfig(data="d", num_workers=(3, 1))


def test_a_failed_calibration_is_a_failure_with_the_fix_and_no_calibrate_skips_it(fm, tmp_path):
    """The end-of-training calibration's failure (here: the best checkpoint is gone when it runs) is returned to the
    run, which writes result.json and exits non-zero; --no-calibrate skips the step."""
    from distcls.splits import open_labeled
    from distcls.train.trainer import calibrate

    val = open_labeled(fm["val"])
    gone = str(tmp_path / "no-such-checkpoint")
    record, failure = calibrate(TrainConfig(data=fm["train"]), gone, val)
    assert record is None
    assert str(failure).startswith("calibration failed (") and f"distcls calibrate --checkpoint {gone}" in str(failure)
    assert "--no-calibrate" in str(failure)
    assert calibrate(TrainConfig(data=fm["train"], no_calibrate=True), gone, val) == (None, None)

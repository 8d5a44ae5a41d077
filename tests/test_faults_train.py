"""Training faults injected for real: a training worker SIGKILLed mid-epoch, the driver SIGKILLed after a
checkpoint. Real Fashion-MNIST on the loopback S3 server, real Ray (the session's, or a fresh local one
in a subprocess for the driver that is killed)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distcls import DistclsError, storage
from distcls.checkpoint import META, WEIGHTS, verify_checkpoint
from distcls.config import TrainConfig
from distcls.tools.config import FASHION_MNIST_DEFAULT_DIR
from distcls.train.trainer import run_training
from tests.conftest import tiny_fashion_mnist, tiny_train_config

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DEFAULT_DIR), reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)"
)
BUCKET = "s3://faults-train"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints


@pytest.fixture(scope="module")
def fm(s3_server, ray_local):
    return tiny_fashion_mnist(BUCKET)


def train_cfg(fm, name: str, **kw) -> TrainConfig:
    return tiny_train_config(fm, f"{BUCKET}/runs", name, seed=7, **kw)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_worker_without_retries_is_one_clear_error(fm, monkeypatch):
    started = time.monotonic()
    monkeypatch.setenv("DISTCLS_TEST_FAULT", "7:kill")  # rank 0 SIGKILLs itself at step 7 (test hook)
    with pytest.raises(DistclsError) as err:
        run_training(train_cfg(fm, "kill0", max_failures=0, epochs=2))
    message = str(err.value)
    assert message.startswith("train: run s3://faults-train/runs/kill0 failed: ") and "\n" not in message
    assert "died" in message and "--max-failures" in message, message
    marker = storage.read_text(f"{BUCKET}/runs/kill0/fault-injected.txt")
    pid = int(marker.split("pid ")[1])
    assert marker.startswith("injected (kill) at step 7") and not pid_alive(pid)
    assert not storage.exists(f"{BUCKET}/runs/kill0/result.json")
    print(f"\nkill0: worker pid {pid} SIGKILLed at step 7 (epoch 2); failed after {time.monotonic() - started:.1f}s: {message}")


@pytest.mark.slow
def test_killed_worker_recovers_from_checkpoint_with_same_accuracy(fm, monkeypatch):
    """80 images / 2 workers / batch 8 = 5 steps per epoch: step 7 is in epoch 2. At 64 px and lr 3e-3 the
    model learns (validation accuracy ~0.4 after 3 epochs, chance is 0.1), so the comparison means something."""
    learns = dict(epochs=3, image_size=64, lr=3e-3)
    base = run_training(train_cfg(fm, "kill-base", **learns))
    started = time.monotonic()
    monkeypatch.setenv("DISTCLS_TEST_FAULT", "7:kill")
    killed = run_training(train_cfg(fm, "kill2", max_failures=2, **learns))
    marker = storage.read_text(f"{BUCKET}/runs/kill2/fault-injected.txt")
    pid = int(marker.split("pid ")[1])
    assert marker.startswith("injected (kill) at step 7") and not pid_alive(pid)
    # Restored from epoch 1's checkpoint (Ray forwards the workers' "resuming from" line asynchronously,
    # so the record is what is checked).
    assert [h["restored_from_epoch"] for h in killed["epochs"]] == [0, 1, 1]
    assert [h["restored_from_epoch"] for h in base["epochs"]] == [0, 0, 0]
    assert [h["epoch"] for h in killed["epochs"]] == [1, 2, 3]
    assert [h["step"] for h in killed["epochs"]] == [5, 10, 15]
    assert without_timings(killed["epochs"][0]) == without_timings(base["epochs"][0])
    for b, k in zip(base["epochs"], killed["epochs"]):
        assert k["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=0.01)
        assert k["val_loss"] == pytest.approx(b["val_loss"], abs=1e-3)
    final_base, final_killed = base["epochs"][-1]["val_accuracy"], killed["epochs"][-1]["val_accuracy"]
    assert abs(final_killed - final_base) <= 0.01 and final_base >= 0.2  # within 1 point; above chance
    print(
        f"\nkill2: worker pid {pid} SIGKILLed at step 7 (epoch 2); run finished in "
        f"{time.monotonic() - started:.1f}s; final val_accuracy {final_killed:.4f} vs uninterrupted "
        f"{final_base:.4f}; val_loss {killed['epochs'][-1]['val_loss']:.6f} vs {base['epochs'][-1]['val_loss']:.6f}"
    )


TIMINGS = (
    "train_images_per_s_per_worker",
    "data_wait_fraction",
    "data_wait_seconds",
    "train_seconds",
    "epoch_seconds",
    "worker_nodes",
)


def without_timings(epoch: dict) -> dict:
    return {k: v for k, v in epoch.items() if k not in TIMINGS}


def read_snapshot_epochs(run: str) -> list[int]:
    """Epochs of the checkpoints Ray Train has registered in the run directory (its resume record)."""
    uri = storage.join_uri(run, SNAPSHOT)
    if not storage.exists(uri):
        return []
    state = json.loads(storage.read_text(uri))
    return sorted(
        json.loads(r["metrics"])["epoch"] if isinstance(r["metrics"], str) else r["metrics"]["epoch"]
        for r in state["checkpoint_results"]
    )


@pytest.mark.slow
def test_killed_driver_resumes_at_next_epoch(fm, s3_server, tmp_path, capfd):
    """The driver (`distcls train`, its own local Ray) is SIGKILLed once epoch 1's checkpoint is registered.

    The subprocess runs in a new session, so the Ray instance it started (GCS, raylet, workers) is its
    process group: after killing the driver we wait for that group to go away and then remove what is
    left of it, as a supervisor restarting a crashed driver would; the rerun uses the test's Ray.
    """
    run = f"{BUCKET}/runs/drv"
    args = [
        "--data",
        fm["train"],
        "--val-data",
        fm["val"],
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--num-workers",
        "2",
        "--storage",
        f"{BUCKET}/runs",
        "--name",
        "drv",
        "--epochs",
        "3",
        "--seed",
        "7",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "distcls.cli", "train", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = time.monotonic()
    try:
        while not read_snapshot_epochs(run):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() - started < 600, "no checkpoint within 10 minutes"
            time.sleep(0.5)
        registered = read_snapshot_epochs(run)
        os.kill(driver.pid, signal.SIGKILL)
        killed_at = time.monotonic() - started
        driver.wait(timeout=30)
    finally:
        orphans = kill_group(driver.pid)
    before = read_snapshot_epochs(run)
    assert registered == before and max(before) < 3, before
    k = max(before)
    assert not storage.exists(f"{run}/result.json")  # the killed run never finished
    # What a driver killed during an upload leaves: checkpoint folders claiming a perfect score, cut short.
    planted = plant_interrupted_uploads(run)

    resumed = run_training(train_cfg(fm, "drv", epochs=3, resume=True))
    out = capfd.readouterr().out
    assert f"at epoch {k + 1}" in out
    assert [h["epoch"] for h in resumed["epochs"]] == [1, 2, 3]
    assert json.loads(storage.read_text(f"{run}/result.json"))["epochs"] == resumed["epochs"]
    assert resumed["checkpoint"] not in planted and resumed["metrics"]["val_accuracy"] < 1.0
    assert verify_checkpoint(resumed["checkpoint"])["metrics"]["epoch"] == resumed["metrics"]["epoch"]

    fresh = run_training(train_cfg(fm, "drv-new", epochs=1))
    assert "resuming from" not in capfd.readouterr().out
    assert [h["epoch"] for h in fresh["epochs"]] == [1] and fresh["epochs"][0]["step"] == 5
    print(
        f"\ndriver pid {driver.pid} SIGKILLed {killed_at:.1f}s after start with checkpoint(s) of epoch(s) "
        f"{before} registered; {orphans} orphaned Ray process(es) of its group removed; the rerun resumed at "
        f"epoch {k + 1} and finished epochs {[h['epoch'] for h in resumed['epochs']]}"
    )


def plant_interrupted_uploads(run: str) -> list[str]:
    """Two checkpoint folders as a killed upload leaves them: weights cut short; weights but no distcls.json."""
    latest = sorted(p.rsplit("/", 1)[0] for p in storage.list_files(run) if p.endswith(f"/{META}"))[-1]
    weights = storage.read_bytes(f"{latest}/{WEIGHTS}")
    meta = json.loads(storage.read_text(f"{latest}/{META}"))
    meta["metrics"] = {**meta["metrics"], "val_accuracy": 1.0}
    cut, no_meta = f"{run}/checkpoint_2099-01-01_00-00-00.000000", f"{run}/checkpoint_2099-01-02_00-00-00.000000"
    storage.write_text(f"{cut}/{META}", json.dumps(meta))
    storage.write_bytes(f"{cut}/{WEIGHTS}", weights[: len(weights) // 2])
    storage.write_bytes(f"{no_meta}/{WEIGHTS}", weights)
    return [cut, no_meta]


def kill_group(pgid: int, grace: float = 10.0) -> int:
    """SIGKILL what is left of process group `pgid` (this test's subprocess and the Ray it started)."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and group_pids(pgid):
        time.sleep(0.5)
    left = group_pids(pgid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return pids

"""MLflow tracking: a real local file store read back with MLflow's own client, and the metrics callback
inside a real Ray Train V2 run."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from distcls.tracking import Tracker, metrics_callback, tracking_uri_for


@pytest.fixture(autouse=True)
def no_file_store_opt_in(monkeypatch):
    """Each test starts without MLFLOW_ALLOW_FILE_STORE (the module must set it) and leaves none behind."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


def read_client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri_for(str(store)))


def test_tracker_round_trip(tmp_path):
    store = tmp_path / "mlruns"
    params = {"model": "efficientnet_lite0", "optim": {"lr": 0.001, "betas": [0.9, 0.999]}, "name": None, "long": "x" * 7000}
    tracker = Tracker.start(str(store), "exp-a", "run-1", params, tags={"job": "train"})
    assert tracker.tracking_uri == f"file://{store}"
    for step, acc in enumerate([0.5, float("nan"), 0.7], start=1):
        tracker.log_metrics({"val_accuracy": acc, "loss": 1.0 / step, "note": "text", "lr": None}, step=step)
    tracker.log_artifact_bytes("curves.png", b"\x89PNG not really")
    tracker.finish("file:///x/ckpt")

    client = read_client(store)
    experiment = client.get_experiment_by_name("exp-a")
    run = client.get_run(tracker.run_id)
    assert run.info.experiment_id == experiment.experiment_id
    assert run.info.run_name == "run-1"
    assert run.info.status == "FINISHED"
    assert run.data.tags["checkpoint"] == "file:///x/ckpt"
    assert run.data.tags["job"] == "train"
    got = run.data.params
    assert got["model"] == "efficientnet_lite0"
    assert got["optim.lr"] == "0.001"
    assert got["optim.betas"] == "[0.9, 0.999]"
    assert got["name"] == "None"
    assert len(got["long"]) == 6000
    assert set(run.data.metrics) == {"val_accuracy", "loss"}  # the string and the None are skipped
    loss = client.get_metric_history(tracker.run_id, "loss")
    assert [m.step for m in loss] == [1, 2, 3]
    assert [m.value for m in loss] == pytest.approx([1.0, 0.5, 1 / 3])
    acc = client.get_metric_history(tracker.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in acc] == [(1, 0.5), (3, 0.7)]  # the NaN is skipped
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["curves.png"]
    local = client.download_artifacts(tracker.run_id, "curves.png", str(tmp_path / "dl"))
    with open(local, "rb") as f:
        assert f.read() == b"\x89PNG not really"


def test_second_run_reuses_experiment_and_failed_status(tmp_path):
    store = str(tmp_path / "mlruns")
    first = Tracker.start(store, "exp-b", "a", {})
    second = Tracker.start(store, "exp-b", "b", {"p": 1})
    first.finish(None)
    second.finish(None, status="FAILED")
    client = read_client(store)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("exp-b").experiment_id])}
    assert runs["a"].info.status == "FINISHED" and "checkpoint" not in runs["a"].data.tags
    assert runs["b"].info.status == "FAILED"


def test_tracking_uri_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking_uri_for("mlruns") == f"file://{tmp_path}/mlruns"
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
    assert tracking_uri_for(f"file://{tmp_path}/x") == f"file://{tmp_path}/x"
    assert tracking_uri_for("file:rel") == f"file://{tmp_path}/rel"
    for uri in ("http://mlflow.example:5000", "https://x/y", "databricks", "sqlite:///db.sqlite"):
        assert tracking_uri_for(uri) == uri


def test_import_is_light():
    code = "import sys, distcls.tracking; print(sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_callback_pickles_by_reference():
    from distcls.tracking import MetricsCallback

    callback = metrics_callback("file:///x", "abc")
    data = pickle.dumps(callback)
    assert b"distcls.tracking" in data and b"MetricsCallback" in data
    again = pickle.loads(data)
    assert type(again) is MetricsCallback and (again.tracking_uri, again.run_id) == ("file:///x", "abc")


def test_missing_mlflow_is_one_clear_line(tmp_path, monkeypatch):
    from distcls import DistclsError
    from distcls.tracking import MISSING_MLFLOW

    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError, as when not installed
    with pytest.raises(DistclsError) as err:
        Tracker.start(str(tmp_path / "mlruns"), "exp", "run", {})
    assert str(err.value) == MISSING_MLFLOW


def test_callback_in_ray_train_run(ray_local, tmp_path):
    import ray.train
    import ray.train.v2.api.config
    from ray.train.torch import TorchTrainer

    store = str(tmp_path / "mlruns")
    tracker = Tracker.start(store, "exp-ray", "ray-run", {"epochs": 3})

    def train_func(cfg):
        for e in range(3):
            ray.train.report({"epoch": e + 1, "val_accuracy": 0.1 * e, "phase": "train"})

    trainer = TorchTrainer(
        train_func,
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(
            storage_path=str(tmp_path / "runs"),
            name="t",
            logging_config=ray.train.v2.api.config.LoggingConfig(log_level="WARNING"),
            callbacks=[metrics_callback(store, tracker.run_id)],
        ),
    )
    trainer.fit()
    tracker.finish(None)

    history = read_client(store).get_metric_history(tracker.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.0), (2, pytest.approx(0.1)), (3, pytest.approx(0.2))]


def test_redact_uri_masks_passwords_and_signed_query_values():
    from distcls.redact import redact_uri, redact_values

    assert redact_uri("https://alice:hunter2@mlflow.example:5000/x") == "https://alice:***@mlflow.example:5000/x"
    presigned = (
        "https://s3.example/b/k.csv?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Security-Token=tok&X-Amz-Signature=ab12"
    )
    assert redact_uri(presigned) == (
        "https://s3.example/b/k.csv?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Signature=***"
    )
    assert redact_uri("http://h/p?sig=x&key=y&secret=z&password=w&token=v&page=2#top") == (
        "http://h/p?sig=***&key=***&secret=***&password=***&token=***&page=2#top"
    )
    for unchanged in (
        "s3://bucket/runs",
        "file:///tmp/mlruns",
        "/local/path",
        "databricks",
        "sqlite:///db.sqlite",
        "http://h:1/p?a=1",
    ):
        assert redact_uri(unchanged) == unchanged
    assert redact_values({"a": ["https://u:p@h"], "b": ("s3://x?token=t",), "c": 1, "d": None}) == {
        "a": ["https://u:***@h"],
        "b": ("s3://x?token=***",),
        "c": 1,
        "d": None,
    }


def test_tracker_logs_no_credentials(tmp_path):
    """Params, tags and the checkpoint tag with a password and a signature in them: read back from the real
    file store, and no file of the store holds either secret."""
    store = tmp_path / "mlruns"
    params = {
        "tracking_uri": "https://alice:hunter2@mlflow.example",
        "data": "https://s3.example/b/train.csv?X-Amz-Signature=deadbeef42",
        "sources": ["https://bob:swordfish@h/a"],
    }
    tracker = Tracker.start(str(store), "exp-r", "r", params, tags={"run": "https://carol:opensesame@h/run"})
    tracker.finish("https://h/ckpt?token=letmein")
    run = read_client(store).get_run(tracker.run_id)
    assert run.data.params["tracking_uri"] == "https://alice:***@mlflow.example"
    assert run.data.params["data"] == "https://s3.example/b/train.csv?X-Amz-Signature=***"
    assert run.data.params["sources"] == "['https://bob:***@h/a']"
    assert run.data.tags["run"] == "https://carol:***@h/run"
    assert run.data.tags["checkpoint"] == "https://h/ckpt?token=***"
    written = b"".join(p.read_bytes() for p in store.rglob("*") if p.is_file())
    for secret in (b"hunter2", b"deadbeef42", b"swordfish", b"opensesame", b"letmein"):
        assert secret not in written


def test_training_run_records_no_credentials(ray_local, tmp_path):
    """A real `distcls train` run whose --tracking-uri carries a token: every checkpoint's distcls.json and
    the MLflow run hold `***` where the token was."""
    from distcls.checkpoint import read_meta
    from distcls.train.trainer import run_training
    from tests.conftest import tiny_fashion_mnist, tiny_train_config

    fm = tiny_fashion_mnist(str(tmp_path / "data"))
    store = tmp_path / "mlruns"
    uri = f"file://{store}?token=s3cret-t0ken"  # the file store at `store` (the query is not part of its path)
    cfg = tiny_train_config(fm, str(tmp_path / "runs"), "redact", tracking_uri=uri, epochs=1, num_workers=1)
    result = run_training(cfg)
    meta = read_meta(result["checkpoint"])
    assert meta["config"]["tracking_uri"] == f"file://{store}?token=***"
    for record in (tmp_path / "runs" / "redact").rglob("distcls.json"):
        assert "s3cret-t0ken" not in record.read_text()
    client = read_client(store)
    (run,) = client.search_runs([client.get_experiment_by_name("distcls").experiment_id])
    assert run.data.params["tracking_uri"] == f"file://{store}?token=***"
    assert not any(b"s3cret-t0ken" in p.read_bytes() for p in store.rglob("*") if p.is_file())

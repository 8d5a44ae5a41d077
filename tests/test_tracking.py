"""MLflow tracking: a real local SQLite store (and a file store kept as one) read back with MLflow's own
client, also in a fresh process with no MLflow variable set; concurrent writers (processes, Tune trials);
the metrics callback inside a real Ray Train V2 run."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sqlite3
import subprocess
import sys
import textwrap

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
    assert tracker.tracking_uri == f"sqlite:///{store}/mlflow.db"
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # a database needs no opt-in
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
    stored = store / "artifacts" / "exp-a" / tracker.run_id / "artifacts" / "curves.png"  # under PATH, not ./mlruns
    assert stored.read_bytes() == b"\x89PNG not really"
    assert experiment.artifact_location == f"file://{store}/artifacts/exp-a"


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
    assert tracking_uri_for("mlruns") == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert tracking_uri_for("~/x") == f"sqlite:///{os.path.expanduser('~')}/x/mlflow.db"
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    assert tracking_uri_for(f"file://{tmp_path}/x") == f"file://{tmp_path}/x"  # an explicit file store
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
    assert tracking_uri_for("file:rel") == f"file://{tmp_path}/rel"
    assert tracking_uri_for("sqlite:///db.sqlite") == f"sqlite:///{tmp_path}/db.sqlite"  # trials run elsewhere
    assert tracking_uri_for("sqlite:///db.sqlite?timeout=9") == f"sqlite:///{tmp_path}/db.sqlite?timeout=9"
    for uri in ("http://mlflow.example:5000", "https://x/y", "databricks", "sqlite:////abs/db.sqlite", "sqlite://"):
        assert tracking_uri_for(uri) == uri


def test_existing_file_store_stays_one(tmp_path, monkeypatch):
    """A folder an older distcls filled as a file store keeps being used as one; a new run lands next to the
    old ones, and no database appears in it."""
    store = tmp_path / "mlruns"
    old = Tracker.start(f"file://{store}", "exp-old", "before", {})
    old.finish(None)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    assert tracking_uri_for(str(store)) == f"file://{store}"
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
    Tracker.start(str(store), "exp-old", "after", {}).finish(None)
    client = read_client(store)
    runs = client.search_runs([client.get_experiment_by_name("exp-old").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["after", "before"]
    assert not (store / "mlflow.db").exists()


READER = """
import json, sys
import mlflow

experiment, dst, uris = sys.argv[1], sys.argv[2], sys.argv[3:]
stores = []
for uri in uris:
    mlflow.set_tracking_uri(uri)
    out = []
    for run in mlflow.search_runs(experiment_names=[experiment], output_format="list"):
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="result.json", dst_path=dst)
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
        out.append({"name": run.info.run_name, "status": run.info.status, "steps": [m.step for m in history],
                    "artifact": open(path).read()})
    stores.append(sorted(out, key=lambda r: r["name"]))
print(json.dumps(stores))
"""


def read_in_fresh_process(experiment: str, tmp_path, *uris: str) -> list[list[dict]]:
    """What a new user does: MLflow alone, in a new process without any MLFLOW_ variable; the runs of
    `experiment` in each store of `uris`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW")}
    out = subprocess.run(
        [sys.executable, "-c", READER, experiment, str(tmp_path / "dl"), *uris], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fresh_process_reads_the_runs_with_mlflow_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = Tracker.start("mlruns", "exp-new", "r1", {"lr": 0.1})
    tracker.log_metrics({"loss": 0.5}, step=1)
    tracker.log_metrics({"loss": 0.25}, step=2)
    tracker.log_artifact_bytes("result.json", b'{"ok": true}')
    tracker.finish("file:///ckpt")
    # the absolute URI, and the relative one the docs show (`mlflow ui --backend-store-uri ...` run here)
    absolute, relative = read_in_fresh_process(
        "exp-new", tmp_path, f"sqlite:///{tmp_path}/mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"
    )
    run = {"name": "r1", "status": "FINISHED", "steps": [1, 2], "artifact": '{"ok": true}'}
    assert absolute == relative == [run]


WRITER = """
import os, sys, time
from distcls.tracking import Tracker

store, name, ready, others = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
open(ready, "w").close()
while not all(os.path.exists(p) for p in others):  # start together: both open the new database at once
    time.sleep(0.005)
tracker = Tracker.start(store, "race", name, {"name": name})
for step in range(1, 21):
    tracker.log_metrics({"loss": 1 / step, "acc": step / 20}, step=step)
tracker.log_artifact_bytes("result.json", name.encode())
tracker.finish(None)
"""


def test_two_processes_write_one_new_database_at_once(tmp_path):
    """Two writers (as two Tune trials, or a trial and a Ray Train controller) open the same new database at
    the same moment and log 20 steps each: no "database is locked", no half-migrated tables."""
    store = str(tmp_path / "mlruns")
    ready = [str(tmp_path / f"ready-{i}") for i in range(2)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, store, f"w{i}", ready[i], *ready], env=env, stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errors)
    client = read_client(store)
    runs = sorted(client.search_runs([client.get_experiment_by_name("race").experiment_id]), key=lambda r: r.info.run_name)
    assert [(r.info.run_name, r.info.status) for r in runs] == [("w0", "FINISHED"), ("w1", "FINISHED")]
    for run in runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 21))
    with contextlib.closing(sqlite3.connect(f"{store}/mlflow.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.slow  # ~30 s on the shared 2-core machine; the race itself is test_two_processes_write_one_new_database_at_once
def test_two_concurrent_tune_trials_track_to_one_database(ray_local, tmp_path):
    """Two Ray Tune trials at once, each its own MLflow run in the same local database (the way `distcls
    tune --tracking-uri PATH` logs: the URI resolved on the driver, each trial writing from its own process)."""
    from ray import tune

    store = tracking_uri_for(str(tmp_path / "mlruns"))
    ready = [str(tmp_path / f"ready-{i}") for i in range(2)]

    def trial(config):
        import time

        open(ready[config["i"]], "w").close()
        while not all(os.path.exists(p) for p in ready):
            time.sleep(0.005)
        tracker = Tracker.start(config["store"], "tune", f"trial-{config['i']}", {"i": config["i"]})
        for step in range(1, 31):
            tracker.log_metrics({"loss": 1 / step}, step=step)
        tracker.log_artifact_bytes("result.json", str(config["i"]).encode())
        tracker.finish(None)
        tune.report({"done": 1})

    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": 0.5}),
        param_space={"store": store, "i": tune.grid_search([0, 1])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="t", verbose=0),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    (runs,) = read_in_fresh_process("tune", tmp_path, store)
    assert [(r["name"], r["status"], r["steps"], r["artifact"]) for r in runs] == [
        ("trial-0", "FINISHED", list(range(1, 31)), "0"),
        ("trial-1", "FINISHED", list(range(1, 31)), "1"),
    ]


def test_missing_sql_store_is_one_clear_line(tmp_path):
    """mlflow-skinny alone (no sqlalchemy): a local path says what to install, in one line."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["sqlalchemy"] = None  # as when only mlflow-skinny is installed
        from distcls import DistclsError
        from distcls.tracking import Tracker
        try:
            Tracker.start({str(tmp_path / "mlruns")!r}, "exp", "run", {{}})
        except DistclsError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == (
        f"--tracking-uri sqlite:///{tmp_path}/mlruns/mlflow.db: MLflow's SQLite store needs sqlalchemy and alembic: "
        "pip install 'distcls[tracking]' (or pass a server URL)"
    )


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

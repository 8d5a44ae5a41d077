"""MLflow tracking for train, distill and tune (`--tracking-uri`; off by default).

What is logged, per run (one MLflow run per training run, one per Tune trial):

- at the start: the resolved config as params (nested values flattened to `a.b` keys, lists and None
  stringified, values cut to MLflow's 6000 characters) and any tags;
- while training: rank 0's metrics as each epoch is reported (`ray.train.report`), step = the epoch. The
  `metrics_callback` runs on the Ray Train controller, not in the workers, so no worker talks to MLflow;
- at the end: `curves.png` and `result.json` as artifacts, the best checkpoint's URI as the tag
  `checkpoint`, and the run's status (FINISHED, or FAILED when the job raised).

Every param and tag value goes through `distcls.redact.redact_uri` first: a password in a URI
(`--tracking-uri https://user:pw@host`, `--storage`, `--data`) or a presigned URL's signature is logged as `***`.

Where: `--tracking-uri` is either a local path (no scheme), which becomes an SQLite database
`PATH/mlflow.db` with the artifacts under `PATH/artifacts/` (MLflow's recommended local backend: its own
client and `mlflow ui` read it with no setting), or any URI MLflow understands (`http(s)://` server,
`databricks`, `sqlite://`, `file:`...), used as given. Local paths are made absolute (Tune trials run in
other working directories). A path that already holds an MLflow file store stays one, as does an explicit
`file:` URI: MLflow 3 refuses those ("maintenance mode") unless `MLFLOW_ALLOW_FILE_STORE=true`, which
`tracking_uri_for` sets (if unset) in each process that opens one.

SQLite and concurrent writers (parallel Tune trials, the Ray Train controller): the first process to open
a database creates MLflow's tables while holding a lock on the database's folder (two processes migrating
one new database at once fail), and turns on SQLite's WAL mode, so that readers (`mlflow ui`) never block
a writer; writers wait for each other (MLflow sets a 20 s busy timeout).

Only `MlflowClient` is used, never MLflow's fluent global API: several runs can be live in one process
(Tune trials). MLflow is imported only when tracking is on (extra `distcls[tracking]`: `mlflow-skinny` and
the SQL store's `sqlalchemy` and `alembic`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import posixpath
import tempfile
import threading
import time
from urllib.parse import urlparse

from distcls import DistclsError
from distcls.redact import redact_uri, redact_values

log = logging.getLogger(__name__)

MISSING_MLFLOW = "--tracking-uri needs MLflow: pip install 'distcls[tracking]' (or mlflow-skinny)"
MISSING_SQL = (
    "--tracking-uri {uri}: MLflow's SQLite store needs sqlalchemy and alembic: pip install 'distcls[tracking]' "
    "(or pass a server URL)"
)
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
BATCH = 100  # params/tags per log_batch request (MAX_PARAMS_TAGS_PER_BATCH)
DATABASE = "mlflow.db"  # a local --tracking-uri PATH -> PATH/mlflow.db, artifacts under PATH/artifacts
ARTIFACTS = "artifacts"


def tracking_uri_for(uri: str) -> str:
    """`--tracking-uri` -> the URI for MlflowClient: a local path becomes `sqlite:////abs/PATH/mlflow.db`,
    unless it already holds an MLflow file store; that one, or a `file:` URI, becomes `file:///abs/path`
    and allows MLflow's file store in this process (MLFLOW_ALLOW_FILE_STORE=true unless already set); a
    relative `sqlite:///` path is made absolute; anything else (http://, https://, databricks...) is
    returned unchanged."""
    parsed = urlparse(uri)
    if uri == "databricks":  # MLflow's name for the default Databricks workspace, not a folder
        return uri
    if parsed.scheme == "file":
        return _file_store(parsed.netloc + parsed.path)  # file://relative/x has the first part as netloc
    if parsed.scheme == "sqlite":
        return _absolute_sqlite(uri)
    if len(parsed.scheme) > 1:  # not a Windows drive letter either
        return uri
    path = os.path.abspath(os.path.expanduser(uri))
    if not os.path.exists(os.path.join(path, DATABASE)) and holds_file_store(path):
        return _file_store(path)
    return "sqlite:///" + os.path.join(path, DATABASE)


def _file_store(path: str) -> str:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return "file://" + os.path.abspath(os.path.expanduser(path))


def holds_file_store(path: str) -> bool:
    """Whether the folder `path` is an MLflow file store (its `.trash` folder, or an experiment's meta.yaml)."""
    if not os.path.isdir(path):
        return False
    if os.path.isdir(os.path.join(path, ".trash")):
        return True
    return any(os.path.isfile(os.path.join(path, entry, "meta.yaml")) for entry in os.listdir(path))


def _absolute_sqlite(uri: str) -> str:
    path = sqlite_path(uri)
    if path is None or os.path.isabs(uri[len("sqlite:///") :].split("?")[0]):
        return uri
    query = uri.partition("?")[2]
    return "sqlite:///" + path + ("?" + query if query else "")


def sqlite_path(uri: str) -> str | None:
    """The absolute path of the database file of a `sqlite:///` URI (None for any other URI, or in memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?")[0]
    return os.path.abspath(path) if path and path != ":memory:" else None


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: `artifacts/<experiment>` beside a local SQLite database (MLflow's
    default would be ./mlruns of whichever process created the experiment); None: MLflow's default."""
    path = sqlite_path(tracking_uri)
    if path is None:
        return None
    folder = "".join(c if c.isalnum() or c in "._-" else "_" for c in experiment).lstrip(".") or "_"
    return "file://" + os.path.join(os.path.dirname(path), ARTIFACTS, folder)


def _client(tracking_uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise DistclsError(MISSING_MLFLOW) from None
    _quiet_mlflow()
    uri = tracking_uri_for(tracking_uri)
    if sqlite_path(uri) is not None:
        _prepare_database(uri)
    return MlflowClient(uri)


_prepared: set[str] = set()


def _prepare_database(uri: str) -> None:
    """Once per process: create the database's tables (or check them) holding an exclusive lock on its
    folder, so that two processes never migrate one new database at once, and turn on WAL mode."""
    from mlflow.tracking import MlflowClient

    if uri in _prepared:
        return
    try:
        import alembic  # noqa: F401  (mlflow-skinny alone lacks both; MLflow would say "unsupported URI")
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise DistclsError(MISSING_SQL.format(uri=redact_uri(uri))) from None
    path = sqlite_path(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _folder_lock(os.path.dirname(path)):
        _use_wal(path)
        MlflowClient(uri).search_experiments(max_results=1)  # opens (and, if new, migrates) the store
    _prepared.add(uri)


def _use_wal(path: str) -> None:
    """SQLite's write-ahead log: readers and the writer no longer block each other (a property of the file)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as e:  # in use elsewhere in the old mode: MLflow's busy timeout still holds
            log.warning("MLflow: could not turn on WAL mode for %s: %s", path, e)


@contextlib.contextmanager
def _folder_lock(folder: str):
    """An exclusive advisory lock (flock) on a folder, between processes; none where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


_quieted = False


def _quiet_mlflow() -> None:
    """MLflow logs INFO lines (e.g. a run's UI URL for a server) on its own stderr handler; keep warnings."""
    global _quieted
    if not _quieted:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        _quieted = True


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, object] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _text(value: object, limit: int) -> str:
    text = value if isinstance(value, str) else str(value)  # lists, tuples, None, numbers
    return text if len(text) <= limit else text[: limit - 3] + "..."


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The finite numbers of `metrics` (flattened), as floats; strings, None, NaN and inf are left out."""
    out = {}
    for key, value in flatten(metrics).items():
        if isinstance(value, numbers.Real) and math.isfinite(value):
            out[key] = float(value)
    return out


class Tracker:
    """One MLflow run, driven from the job's driver: `start` -> `log_metrics`/`log_artifact_bytes` -> `finish`."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri_for(tracking_uri)
        self.run_id = run_id
        self._client = _client(self.tracking_uri)

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str, params: dict, tags: dict | None = None) -> Tracker:
        """Create `experiment` if missing, open a run named `run_name` in it and log `params` (flattened)."""
        client = _client(tracking_uri)
        experiment_id = _experiment_id(client, experiment)
        run_tags = {key: _text(redact_values(value), MAX_TAG_VALUE) for key, value in (tags or {}).items()}
        run = client.create_run(experiment_id, tags=run_tags, run_name=run_name)
        tracker = cls(tracking_uri, run.info.run_id)
        tracker.log_params(params)
        return tracker

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(key, _text(redact_values(value), MAX_PARAM_VALUE)) for key, value in flatten(params).items()]
        for i in range(0, len(items), BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + BATCH])

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log the finite numbers of `metrics` at `step`; anything else is skipped."""
        _log_metrics(self._client, self.run_id, metrics, step)

    def log_artifact_bytes(self, name: str, data: bytes) -> None:
        """Store `data` as the artifact `name` (e.g. "curves.png", or "plots/curves.png")."""
        folder, base = posixpath.split(name)
        with tempfile.TemporaryDirectory(prefix="distcls-mlflow-") as tmp:
            path = os.path.join(tmp, base)
            with open(path, "wb") as f:
                f.write(data)
            self._client.log_artifact(self.run_id, path, artifact_path=folder or None)

    def finish(self, checkpoint_uri: str | None, status: str = "FINISHED") -> None:
        """Tag the run with its best checkpoint's URI (when there is one) and end it with `status`
        (FINISHED, or FAILED when the job raised)."""
        if checkpoint_uri:
            self._client.set_tag(self.run_id, "checkpoint", redact_uri(checkpoint_uri))
        self._client.set_terminated(self.run_id, status=status)


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))
    except MlflowException:  # created meanwhile by another process (parallel Tune trials)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _log_metrics(client, run_id: str, metrics: dict, step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(key, value, now, int(step)) for key, value in numeric_metrics(metrics).items()]
    for i in range(0, len(items), 1000):  # MAX_METRICS_PER_BATCH
        client.log_batch(run_id, metrics=items[i : i + 1000])


class _MetricsLogger:
    """The body of MetricsCallback (a ray.train.UserCallback): rank 0's reported metrics -> the MLflow run.

    Runs on the Ray Train controller; it holds only strings so it pickles, and opens its client there on
    first use. A failure to log is a warning, never the end of the training run."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = None
        self._reports = 0

    def __getstate__(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tracking_uri"], state["run_id"])

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self._reports += 1
        if not metrics or metrics[0].get("mid_epoch"):  # a step checkpoint's report: no epoch metrics to log
            return
        step = metrics[0].get("epoch", self._reports)
        try:
            if self._client is None:
                self._client = _client(self.tracking_uri)  # in this process: MLFLOW_ALLOW_FILE_STORE, the DB's lock
            _log_metrics(self._client, self.run_id, metrics[0], int(step))
        except Exception as e:  # a tracking server hiccup must not fail hours of training
            log.warning("MLflow: could not log the metrics of step %s to run %s: %s", step, self.run_id, e)


_callback_lock = threading.Lock()


def __getattr__(name: str):
    """`MetricsCallback` is built on first use (it subclasses ray.train.UserCallback; importing this module
    does not import Ray). It is then a module attribute, so it pickles by reference."""
    if name != "MetricsCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _callback_lock:
        if "MetricsCallback" not in globals():
            from ray.train import UserCallback

            cls = type("MetricsCallback", (_MetricsLogger, UserCallback), {"__module__": __name__})
            cls.__doc__ = _MetricsLogger.__doc__
            globals()["MetricsCallback"] = cls
    return globals()["MetricsCallback"]


def metrics_callback(tracking_uri: str, run_id: str):
    """A Ray Train callback (for RunConfig(callbacks=[...])) that logs rank 0's metrics to the run `run_id`
    at each `ray.train.report`, step = the reported "epoch"."""
    return __getattr__("MetricsCallback")(tracking_uri, run_id)

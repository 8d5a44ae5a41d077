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

Where: `--tracking-uri` is either a local path (no scheme, or `file://`), which becomes a local MLflow file
store at that absolute path and needs no server, or any URI MLflow understands (`http(s)://` server,
`databricks`, `sqlite://`...), passed through as is. MLflow 3 refuses the file store ("maintenance mode")
unless `MLFLOW_ALLOW_FILE_STORE=true`; `tracking_uri_for` sets it (if unset) for local paths, in each process
that opens the store.

Only `MlflowClient` is used, never MLflow's fluent global API: several runs can be live in one process
(Tune trials). MLflow is imported only when tracking is on (extra `distcls[tracking]`, or `mlflow-skinny`).
"""

from __future__ import annotations

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
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
BATCH = 100  # params/tags per log_batch request (MAX_PARAMS_TAGS_PER_BATCH)


def tracking_uri_for(uri: str) -> str:
    """`--tracking-uri` -> the URI for MlflowClient: a local path (no scheme, or file://) becomes
    `file:///abs/path` and allows MLflow's file store in this process (MLFLOW_ALLOW_FILE_STORE=true unless
    already set); anything else (http://, https://, databricks, sqlite://...) is returned unchanged."""
    scheme = urlparse(uri).scheme
    if uri == "databricks":  # MLflow's name for the default Databricks workspace, not a folder
        return uri
    if scheme == "file":
        parsed = urlparse(uri)
        path = parsed.netloc + parsed.path  # file://relative/x has the first part as netloc
    elif len(scheme) <= 1:  # no scheme, or a Windows drive letter
        path = uri
    else:
        return uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return "file://" + os.path.abspath(os.path.expanduser(path))


def _client(tracking_uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise DistclsError(MISSING_MLFLOW) from None
    _quiet_mlflow()
    return MlflowClient(tracking_uri_for(tracking_uri))


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
        return client.create_experiment(name)
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
        if not metrics:
            return
        step = metrics[0].get("epoch", self._reports)
        try:
            if self._client is None:
                self._client = _client(self.tracking_uri)  # in this process: sets MLFLOW_ALLOW_FILE_STORE here too
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

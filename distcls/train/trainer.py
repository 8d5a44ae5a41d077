"""TrainConfig -> TorchTrainer (ScalingConfig, RunConfig, CheckpointConfig, FailureConfig) -> run directory.

Run directory `<storage>/<name>/`: Ray Train's checkpoints, `result.json` (best checkpoint URI and its
metrics) and `curves.png` (loss and accuracy per epoch).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from distcls import DistclsError, objects, storage
from distcls.calibrate import CalibrationFailed, calibrate_best_checkpoint
from distcls.config import TrainConfig
from distcls.datasets import format_counts
from distcls.metrics import balanced_class_weights, effective_number_weights
from distcls.models import default_spec
from distcls.runtime import init_ray
from distcls.splits import LabeledSplit
from distcls.train.data import (
    CONSUMPTION_ENV,
    EveryRowConfig,
    load_splits,
    sample_native_size,
    train_dataset,
    training_datasets,
)
from distcls.train.data import balance as balance  # re-exported: its old home
from distcls.train.position import CHECKPOINT_RANK
from distcls.train.recipe import Recipe, choose_recipe
from distcls.train.resume import compare_with_checkpoint, find_restorable, latest_registered

SCORE = "val_accuracy"


def run_uri_of(cfg: TrainConfig) -> str:
    return storage.join_uri(cfg.storage, cfg.name)


def storage_for_ray(uri: str):
    """(storage_path, storage_filesystem) for RunConfig; remote URIs go through our fsspec filesystem so
    that AWS_ENDPOINT_URL and the other AWS variables apply to Ray Train's uploads as well."""
    scheme, path = storage.split_uri(uri)
    if scheme == "file":
        return path, None
    fs, path = storage.get_pyarrow_filesystem(uri)
    return path, fs


def check_run_dir(cfg: TrainConfig) -> None:
    run = run_uri_of(cfg)
    exists = storage.exists(run) and bool(storage.list_files(run))
    if exists and not cfg.resume:
        raise DistclsError(f"train: run {run} already exists; pass --resume to continue it or choose another --name")
    if cfg.resume and not exists:
        raise DistclsError(f"train: nothing to resume at {run}; drop --resume to start a new run")


def check_resume(cfg: TrainConfig, class_names: list[str]) -> None:
    """On --resume, before Ray starts: the checkpoint the workers will restore (the newest that verifies)
    must have the same class names in index order, architecture and preprocessing as this run, else a
    renamed class folder would resume under a silently permuted mapping. Says so when it falls back."""
    if not cfg.resume:
        return
    run = run_uri_of(cfg)
    found = find_restorable(run, latest_registered(run))
    if found is None:
        return  # the run stopped before its first checkpoint: Ray Train starts it afresh
    problems = compare_with_checkpoint(found.meta, class_names, cfg.model, train_spec(cfg))
    if problems:
        raise DistclsError(
            f"train: cannot resume run {run}: " + "; ".join(problems) + "; resume with the data, "
            "--model and --image-size it was started with, or start a new run with another --name"
        )
    if found.skipped:
        print(found.fallback_line(run), flush=True)


RECIPE_FIELDS = ("backbone_lr_scale", "warmup_epochs", "label_smoothing", "random_crops", "crop_scale_min", "cache_data")


def resolve_recipe(cfg: TrainConfig, train: LabeledSplit) -> tuple[TrainConfig, Recipe]:
    """The config with every adaptive flag the user left unset filled in (see distcls.train.recipe)."""
    spec = default_spec(cfg.model, cfg.image_size)
    recipe = choose_recipe(
        num_train=len(train),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        num_workers=cfg.max_workers,
        image_size=spec.image_size,
        resize_size=spec.resize_size,
        native_size=sample_native_size(train, max_bytes=objects.max_object_bytes(cfg.max_object_mb)),
        pretrained=cfg.weights != "none",
        given={name: getattr(cfg, name) for name in RECIPE_FIELDS},
    )
    return dataclasses.replace(cfg, **{name: getattr(recipe, name) for name in RECIPE_FIELDS}), recipe


def train_spec(cfg: TrainConfig):
    """The preprocessing spec of a run (stored in its checkpoints): the model's eval transform, plus the
    run's training crops and flips (every --augment policy but none flips). `cfg` has its recipe resolved."""
    spec = default_spec(cfg.model, cfg.image_size)
    return dataclasses.replace(spec, crop_scale=(cfg.crop_scale_min, 1.0), hflip=cfg.augment != "none")


def loss_class_weights(cfg: TrainConfig, train: LabeledSplit) -> list[float] | None:
    """Per-class loss weights from the training counts: inverse frequency (--class-weights balanced) or
    the effective number of samples (--loss class-balanced); None for unweighted."""
    counts = list(train.counts().values())
    if cfg.loss == "class-balanced":
        return effective_number_weights(counts, cfg.cb_beta).tolist()
    if cfg.class_weights == "balanced":
        return balanced_class_weights(counts).tolist()
    return None


FAULT_ENV = "DISTCLS_TEST_FAULT"  # test hook, not a user option: "STEP" or "STEP:kill" (see worker.maybe_inject_failure)


def fault_from_env() -> dict | None:
    """The test hook's fault, read in the driver (Ray workers started earlier do not see a new variable)."""
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    step, _, mode = raw.partition(":")
    return {"at_step": int(step), "mode": mode or "raise"}


def build_trainer(cfg: TrainConfig, train: LabeledSplit, val: LabeledSplit, extra_meta: dict | None = None, callbacks=()):
    import ray.train
    import ray.train.v2.api.config
    from ray.train.torch import TorchTrainer

    from distcls.train.worker import train_func

    spec = train_spec(cfg)
    datasets = training_datasets(cfg, spec, train, val, objects.max_object_bytes(cfg.max_object_mb))
    loop_config = {
        "train": dataclasses.asdict(cfg),
        "class_names": train.class_names,
        "preprocessing": spec.to_dict(),
        "num_train": len(train),
        "has_val": "val" in datasets,  # validation is a dataset the workers split, like training's
        "class_weights": loss_class_weights(cfg, train),
        "run_uri": run_uri_of(cfg),
        "extra_meta": extra_meta or {},  # more fields for every checkpoint's distcls.json (e.g. the teacher)
        "fault": fault_from_env(),
        "consumption_log": os.environ.get(CONSUMPTION_ENV) or None,
    }
    storage_path, fs = storage_for_ray(cfg.storage)
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling_workers,
            use_gpu=cfg.use_gpu,
            placement_strategy=cfg.placement_strategy,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            callbacks=list(callbacks),
            logging_config=ray.train.v2.api.config.LoggingConfig(log_level="WARNING"),
            # A node drained for preemption is retried without counting against --max-failures (Ray's default
            # max_preemption_failures: unlimited); the step checkpoint taken at its notice is restored.
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep + cfg.keep_step_checkpoints,
                checkpoint_score_attribute=CHECKPOINT_RANK,  # see distcls.train.position: epoch ones rank first
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        dataset_config=EveryRowConfig(
            ingest_options(cfg.ordered_ingest),
            run_uri_of(cfg),
            functools.partial(train_dataset, cfg, spec, train, objects.max_object_bytes(cfg.max_object_mb)),
        ),
    )


def ingest_options(ordered: bool):
    """Ray Data options for the training shards. `ordered`: batches in a fixed order (Ray formats them in
    a thread pool, which reorders them otherwise); with the worker's per-epoch seeds, a run restarted from
    a checkpoint then replays the lost epochs as an uninterrupted run has them."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=current.resource_limits, preserve_order=ordered, verbose_progress=current.verbose_progress
    )


def checkpoint_uri(cfg: TrainConfig, checkpoint) -> str:
    """Ray's checkpoint path (inside the storage filesystem) as a URI users can pass back to distcls."""
    scheme, _ = storage.split_uri(cfg.storage)
    return storage.to_uri(scheme, checkpoint.path)


def run_training(
    cfg: TrainConfig,
    extra_meta: dict | None = None,
    check_classes: Callable[[list[str]], None] | None = None,
    callbacks: Sequence = (),
    announce: bool = True,
    splits: tuple[LabeledSplit, LabeledSplit] | None = None,
) -> dict:
    """Fine-tune as configured; returns the content of result.json. `check_classes(class_names)` may
    refuse the data before Ray starts; `extra_meta` goes into every checkpoint's distcls.json; `callbacks`
    are Ray Train UserCallbacks (Tune's report callback); `announce` prints the class counts; `splits`:
    (train, validation) instead of the ones --data and --val-data name (find-label-issues' folds)."""
    if cfg.name is None:
        cfg = dataclasses.replace(cfg, name="train-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    check_run_dir(cfg)
    train, val = splits or load_splits(cfg)
    if train.is_packed or val.is_packed:  # a set without stored counts is counted by a Ray Data pass
        init_ray(num_cpus=local_cpus(cfg))
    cfg, recipe = resolve_recipe(cfg, train)
    check_resume(cfg, train.class_names)
    if check_classes is not None:
        check_classes(train.class_names)
    if announce:
        print(format_counts(train, f"train {cfg.data}"))
        print(format_counts(val, f"validation {cfg.val_data or val_title(cfg, val)}"))
    print(recipe.line(), flush=True)
    tracker = start_tracking(cfg, recipe)
    if tracker is not None:
        from distcls.tracking import metrics_callback

        callbacks = [*callbacks, metrics_callback(tracker.tracking_uri, tracker.run_id)]
    init_ray(num_cpus=local_cpus(cfg))
    started = time.perf_counter()
    try:
        result = build_trainer(cfg, train, val, {**(extra_meta or {}), "recipe": recipe.to_dict()}, callbacks).fit()
    except BaseException as exc:
        if tracker is not None:
            tracker.finish(None, "FAILED" if isinstance(exc, Exception) else "KILLED")
        if not isinstance(exc, Exception):
            raise
        raise DistclsError(f"train: run {run_uri_of(cfg)} failed: {root_cause(exc)}") from exc
    best_uri, best_metrics = pick_best(
        [(checkpoint_uri(cfg, c), dict(m)) for c, m in result.best_checkpoints if not dict(m).get("mid_epoch")]
    )
    latest_meta = read_latest_meta(cfg, result)
    history = [dict(m) for m in latest_meta.get("history", [])]
    seconds = time.perf_counter() - started  # training only: the calibration below is not part of it
    calibration, failure = calibrate(cfg, best_uri, val)
    out = {
        "checkpoint": best_uri,
        "metrics": best_metrics,
        "calibration": calibration,
        "run": run_uri_of(cfg),
        "epochs": history,
        "resizes": latest_meta.get("resizes", []),  # an elastic run's worker count changes: epoch, step, from, to
        "recipe": recipe.to_dict(),
        "seconds": seconds,
    }
    if failure is not None:
        out["calibration_error"] = str(failure)
    result_json, curves = json.dumps(out, indent=2), plot_curves(history)
    storage.write_text(storage.join_uri(run_uri_of(cfg), "result.json"), result_json)
    storage.write_bytes(storage.join_uri(run_uri_of(cfg), "curves.png"), curves)
    if tracker is not None:
        tracker.log_artifact_bytes("result.json", result_json.encode())
        tracker.log_artifact_bytes("curves.png", curves)
        tracker.finish(best_uri, "FAILED" if failure is not None else "FINISHED")
    if failure is not None:  # result.json and the checkpoint are kept; the run is not done until calibrated
        raise DistclsError(f"train: run {run_uri_of(cfg)}: {failure}")
    return out


def calibrate(cfg: TrainConfig, best_uri: str, val: LabeledSplit) -> tuple[dict | None, Exception | None]:
    """The best checkpoint's temperature, fitted on the validation split: (record, None), or (None, why it
    failed). --no-calibrate skips it."""
    if cfg.no_calibrate:
        print("calibration: skipped (--no-calibrate)", flush=True)
        return None, None
    val_data = cfg.val_data or f"{cfg.data} ({val.split or 'validation'} split)"
    try:
        return calibrate_best_checkpoint(best_uri, val, val_data, num_gpus=1 if cfg.use_gpu else 0), None
    except CalibrationFailed as exc:
        return None, exc


def val_title(cfg: TrainConfig, val: LabeledSplit) -> str:
    return f"{cfg.data} (its {val.split} split)" if val.is_packed else f"({cfg.val_fraction:.0%} of --data)"


def start_tracking(cfg: TrainConfig, recipe: Recipe):
    """With --tracking-uri: an MLflow run named after the run, its params the resolved config and recipe."""
    if not cfg.tracking_uri:
        return None
    from distcls.tracking import Tracker

    params = {**dataclasses.asdict(cfg), "recipe": {k: v for k, v in recipe.to_dict().items() if k != "reasons"}}
    return Tracker.start(cfg.tracking_uri, cfg.experiment, cfg.name, params, tags={"run": run_uri_of(cfg)})


def pick_best(checkpoints: list[tuple[str, dict]]) -> tuple[str, dict]:
    """The highest-scoring checkpoint that verifies (complete, weights matching their sha256).

    One whose upload was interrupted or whose files were changed is skipped with a warning, never chosen.
    """
    from distcls.checkpoint import verify_checkpoint

    problems = []
    for uri, metrics in sorted(checkpoints, key=lambda cm: cm[1].get(SCORE, -1.0), reverse=True):
        try:
            verify_checkpoint(uri)
        except DistclsError as exc:
            problems.append(str(exc))
            print(f"warning: skipping checkpoint {uri}: {exc}", flush=True)
            continue
        return uri, metrics
    raise DistclsError("train: no complete checkpoint to report; " + ("; ".join(problems) or "none was written"))


def local_cpus(cfg: TrainConfig) -> int:
    """Logical CPUs for a local Ray instance: room for the workers plus Ray Data's decode tasks."""
    return max(os.cpu_count() or 1, int(np.ceil(cfg.max_workers * cfg.cpus_per_worker)) + 2)


def read_latest_meta(cfg: TrainConfig, result) -> dict:
    """The latest checkpoint's distcls.json: its per-epoch history and worker-count changes survive restarts
    and resumes."""
    from distcls.checkpoint import read_meta

    latest = result.checkpoint
    return read_meta(checkpoint_uri(cfg, latest)) if latest else {}


def root_cause(exc: BaseException) -> str:
    """One line for a failed fit(): a dead worker process first, else the innermost error's last line."""
    seen = exc
    while seen.__cause__ is not None and not hasattr(seen, "worker_failures"):
        seen = seen.__cause__
    failures = getattr(seen, "worker_failures", None)
    if failures:
        return worker_failure_line(failures)
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return last_line(seen)


def last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return next((line for line in reversed(text) if line.strip()), type(exc).__name__).strip()


def worker_failure_line(failures: dict) -> str:
    """Ray Train's {rank: exception}. When a worker process dies (SIGKILL, out of memory, a lost node),
    the other ranks fail in the collective with `Connection closed by peer`; name the dead one instead."""
    from ray.exceptions import RayActorError

    dead = sorted(rank for rank, e in failures.items() if isinstance(e, RayActorError) or "worker process has died" in str(e))
    if dead:
        # Ray's text: "... Worker exit type: SYSTEM_ERROR Worker exit detail: <why>. Some common causes ..."
        text = " ".join(str(failures[dead[0]]).split())
        why = text.partition("Worker exit detail: ")[2].partition(" Some common causes")[0] or text[:200]
        return (
            f"training worker rank {dead[0]} died: its process was killed or crashed ({why.rstrip('.')}); "
            "pass --max-failures N to restart from the latest checkpoint"
        )
    lost = {rank: e for rank, e in failures.items() if any(m in str(e) for m in PEER_LOST)}
    own = sorted(set(failures) - set(lost))
    if not own:
        return (
            f"a training worker process died (killed, out of memory or its node was lost): rank {min(lost)} "
            "lost its connection to it; pass --max-failures N to restart from the latest checkpoint"
        )
    error = failures[own[0]]
    line = last_line(error)
    return line if type(error).__name__ in line else f"{type(error).__name__}: {line}"


# What the surviving ranks' collectives (gloo, NCCL) say when a peer process is gone.
PEER_LOST = ("Connection closed by peer", "remote worker crash", "Connection reset by peer", "NCCL communicator was aborted")


def plot_curves(history: list[dict]) -> bytes:
    from distcls.plots import png_bytes, subplots

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="accuracy")
    ax_acc.plot(epochs, [h["val_macro_f1"] for h in history], "o-", label="macro F1")
    ax_acc.set(xlabel="epoch", ylim=(0, 1), title="Validation")
    ax_acc.legend()
    return png_bytes(fig)

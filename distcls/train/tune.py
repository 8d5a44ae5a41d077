"""`distcls tune`: a Ray Tune search over `distcls train` runs, with ASHA early stopping.

Every trial is a whole `run_training` (the same function `distcls train` calls: recipe, Ray Train workers,
checkpoints, calibration) on one hyperparameter configuration, started from a Tune trial that only drives
it (Ray Train V2's Tune integration: `TuneReportCallback` passes each epoch's report up to Tune). ASHA
(Li et al. 2020) compares trials at rungs of 1, r, r^2... epochs and stops those below the top 1/r, so a
weak configuration costs one or two epochs instead of a whole run.

Search directory `<storage>/<name>/`:

    trials/<trial>/       each trial's run directory (checkpoints, result.json, curves.png)
    train.csv, val.csv    without --val-data: one stratified split of --data, the same for every trial (manifests;
                          the trials train on train.csv, are scored on val.csv, and so is the soup); packed --data
                          has none: the trials read its train split and are scored on its val split
    results.parquet       one row per trial: its parameters, epochs run, status, best and last val accuracy,
    results.md            best checkpoint (Parquet and a markdown table)
    trials.png            validation accuracy per epoch, one line per trial
    best.json             the best trial: parameters, val accuracy, checkpoint URI
    soup/                 with --soup: the greedy soup of the top trials' best checkpoints (distcls soup)

Tune's own state (for --resume) lives beside them; it is pickles (tuner.pkl, the cloudpickle blobs inside
experiment_state-*.json, basic-variant-state-*.json, a failed trial's error.pkl), so --resume loads it only with
--trust-tune-state (TuneConfig refuses it otherwise) and says so on stderr. A resumed search keeps finished
trials and continues the others from their latest checkpoints (each trial's run resumes as `distcls train
--resume` does).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import sys

import numpy as np

from distcls import DistclsError, storage
from distcls.config import SoupConfig, TrainConfig, TuneConfig
from distcls.runtime import init_ray

SEARCHED = ("lr", "weight_decay", "backbone_lr_scale", "augment", "mixup", "epochs")
METRIC = "val_accuracy"
TRIAL_DRIVER_CPUS = 0.01  # a trial only drives its Ray Train run (Tune refuses 0); the run asks for its own CPUs


def search_space(cfg: TuneConfig) -> dict:
    """Ray Tune's param_space: log-uniform ranges for lr and weight decay, choices for the rest (a range or
    list of one value is that value)."""
    from ray import tune

    def log_range(values: tuple[float, ...]):
        return values[0] if len(values) == 1 or values[0] == values[-1] else tune.loguniform(values[0], values[-1])

    def choice(values: tuple):
        return values[0] if len(values) == 1 else tune.choice(list(values))

    return {
        "lr": log_range(cfg.lr),
        "weight_decay": log_range(cfg.weight_decay),
        "backbone_lr_scale": choice(cfg.backbone_lr_scale),
        "augment": choice(cfg.augment),
        "mixup": choice(cfg.mixup),
        "epochs": choice(cfg.epochs),
    }


def base_train_config(cfg: TuneConfig, train_manifest: str | None, val_manifest: str | None) -> dict:
    """The TrainConfig fields every trial shares (the searched ones come from the trial's config). Without
    --val-data the trials train on train.csv and are scored on val.csv, the two parts of one split of --data
    (packed --data: its train and val splits)."""
    return {
        "data": cfg.data if cfg.val_data or train_manifest is None else train_manifest,
        "val_data": cfg.val_data or val_manifest,
        "class_names": cfg.class_names,
        "model": cfg.model,
        "weights": cfg.weights,
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "cpus_per_worker": cfg.cpus_per_worker,
        "use_gpu": cfg.use_gpu,
        "seed": cfg.seed,
        "tracking_uri": cfg.tracking_uri,
        "experiment": cfg.experiment,
        "checkpoint_every_minutes": 0,  # Tune's schedulers read every report as an epoch's: no mid-epoch reports
    }


def run_trial(params: dict, base: dict, trials_uri: str, fault: str | None = None) -> None:
    """One Tune trial: a `distcls train` run of (base + params) in trials/<trial>, its epochs reported to
    Tune. A restored trial (after --resume or a failure) continues its run from the latest checkpoint.
    `fault`: the test hook DISTCLS_TEST_FAULT of the search's process, for the trial's run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from distcls.train.trainer import FAULT_ENV, run_training

    if fault:
        os.environ[FAULT_ENV] = fault

    name = ray.tune.get_context().get_trial_id()
    run = storage.join_uri(trials_uri, name)
    resume = storage.exists(run) and bool(storage.list_files(run))
    cfg = TrainConfig(**base, **{k: params[k] for k in SEARCHED}, storage=trials_uri, name=name, resume=resume)
    run_training(cfg, callbacks=[TuneReportCallback()], announce=False)


def run_tune(cfg: TuneConfig) -> dict:
    """Run (or resume) the search; returns best.json's content with `run`, `trials` and `soup`."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from distcls.train.trainer import FAULT_ENV, storage_for_ray

    cfg = with_absolute_paths(cfg)
    name = cfg.name or "tune-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = storage.join_uri(cfg.storage, name)
    check_search_dir(cfg, run)
    train_manifest, val_manifest = split_manifests(cfg, run)
    base = base_train_config(cfg, train_manifest, val_manifest)
    TrainConfig(**base)  # the shared flags are checked here, once, not in every trial
    init_ray(num_cpus=local_cpus(cfg))
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no status tables (each trial prints its epochs)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            run_trial, base=base, trials_uri=storage.join_uri(run, "trials"), fault=os.environ.get(FAULT_ENV)
        ),
        {"CPU": TRIAL_DRIVER_CPUS},
    )
    storage_path, fs = storage_for_ray(cfg.storage)
    if cfg.resume:
        warn_trusted_state(run)
        tuner = ray.tune.Tuner.restore(
            storage_path.rstrip("/") + "/" + name, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=ray.tune.TuneConfig(
                metric=METRIC,
                mode="max",
                num_samples=cfg.trials,
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    # one past the longest run: a trial that reaches its last epoch ends on its own (calibration,
                    # result.json) instead of being stopped by the scheduler at its final report
                    max_t=max(cfg.epochs) + 1,
                    grace_period=cfg.grace_period,
                    reduction_factor=cfg.reduction_factor,
                ),
                # seeded draws; it limits concurrency itself (Tune ignores max_concurrent_trials with it)
                search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent),
            ),
            run_config=ray.tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=fs,
                verbose=0,
                callbacks=[release_callback()] if cfg.max_concurrent == 1 else [],
            ),
        )
    grid = tuner.fit()
    rows, curves = trial_rows(grid, cfg.storage)
    if not any(r["checkpoint"] for r in rows):
        errors = [r["error"] for r in rows if r["error"]]
        raise DistclsError(f"tune: no trial of {run} finished an epoch" + (f"; first error: {errors[0]}" if errors else ""))
    write_results(run, rows, curves)
    best = max((r for r in rows if r["checkpoint"]), key=lambda r: r["best_val_accuracy"])
    out = {
        "trial": best["trial"],
        "params": {k: best[k] for k in SEARCHED},
        "val_accuracy": best["best_val_accuracy"],
        "checkpoint": best["checkpoint"],
        "epochs_run": best["epochs_run"],
    }
    storage.write_text(storage.join_uri(run, "best.json"), json.dumps(out, indent=2))
    for line in summary_lines(rows):
        print(line, flush=True)
    soup = soup_top_trials(cfg, run, rows, base["val_data"] or cfg.data) if cfg.soup else None
    return {"best": out, "run": run, "trials": rows, "soup": soup}


def with_absolute_paths(cfg: TuneConfig) -> TuneConfig:
    """Local paths made absolute: trials run in Ray actors with working directories of their own."""
    from distcls.tracking import tracking_uri_for

    tracking = cfg.tracking_uri and tracking_uri_for(cfg.tracking_uri)
    return dataclasses.replace(
        cfg,
        data=storage.absolute_uri(cfg.data),
        val_data=cfg.val_data and storage.absolute_uri(cfg.val_data),
        storage=storage.absolute_uri(cfg.storage),
        tracking_uri=tracking,
    )


def release_callback():
    """A Tune callback that frees the placement groups a stopped trial leaves behind.

    ASHA stops a trial by ending its actor in the middle of its Ray Train run. Ray Train's own cleaner is
    meant to remove the run's placement group (its workers' CPUs); on a loaded machine it was seen not to, and
    the next trial then waited for those CPUs forever. With one trial at a time, any placement group of this
    job that is not a trial's own is a leftover once a trial has ended, and is removed."""
    import ray
    from ray.tune import Callback

    class ReleaseLeftovers(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            release_leftover_groups()

        def on_trial_error(self, iteration, trials, trial, **info):
            release_leftover_groups()

    def release_leftover_groups() -> None:
        from ray.util.placement_group import PlacementGroup
        from ray.util.state import list_placement_groups

        job = ray.get_runtime_context().get_job_id()
        try:
            groups = list_placement_groups(filters=[("state", "=", "CREATED")], detail=True, raise_on_missing_output=False)
        except Exception:  # the state API is an aid here, never a reason to fail the search
            return
        for group in groups:
            trial_driver = [b.get("unit_resources") for b in group.bundles] == [{"CPU": TRIAL_DRIVER_CPUS}]
            if group.creator_job_id == job and not trial_driver and not group.is_detached:
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group.placement_group_id)))

    return ReleaseLeftovers()


def check_search_dir(cfg: TuneConfig, run: str) -> None:
    exists = storage.exists(run) and bool(storage.list_files(run))
    if exists and not cfg.resume:
        raise DistclsError(f"tune: search {run} already exists; pass --resume to continue it or choose another --name")
    if cfg.resume and not exists:
        raise DistclsError(f"tune: nothing to resume at {run}; drop --resume to start a new search")


def warn_trusted_state(run: str) -> None:
    """--resume --trust-tune-state: said on stderr, every time, that Tune's pickles are about to be loaded."""
    print(
        f"distcls: WARNING: --trust-tune-state: resuming unpickles Ray Tune's state in {run} (tuner.pkl, "
        "experiment_state-*.json, basic-variant-state-*.json, trials' error.pkl), which runs code as you: anyone "
        "who can write that folder can run code here",
        file=sys.stderr,
        flush=True,
    )


def local_cpus(cfg: TuneConfig) -> int:
    """A local Ray instance's logical CPUs: each running trial's workers plus room for its decode tasks."""
    per_trial = int(np.ceil(cfg.num_workers * cfg.cpus_per_worker)) + 1
    return max(os.cpu_count() or 1, 4, cfg.max_concurrent * per_trial + 1)


def split_manifests(cfg: TuneConfig, run: str) -> tuple[str | None, str | None]:
    """<run>/train.csv and <run>/val.csv: without --val-data, one stratified split of per-object --data (written
    once; a resumed search reads them back), so that no trial trains on the images it is scored on. Packed --data
    has its own val split: (None, None), the trials read the set as it is."""
    from distcls.packed import open_packed
    from distcls.train.data import load_splits

    train_manifest, val_manifest = storage.join_uri(run, "train.csv"), storage.join_uri(run, "val.csv")
    if cfg.val_data:
        return train_manifest, val_manifest
    split_cfg = TrainConfig(data=cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, class_names=cfg.class_names)
    if open_packed(cfg.data, list(cfg.class_names) or None) is not None:
        load_splits(split_cfg)  # packed data without a val split is refused here, before any trial starts
        return None, None
    if not cfg.resume:
        train, val = load_splits(split_cfg)
        for uri, part in ((train_manifest, train.index), (val_manifest, val.index)):
            storage.write_text(uri, manifest_csv(part.paths, [part.class_names[i] for i in part.labels]))
    return train_manifest, val_manifest


def manifest_csv(paths: list[str], labels: list[str]) -> str:
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label"])
    writer.writerows(zip(paths, labels))
    return buffer.getvalue()


def trial_rows(grid, storage_root: str) -> tuple[list[dict], dict[str, list[float]]]:
    """One row per trial from Tune's results, and each trial's validation accuracy per epoch."""
    scheme, _ = storage.split_uri(storage_root)
    rows, curves = [], {}
    for result in grid:
        params = {k: result.config.get(k) for k in SEARCHED}
        frame = result.metrics_dataframe
        records = [] if frame is None or METRIC not in frame else frame.dropna(subset=[METRIC]).to_dict("records")
        # by epoch: a trial resumed after --resume or a failure reports its later epochs in a new Tune session
        history = list({int(r["epoch"]): r for r in records}.values())
        trial = (result.metrics or {}).get("trial_id") or os.path.basename(str(result.path)).split("_")[-1]
        curves[trial] = [float(h[METRIC]) for h in history]
        best = max(history, key=lambda h: h[METRIC]) if history else None
        planned = int(params["epochs"])
        status = "error" if result.error else ("completed" if len(history) >= planned else "stopped early (ASHA)")
        rows.append(
            {
                "trial": trial,
                **params,
                "epochs_run": len(history),
                "status": status,
                "best_val_accuracy": float(best[METRIC]) if best else float("nan"),
                "last_val_accuracy": float(history[-1][METRIC]) if history else float("nan"),
                "checkpoint": best_checkpoint(best, scheme),
                "error": str(result.error).strip().splitlines()[-1] if result.error else "",
            }
        )
    rows.sort(key=lambda r: -np.nan_to_num(r["best_val_accuracy"], nan=-1.0))
    return rows, curves


def best_checkpoint(best: dict | None, scheme: str) -> str:
    """The URI of the checkpoint reported with a trial's best epoch ("" when there is none or it was pruned)."""
    from distcls.checkpoint import verify_checkpoint

    path = (best or {}).get("checkpoint_path")
    if not isinstance(path, str) or not path:
        return ""
    uri = storage.to_uri(scheme, path)
    try:
        verify_checkpoint(uri)
    except DistclsError:
        return ""
    return uri


def write_results(run: str, rows: list[dict], curves: dict[str, list[float]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes(storage.join_uri(run, "results.parquet"), buffer.getvalue())
    storage.write_text(storage.join_uri(run, "results.md"), results_markdown(rows))
    storage.write_bytes(storage.join_uri(run, "trials.png"), plot_trials(curves))


def results_markdown(rows: list[dict]) -> str:
    head = ["trial", *SEARCHED, "epochs_run", "status", "best_val_accuracy", "last_val_accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in head]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_trials(curves: dict[str, list[float]]) -> bytes:
    from distcls.plots import png_bytes, subplots

    fig, ax = subplots(1, 1, figsize=(7, 4.5))
    for trial, accs in curves.items():
        if accs:
            ax.plot(range(1, len(accs) + 1), accs, "o-", label=trial)
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="Trials (ASHA stops the weak ones early)")
    ax.legend(fontsize="small")
    return png_bytes(fig)


def summary_lines(rows: list[dict]) -> list[str]:
    lines = [f"{len(rows)} trials:"]
    for r in rows:
        params = ", ".join(f"{k} {r[k]:.3g}" if isinstance(r[k], float) else f"{k} {r[k]}" for k in SEARCHED)
        acc = r["best_val_accuracy"]
        lines.append(f"  {r['trial']}: best val_acc {acc:.4f} after {r['epochs_run']} epochs, {r['status']} ({params})")
    return lines


def soup_top_trials(cfg: TuneConfig, run: str, rows: list[dict], val_data: str) -> dict | None:
    """--soup: the greedy soup of the best checkpoints of the top trials (best first), in <run>/soup."""
    from distcls.train.soup import run_soup

    top = [r["checkpoint"] for r in rows if r["checkpoint"]][: cfg.soup_top]
    out = storage.join_uri(run, "soup")
    if storage.exists(out):  # from before --resume: the soup of the trials as they are now replaces it
        storage.remove(out, recursive=True)
    if len(top) < 2:
        print(f"soup: skipped ({len(top)} trial checkpoint(s); a soup needs 2)", flush=True)
        return None
    return run_soup(SoupConfig(checkpoints=tuple(top), data=val_data, out=out, use_gpu=cfg.use_gpu))

"""`distcls label`: every image object under a prefix -> Parquet labels, exactly one row per object.

Ray Data pipeline: paths -> read + decode + preprocess (CPU tasks, the checkpoint's own spec) -> predict
(actor pool, the model loaded once per actor) -> write (one Parquet part per batch, each written
atomically). A part is the unit of progress: a rerun reads the paths already in the output's parts and
labels only the rest, so a job killed halfway and run again ends with every object exactly once.
Runs that overlap (a rerun while a killed run's Ray workers still commit parts) can write an object
twice; every run removes such second copies when it starts and again when it ends.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import io
import time
import uuid
from collections import Counter

import numpy as np

from distcls import DistclsError, storage
from distcls.checkpoint import checkpoint_id
from distcls.config import LabelConfig
from distcls.datasets import build_image_dataset, build_path_dataset, decode_sample
from distcls.images import IMAGE_EXTENSIONS
from distcls.infer import predict_dataset, prepare_runtime, softmax_topk, verify_model
from distcls.runtime import init_ray
from distcls.transforms import PreprocessSpec

PART_PREFIX = "part-"


def output_schema():
    import pyarrow as pa

    return pa.schema([
        ("path", pa.string()), ("label", pa.string()), ("score", pa.float32()),
        ("topk_labels", pa.list_(pa.string())), ("topk_scores", pa.list_(pa.float32())),
        ("error", pa.string()), ("model", pa.string()), ("labeled_at", pa.timestamp("us", tz="UTC")),
    ])


def list_inputs(cfg: LabelConfig) -> list[str]:
    """Image objects under --input (by extension, case-insensitive; --include GLOB replaces the filter)."""
    root = cfg.input.rstrip("/")
    if cfg.include:
        return [p for p in storage.iter_files(root) if fnmatch.fnmatch(p[len(root) + 1:], cfg.include)
                or fnmatch.fnmatch(p.rsplit("/", 1)[-1], cfg.include)]
    return [p for p in storage.iter_files(root, IMAGE_EXTENSIONS)]


def existing_parts(output: str) -> list[str]:
    if not storage.exists(output):
        return []
    return [p for p in storage.list_files(output) if p.rsplit("/", 1)[-1].startswith(PART_PREFIX)
            and p.endswith(".parquet")]


def done_paths(output: str, repair: bool = True) -> tuple[set[str], int]:
    """Paths that already have a row in the output (any committed part), and how many duplicate rows
    were removed. Duplicates come from two runs writing one output at once (a killed run's Ray workers
    can outlive their driver by seconds and still commit parts; or two reruns started together). With
    `repair`, the first row of each path (parts in name order) stays: a part holding later copies is
    rewritten without them before it is deleted, so an interruption leaves them for the next run."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    removed = 0
    for part in sorted(existing_parts(output)):
        paths = pq.read_table(io.BytesIO(storage.read_bytes(part)), columns=["path"]).column("path").to_pylist()
        keep, seen = [], set()
        for i, path in enumerate(paths):
            if path not in done and path not in seen:
                keep.append(i)
                seen.add(path)
        done |= seen
        if repair and len(keep) < len(paths):
            removed += len(paths) - len(keep)
            if keep:
                table = pq.read_table(io.BytesIO(storage.read_bytes(part))).take(keep)
                buf = io.BytesIO()
                pq.write_table(table, buf)
                # Named by what it holds: two runs repairing at once write the same object, not two.
                name = hashlib.sha256(f"{part}:{keep}".encode()).hexdigest()[:32]
                storage.write_bytes(storage.join_uri(output, f"{PART_PREFIX}{name}.parquet"), buf.getvalue())
            storage.remove(part)
    return done, removed


def write_part(batch: dict[str, np.ndarray], output: str, class_names: list[str], model_id: str,
               top_k: int) -> dict[str, np.ndarray]:
    """Ray Data task: a batch of predictions -> one Parquet part, written atomically; returns counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(label_rows(batch, class_names, model_id, top_k), schema=output_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join_uri(output, f"{PART_PREFIX}{uuid.uuid4().hex}.parquet"), buf.getvalue())
    kinds = [str(e).split(":", 1)[0] for e in batch["error"] if e]
    return {"rows": np.array([len(table)]), "errors": np.array([len(kinds)]),
            "kinds": np.array([",".join(kinds)], dtype=object)}


def label_rows(batch: dict[str, np.ndarray], class_names: list[str], model_id: str, top_k: int) -> dict[str, list]:
    """Output columns for one batch: softmax top-k for good rows, `error` (and nulls) for bad ones."""
    probs, order = softmax_topk(batch["logits"], top_k)
    now = dt.datetime.now(dt.UTC)
    out: dict[str, list] = {name: [] for name in output_schema().names}
    for i, path in enumerate(batch["path"]):
        err = batch["error"][i] or None
        out["path"].append(str(path))
        out["error"].append(err)
        out["model"].append(model_id)
        out["labeled_at"].append(now)
        if err:
            for key in ("label", "score", "topk_labels", "topk_scores"):
                out[key].append(None)
            continue
        top = order[i]
        out["label"].append(class_names[top[0]])
        out["score"].append(float(probs[i, top[0]]))
        out["topk_labels"].append([class_names[j] for j in top])
        out["topk_scores"].append([float(probs[i, j]) for j in top])
    return out


def run_labeling(cfg: LabelConfig, progress: bool = True) -> dict:
    started = time.perf_counter()
    meta = verify_model(cfg.checkpoint)  # checkpoint or export; tampered or incomplete: one line, before Ray
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    paths = list_inputs(cfg)
    if not paths:
        raise DistclsError(f"label: no image objects under {cfg.input}; check the URI or widen --include")
    done, duplicates = done_paths(cfg.output)
    todo = [p for p in paths if p not in done]
    print(f"label: {len(paths)} objects under {cfg.input}; {len(paths) - len(todo)} already labeled, "
          f"{len(todo)} to do" + (f"; removed {duplicates} duplicate rows" if duplicates else ""), flush=True)
    summary = {"total": len(paths), "skipped_done": len(paths) - len(todo), "labeled": 0, "errors": 0,
               "errors_by_kind": {}, "output": cfg.output, "model": checkpoint_id(meta),
               "duplicates_removed": duplicates}
    if todo:
        storage.ensure_bucket(cfg.output)
        runtime, note = prepare_runtime(cfg.checkpoint, cfg.runtime, cfg.num_gpus > 0, decode_sample(todo, spec))
        summary.update(runtime=runtime, runtime_note=note)
        print(f"label: runtime {runtime} ({note})", flush=True)
        init_ray()
        fused = cfg.pipeline == "fused" or (cfg.pipeline == "auto" and not cfg.num_gpus)
        items = [{"path": p} for p in todo]
        ds = build_path_dataset(items) if fused else build_image_dataset(items, spec)
        ds = predict_dataset(ds, cfg.checkpoint, cfg.batch_size, cfg.concurrency, cfg.num_gpus, cfg.cpus_per_replica,
                             runtime, decode=fused)
        ds = ds.map_batches(write_part, fn_kwargs={
            "output": cfg.output, "class_names": meta["class_names"], "model_id": checkpoint_id(meta),
            "top_k": cfg.top_k}, batch_size=cfg.rows_per_part, batch_format="numpy")
        kinds: Counter = Counter()
        last = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            summary["labeled"] += int(batch["rows"].sum())
            summary["errors"] += int(batch["errors"].sum())
            kinds.update(k for joined in batch["kinds"] for k in str(joined).split(",") if k)
            if progress and time.perf_counter() - last > 5:
                last = time.perf_counter()
                rate = summary["labeled"] / (last - started)
                print(f"  {summary['labeled']}/{len(todo)} labeled, {summary['errors']} errors, {rate:.1f} images/s",
                      flush=True)
        summary["errors_by_kind"] = dict(kinds)
        # A write task retried after its part was committed (a worker lost mid-task) leaves a second copy.
        summary["duplicates_removed"] += done_paths(cfg.output)[1]
    summary["seconds"] = time.perf_counter() - started
    summary["images_per_s"] = summary["labeled"] / max(summary["seconds"], 1e-9)
    return summary

"""`distcls label`: every image object under a prefix (or in a manifest) -> Parquet labels, one row per object.

Ray Data pipeline: plan (listing read tasks, or the stored plan minus what is done) -> [read + decode +
preprocess] -> predict (actor pool, the model loaded once per actor and checked against the driver's) ->
write (Parquet parts of --part-rows rows / --part-mb MB, each written atomically). A part is the unit of
progress: a rerun subtracts the labeled paths (Arrow) from the stored plan, so a job killed halfway and run
again ends with every object exactly once. A finished job writes OUTPUT/_SUCCESS.json. Packed --input (a
`distcls pack`, a Parquet or tar shard): its rows, read from the shards (label/packed.py).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import time
from collections import Counter

import numpy as np

from distcls import DistclsError, objects, storage
from distcls.checkpoint import checkpoint_id
from distcls.config import LabelConfig
from distcls.datasets import decode_sample, load_images
from distcls.infer import is_export, predict_dataset, verify_model
from distcls.label.buckets import Index, index_output
from distcls.label.confine import confine, source_root
from distcls.label.manifest import Source
from distcls.label.packed import packed_input, packed_plan, packed_rows, packed_sample
from distcls.label.parts import check_not_nested, done_snapshot, existing_parts, output_schema, write_parts
from distcls.label.plan import (
    BLOCK_BYTES,
    LIST_HOLD_ENV,
    TEST_BLOCK_BYTES,
    StoredPlan,
    UnreadablePlan,
    finish_listing,
    iter_keys,
    make_listers,
    plan_datasource,
    plan_dir,
)
from distcls.label.status import PROGRESS_EVERY_S, finish, label_status, remote_needed, write_progress
from distcls.progress import Progress
from distcls.runtime import init_ray
from distcls.scores import UNKNOWN, Calibration, resolve_unknown, score
from distcls.transforms import PreprocessSpec

TODO_BLOCK_ROWS = 1000  # paths per Ray Data block when the plan is read back (rerun, resume)


def write_part(
    batch: dict[str, np.ndarray],
    output: str,
    class_names: list[str],
    model_id: str,
    top_k: int,
    part_mb: float,
    calibration: Calibration | None = None,
    unknown_above: float | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data task: a batch of predictions -> Parquet part(s), each written atomically; returns counts."""
    import pyarrow as pa

    rows = label_rows(batch, class_names, model_id, top_k, calibration or Calibration(), unknown_above)
    table = pa.table(rows, schema=output_schema(embeddings="embedding" in batch))
    write_parts(table, output, part_mb)
    kinds = [str(e).split(":", 1)[0] for e in batch["error"] if e]
    return {"rows": np.array([len(table)]), "errors": np.array([len(kinds)]), "kinds": np.array([",".join(kinds)], dtype=object)}


def label_rows(
    batch: dict[str, np.ndarray],
    class_names: list[str],
    model_id: str,
    top_k: int,
    calibration: Calibration,
    unknown_above: float | None = None,
) -> dict[str, list]:
    """Output columns for one batch: calibrated top-k and the trust scores for good rows (label `unknown`
    past the OOD threshold, top-k kept), `error` (and nulls) for bad ones."""
    s = score(batch["logits"], calibration, top_k, unknown_above)
    probs, order = s.probs, s.order
    stamp = dt.datetime.now(dt.UTC)
    embeddings = batch.get("embedding")
    out: dict[str, list] = {name: [] for name in output_schema(embeddings is not None).names}
    for i, path in enumerate(batch["path"]):
        err = batch["error"][i] or None
        out["path"].append(str(path))
        out["error"].append(err)
        out["model"].append(model_id)
        out["labeled_at"].append(stamp)
        if embeddings is not None:
            out["embedding"].append(None if err else np.asarray(embeddings[i], dtype=np.float16))
            out["thumb"].append(None if err else bytes(batch["thumb"][i]))
        if err:
            for key in ("label", "score", "topk_labels", "topk_scores", "margin", "entropy", "ood_score"):
                out[key].append(None)
            continue
        top = order[i]
        out["label"].append(UNKNOWN if s.unknown[i] else class_names[top[0]])
        out["margin"].append(float(s.margin[i]))
        out["entropy"].append(float(s.entropy[i]))
        out["ood_score"].append(float(s.ood_score[i]))
        out["score"].append(float(probs[i, top[0]]))
        out["topk_labels"].append([class_names[j] for j in top])
        out["topk_scores"].append([float(probs[i, j]) for j in top])
    return out


def source_of(cfg: LabelConfig) -> Source:
    return Source(input=cfg.input.rstrip("/") if cfg.input else None, include=cfg.include, manifest=cfg.manifest)


def open_plan(cfg: LabelConfig) -> tuple[StoredPlan, str]:
    """The stored plan when it is for this source and not --replan, else a new one; and a line on which. The
    stored plan is used as it is (its keys are confined to the job's root when read)."""
    source = source_of(cfg)
    try:
        stored, unreadable = StoredPlan.read(cfg.output), False
    except UnreadablePlan:
        stored, unreadable = StoredPlan(plan_dir(cfg.output), None, [], {}), True
    if stored.listers and stored.source == source and not cfg.replan:
        if stored.complete:
            return stored, f"the stored plan ({stored.keys} objects; --replan lists again)"
        left = len(stored.listers) - len(stored.finished)
        return stored, f"the stored plan, its {left} unfinished lister(s) resumed from their last shard"
    if stored.listers and not cfg.replan:
        why = "the stored plan was for another input or --include"
    else:
        why = "--replan" if cfg.replan else ("the stored plan is unreadable" if unreadable else "no plan yet")
    listers = make_listers(source)
    return StoredPlan.start(cfg.output, source, listers), f"listing ({why}) with {len(listers)} lister(s)"


def confinement(cfg: LabelConfig) -> str | None:
    """The root every planned path must be under (plan.source_root), or None with --allow-any-path; printed
    when it is not simply --input."""
    if cfg.allow_any_path:
        print("label: --allow-any-path: manifest and plan paths are read wherever they point", flush=True)
        return None
    root = source_root(source_of(cfg))
    if cfg.manifest and not cfg.input:
        print(
            f"label: every manifest path must be under {root or '(none: the manifest is empty)'}; others get "
            "outside_input rows (--input narrows this, --allow-any-path lifts it)",
            flush=True,
        )
    return root


def peek_paths(plan: StoredPlan, root: str | None, n: int = 256) -> list[str]:
    """The first few keys of the first listers, confined to `root`: images for the runtime's compile check,
    before the pipeline."""
    import pyarrow as pa

    keys = (path for lister in plan.listers for path, error in iter_keys(lister, plan.source) if not error)
    table = pa.table({"path": pa.array(itertools.islice(keys, n), pa.string())})
    return sample_of(confine(table.append_column("error", pa.array([""] * len(table), pa.string())), root), n)


def sample_of(todo, n: int = 64) -> list[str]:
    """About `n` paths spread over the (path, error) rows without an error: a row with one is never read."""
    import pyarrow.compute as pc

    ok = todo.filter(pc.equal(pc.fill_null(todo.column("error"), ""), "")).column("path")
    return ok.take(np.arange(0, len(ok), max(1, len(ok) // n))).to_pylist() if len(ok) else []


def run_labeling(cfg: LabelConfig, progress: bool = True) -> dict:
    if cfg.status:
        return label_status(cfg.output, print_it=progress)
    started = time.perf_counter()
    meta = verify_model(cfg.checkpoint)  # checkpoint or export; tampered or incomplete: one line, before Ray
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    model_id = checkpoint_id(meta)
    calibration = Calibration.of(meta)
    unknown_above = resolve_unknown(cfg.unknown, calibration, "label")
    if cfg.embeddings and is_export(meta):
        raise DistclsError(
            f"label: --embeddings needs the PyTorch checkpoint (the pooled features are not an output of the "
            f"export at {cfg.checkpoint}); pass the checkpoint it was exported from"
        )
    check_not_nested(cfg.output)
    storage.ensure_bucket(cfg.output)
    packed = packed_input(cfg)
    root = None if packed is not None else confinement(cfg)  # packed rows are read from the set's own shards
    summary = {
        "labeled": 0,
        "errors": 0,
        "errors_by_kind": {},
        "output": cfg.output,
        "model": model_id,
        "duplicates_removed": 0,
        "scores": calibration.describe(),
        "unknown_above": unknown_above,
    }
    work = plan_packed(cfg, packed, spec, summary) if packed is not None else plan_work(cfg, root, summary)
    plan, index = work["plan"], work["index"]
    summary["plan_seconds"] = time.perf_counter() - started
    if work["to_do"]:
        init_ray()
        runtime, note = prepare_in_ray(cfg, work["sample"], spec)
        summary.update(runtime=runtime, runtime_note=note)
        print(f"label: runtime {runtime} ({note})", flush=True)
        unknown = "off" if unknown_above is None else f"label `unknown` above energy {unknown_above:.3f}"
        print(f"label: scores {calibration.describe()}; {unknown}", flush=True)
        run_pipeline(cfg, meta, spec, runtime, plan, work, summary, progress, unknown_above, root)
        plan = StoredPlan.read(cfg.output)
        index = count_output(cfg, plan, root, packed is not None)  # a write task retried after its commit leaves a second copy
        summary["duplicates_removed"] += index.removed
    return finish(cfg.output, plan, index, summary, started)


def count_output(cfg: LabelConfig, plan: StoredPlan, root: str | None, packed: bool) -> Index:
    """The partitioned index of the output against the plan (Ray tasks when large: see status.LOCAL_ROWS); for a
    packed input (its plan has no shards) what is left is counted from the distinct paths."""
    remote = remote_needed(plan, len(existing_parts(cfg.output)))
    if remote:
        init_ray()
    index = index_output(cfg.output, plan, root, remote=remote)
    if packed:
        index.todo_rows = max(plan.keys - index.distinct, 0)
    return index


def plan_work(cfg: LabelConfig, root: str | None, summary: dict) -> dict:
    """The plan, and what is left: streamed from the listers (a new plan and an empty output), else the stored
    plan (its unfinished listers run to the end first) less the labeled paths, bucket by bucket (buckets.py)."""
    plan, how = open_plan(cfg)
    fresh = not plan.finished and not plan.shards() and not existing_parts(cfg.output)
    if fresh:
        print(f"label: {how} under {cfg.manifest or cfg.input}; labeling starts as keys arrive", flush=True)
        sample = peek_paths(plan, root)
        if not sample and plan.source.input and not cfg.manifest:
            raise DistclsError(f"label: no image objects under {cfg.input}; check the URI or widen --include")
        return {"plan": plan, "index": None, "to_do": True, "todo": None, "sample": sample, "total": None}
    if not plan.complete:
        print(f"label: {how}; listing to the end before subtracting what is done", flush=True)
        init_ray()
        finish_listing(plan, root)
        plan = StoredPlan.read(cfg.output)
    index = count_output(cfg, plan, root, packed=False)
    summary["duplicates_removed"] = index.removed
    removed = f"; removed {index.removed} duplicate rows" if index.removed else ""
    print(
        f"label: {plan.keys} objects planned ({how}); {plan.keys - index.todo_rows} already labeled, "
        f"{index.todo_rows} to do" + removed,
        flush=True,
    )
    todo = index.todo if index.todo_rows else []
    return {"plan": plan, "index": index, "to_do": bool(todo), "todo": todo, "sample": index.sample, "total": index.todo_rows}


def plan_packed(cfg: LabelConfig, packed, spec: PreprocessSpec, summary: dict) -> dict:
    """A packed input: its rows less the paths the output has (a packed set is read from its own shards)."""
    plan, how = packed_plan(cfg, packed)
    snap, duplicates = done_snapshot(cfg.output)
    done = snap.table.column("path")
    summary["duplicates_removed"] = duplicates
    removed = f"; removed {duplicates} duplicate rows" if duplicates else ""
    print(f"label: {plan.keys} rows in {how}; {len(done)} rows already in the output" + removed, flush=True)
    max_bytes = objects.max_object_bytes(cfg.max_object_mb)
    decoded = packed_rows(packed, spec, done, max_bytes) if len(done) < plan.keys else None
    index = None if decoded is not None else count_output(cfg, plan, None, packed=True)
    sample = packed_sample(packed, spec, max_bytes)
    return {
        "plan": plan,
        "index": index,
        "to_do": decoded is not None,
        "decoded": decoded,
        "sample": sample,
        "total": plan.keys - len(done),
    }


def prepare_in_ray(cfg: LabelConfig, sample_paths: list[str] | np.ndarray | None, spec: PreprocessSpec) -> tuple[str, str]:
    """prepare_runtime (decode a sample, compile to ONNX into the cache) in a Ray task: torch and the compile's
    memory stay out of the driver, which only plans. `sample_paths`: paths, or images already decoded."""
    import ray

    def prepare() -> tuple[str, str]:
        from distcls.infer.engine import prepare_runtime

        runtime = "torch" if cfg.embeddings else cfg.runtime  # the pooled features come from the torch model
        sample = sample_paths
        if isinstance(sample_paths, list):
            sample = decode_sample(sample_paths, spec, max_bytes=objects.max_object_bytes(cfg.max_object_mb))
        return prepare_runtime(cfg.checkpoint, runtime, cfg.num_gpus > 0, sample)

    try:
        return ray.get(ray.remote(num_cpus=1)(prepare).remote())
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, DistclsError):
            raise DistclsError(str(exc.cause.args[0]) if exc.cause.args else str(exc.cause)) from None
        raise


def run_pipeline(
    cfg: LabelConfig,
    meta: dict,
    spec: PreprocessSpec,
    runtime: str,
    plan: StoredPlan,
    work: dict,
    summary: dict,
    progress: bool,
    unknown_above: float | None = None,
    root: str | None = None,
) -> None:
    """Label what `work` says is left: the listers' keys as they come, the todo buckets of the index, or (packed
    data) rows already read and decoded."""
    decoded = work.get("decoded")
    ds = decoded if decoded is not None else source_dataset(cfg, plan, work, root)
    fused = decoded is None and (cfg.pipeline == "fused" or (cfg.pipeline == "auto" and not cfg.num_gpus))
    if not fused and decoded is None:
        from distcls.datasets import DECODE_CPUS, ROWS_PER_BLOCK

        ds = ds.map_batches(
            load_images,
            fn_kwargs={"spec": spec, "max_bytes": objects.max_object_bytes(cfg.max_object_mb)},
            batch_size=ROWS_PER_BLOCK,
            batch_format="numpy",
            num_cpus=DECODE_CPUS,
        )
    ds = predict_dataset(
        ds,
        cfg.checkpoint,
        cfg.batch_size,
        cfg.concurrency,
        cfg.num_gpus,
        cfg.cpus_per_replica,
        runtime,
        decode=fused,
        expected_model=checkpoint_id(meta),
        embeddings=cfg.embeddings,
        max_bytes=objects.max_object_bytes(cfg.max_object_mb),
    )
    ds = ds.map_batches(
        write_part,
        fn_kwargs={
            "output": cfg.output,
            "class_names": meta["class_names"],
            "model_id": checkpoint_id(meta),
            "top_k": cfg.top_k,
            "part_mb": cfg.part_mb,
            "calibration": Calibration.of(meta),
            "unknown_above": unknown_above,
        },
        batch_size=cfg.part_rows,
        batch_format="numpy",
    )
    kinds: Counter = Counter()
    meter = Progress("label", work["total"], "images", enabled=progress, every_s=PROGRESS_EVERY_S)
    meter.on_report = lambda snap: write_progress(cfg.output, snap)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        summary["labeled"] += int(batch["rows"].sum())
        summary["errors"] += int(batch["errors"].sum())
        kinds.update(k for joined in batch["kinds"] for k in str(joined).split(",") if k)
        if meter.total is None and meter.clock() - meter.last_report >= meter.every_s:
            listed = StoredPlan.read(cfg.output)  # streaming: the total is known once every lister is done
            meter.set_total(listed.keys if listed.complete else None)
        meter.add(int(batch["rows"].sum()))
    meter.on_report = lambda snap: write_progress(cfg.output, snap, "finished")
    meter.close()
    summary["errors_by_kind"] = dict(kinds)


def source_dataset(cfg: LabelConfig, plan: StoredPlan, work: dict, root: str | None):
    """The (path, error) rows to label as a Ray Data dataset: the index's todo buckets (object refs, or Arrow
    tables when counted in this process) in blocks of at most TODO_BLOCK_ROWS, or the listers' read tasks."""
    import ray
    import ray.data

    todo = work["todo"]
    if todo is not None:
        step = max(64, min(TODO_BLOCK_ROWS, -(-work["total"] // 16)))
        if todo and isinstance(todo[0], ray.ObjectRef):
            return ray.data.from_arrow_refs(todo).repartition(target_num_rows_per_block=step)
        return ray.data.from_arrow([t.slice(i, step) for t in todo for i in range(0, len(t), step)])
    hold = cfg.output if os.environ.get(LIST_HOLD_ENV) == "1" else None
    block_bytes = TEST_BLOCK_BYTES if hold else BLOCK_BYTES
    ds = ray.data.read_datasource(plan_datasource(plan.listers, plan.source, plan.uri, block_bytes, hold, root), num_cpus=0.25)
    ds.context.target_max_block_size = block_bytes  # each listed block goes on at once (see plan.py)
    return ds

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
import json
import os
import resource
import time
from collections import Counter

import numpy as np

from distcls import DistclsError, objects, storage
from distcls.checkpoint import checkpoint_id
from distcls.config import LabelConfig
from distcls.datasets import decode_sample, load_images
from distcls.infer import is_export, predict_dataset, verify_model
from distcls.label.confine import confine, source_root
from distcls.label.manifest import Source
from distcls.label.packed import packed_input, packed_plan, packed_rows, packed_sample
from distcls.label.parts import SUCCESS, OutputStats, check_not_nested, done_snapshot, output_schema, write_parts
from distcls.label.plan import (
    BLOCK_BYTES,
    LIST_HOLD_ENV,
    TEST_BLOCK_BYTES,
    StoredPlan,
    UnreadablePlan,
    iter_keys,
    make_listers,
    now,
    plan_datasource,
    plan_dir,
)
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
        why = "the stored plan is incomplete"
    elif stored.listers and not cfg.replan:
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
    plan, how = open_plan(cfg) if packed is None else packed_plan(cfg, packed)
    snap, duplicates = done_snapshot(cfg.output)
    done = snap.table.column("path")
    summary = {
        "labeled": 0,
        "errors": 0,
        "errors_by_kind": {},
        "output": cfg.output,
        "model": model_id,
        "duplicates_removed": duplicates,
        "scores": calibration.describe(),
        "unknown_above": unknown_above,
    }
    removed = f"; removed {duplicates} duplicate rows" if duplicates else ""
    max_bytes = objects.max_object_bytes(cfg.max_object_mb)
    decoded = None
    if packed is not None:
        todo, total = None, plan.keys
        print(f"label: {total} rows in {how}; {len(done)} rows already in the output" + removed, flush=True)
        sample_paths = packed_sample(packed, spec, max_bytes)
        decoded = packed_rows(packed, spec, done, max_bytes) if len(done) < total else None
    elif plan.complete:
        todo = plan_todo(plan, done, root)
        total = plan.keys
        print(
            f"label: {total} objects planned ({how}); {total - len(todo)} already labeled, {len(todo)} to do" + removed,
            flush=True,
        )
        sample_paths = sample_of(todo)
    else:
        todo, total = None, None
        print(
            f"label: {how} under {cfg.manifest or cfg.input}; {len(done)} rows already in the output; labeling "
            f"starts as keys arrive{removed}",
            flush=True,
        )
        sample_paths = peek_paths(plan, root)
        if not sample_paths and plan.source.input and not cfg.manifest:
            raise DistclsError(f"label: no image objects under {cfg.input}; check the URI or widen --include")
    summary["plan_seconds"] = time.perf_counter() - started
    if (todo is None or len(todo)) and (packed is None or decoded is not None):
        init_ray()
        runtime, note = prepare_in_ray(cfg, sample_paths, spec)
        summary.update(runtime=runtime, runtime_note=note)
        print(f"label: runtime {runtime} ({note})", flush=True)
        unknown = "off" if unknown_above is None else f"label `unknown` above energy {unknown_above:.3f}"
        print(f"label: scores {calibration.describe()}; {unknown}", flush=True)
        run_pipeline(cfg, meta, spec, runtime, plan, todo, done, summary, started, progress, unknown_above, root, decoded)
        snap, more = done_snapshot(cfg.output)  # a write task retried after its commit leaves a second copy
        summary["duplicates_removed"] += more
        plan = StoredPlan.read(cfg.output)
    return finish(cfg, plan, snap, summary, started)


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


def plan_todo(plan: StoredPlan, done, root: str | None):
    """The planned (path, error) rows without a row in the output, confined to `root` (the shards are not
    trusted: see plan.confine): Arrow compute, no Python loop."""
    import pyarrow.compute as pc

    table = confine(plan.table().select(["path", "error"]), root)
    if len(done) and len(table):
        table = table.filter(pc.invert(pc.is_in(table.column("path"), value_set=done.combine_chunks())))
    return table


def run_pipeline(
    cfg: LabelConfig,
    meta: dict,
    spec: PreprocessSpec,
    runtime: str,
    plan: StoredPlan,
    todo,
    done,
    summary: dict,
    started: float,
    progress: bool,
    unknown_above: float | None = None,
    root: str | None = None,
    decoded=None,
) -> None:
    """Label the planned keys not yet in the output; `decoded`: rows already read and decoded instead (packed data)."""
    import ray
    import ray.data

    if decoded is not None:
        ds = decoded
    elif todo is not None:
        step = max(64, min(TODO_BLOCK_ROWS, -(-len(todo) // 16)))
        ds = ray.data.from_arrow([todo.slice(i, step) for i in range(0, len(todo), step)])
    else:
        done_ref = ray.put(done.combine_chunks()) if len(done) else None
        hold = cfg.output if os.environ.get(LIST_HOLD_ENV) == "1" else None
        block_bytes = TEST_BLOCK_BYTES if hold else BLOCK_BYTES
        ds = ray.data.read_datasource(
            plan_datasource(plan.listers, plan.source, plan.uri, done_ref, block_bytes, hold, root), num_cpus=0.25
        )
        ds.context.target_max_block_size = block_bytes  # each listed block goes on at once (see plan.py)
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
    last = time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        summary["labeled"] += int(batch["rows"].sum())
        summary["errors"] += int(batch["errors"].sum())
        kinds.update(k for joined in batch["kinds"] for k in str(joined).split(",") if k)
        if progress and time.perf_counter() - last > 5:
            last = time.perf_counter()
            rate = summary["labeled"] / (last - started)
            of = f"/{len(todo)}" if todo is not None else ""
            print(f"  {summary['labeled']}{of} labeled, {summary['errors']} errors, {rate:.1f} images/s", flush=True)
    summary["errors_by_kind"] = dict(kinds)


def finish(cfg: LabelConfig, plan: StoredPlan, snap, summary: dict, started: float) -> dict:
    """Counts for the summary; OUTPUT/_SUCCESS.json when every planned object has its row."""
    stats = OutputStats.of(snap)
    seconds = time.perf_counter() - started
    summary.update(
        total=plan.keys if plan.complete else stats.distinct,
        rows=stats.rows,
        distinct=stats.distinct,
        seconds=seconds,
        images_per_s=summary["labeled"] / max(seconds, 1e-9),
        driver_peak_rss_mb=peak_rss_mb(),
    )
    summary["skipped_done"] = summary["total"] - summary["labeled"]
    summary["complete"] = plan.complete and stats.distinct >= plan.keys
    if summary["complete"]:
        record = {
            "objects": plan.keys,
            "rows": stats.rows,
            "distinct_paths": stats.distinct,
            "errors": stats.errors,
            "errors_by_kind": stats.errors_by_kind,
            "parts": stats.parts,
            "model": summary["model"],
            "runtime": summary.get("runtime"),
            "scores": summary.get("scores"),
            "unknown_above": summary.get("unknown_above"),
            "finished_at": now(),
            "last_run": {
                k: summary[k]
                for k in ("labeled", "seconds", "images_per_s", "plan_seconds", "driver_peak_rss_mb", "duplicates_removed")
            },
        }
        storage.write_text(storage.join_uri(cfg.output, SUCCESS), json.dumps(record, indent=1))
    return summary


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would also count what a parent held before exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_success(output: str) -> dict | None:
    """OUTPUT/_SUCCESS.json, or None when there is none; one line when it is not a job's record."""
    uri = storage.join_uri(output, SUCCESS)
    if not storage.exists(uri):
        return None
    try:
        record = json.loads(storage.read_text(uri))
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("model"), str | None):
        raise DistclsError(
            f"label --status: {uri} is not the record a finished job writes (a JSON object with its counts); "
            "delete it and run the same `distcls label` again to check the output and write it anew"
        )
    return record


def label_status(output: str, print_it: bool = True) -> dict:
    """`distcls label --status`: objects planned, rows written, errors by kind, complete or not."""
    if not storage.exists(output):
        raise DistclsError(f"label --status: {output} does not exist; check the --output URI")
    plan = StoredPlan.read(output)
    snap, _ = done_snapshot(output, repair=False)
    stats = OutputStats.of(snap)
    record = read_success(output)
    planned = plan.keys if plan.listers else None
    complete = bool(plan.complete and record and stats.distinct >= plan.keys)
    status = {
        "output": output,
        "planned": planned,
        "plan_complete": plan.complete,
        "rows": stats.rows,
        "distinct_paths": stats.distinct,
        "parts": stats.parts,
        "errors": stats.errors,
        "errors_by_kind": stats.errors_by_kind,
        "complete": complete,
        "model": record["model"] if record else None,
    }
    if print_it:
        listing = "" if plan.complete or not plan.listers else f" so far ({len(plan.finished)}/{len(plan.listers)} listers done)"
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(stats.errors_by_kind.items())) or "none"
        print(f"output {output}")
        print(f"  planned:  {planned if planned is not None else 'no plan'} objects{listing}")
        print(f"  written:  {stats.rows} rows, {stats.distinct} distinct paths, in {stats.parts} parts")
        print(f"  errors:   {stats.errors} ({kinds})")
        todo = (planned - stats.distinct) if planned is not None else "?"
        print(
            f"  complete: {'yes' if complete else 'no'}"
            + ("" if complete else f" ({todo} to do; rerun the same `distcls label` to finish)")
        )
    return status

"""`python -m distcls.tools.bench.checkpointing N [DIR]`: distcls label's resume against Ray Data's own job
checkpointing (`ray.data.checkpoint.CheckpointConfig`, Ray 2.60) on the same run, without inference.

N synthetic keys are planned once (the plan-only bench's listers, scale_plan.py). Each system then runs the same
job (read the keys, a trivial "label" per row, Parquet out) in a process of its own with its own local Ray, is
SIGKILLed (with its whole session) once half the rows are written, and is run again:
- distcls: the stored plan less the labeled paths bucket by bucket (buckets.py), parts written by map tasks,
  the repair and the counts at the end (what `distcls label` does, less the model);
- Ray Data: read_parquet(plan shards) -> map_batches -> write_parquet with DataContext.checkpoint_config set
  (id_column "path"): Ray loads every checkpointed id, sorts them into one NumPy array and filters each read
  block against it in checkpoint-filter actors.
Measured per rerun: wall seconds, seconds to its first new output file, the driver's peak RSS and the peak RSS
summed over the session's processes (sampled), and the output's rows and distinct paths (exact = N and N).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

PART_ROWS = 2000


def fake_label(batch: dict) -> dict:
    """A stand-in for the model: a label derived from the path (the same in both systems)."""
    paths = batch["path"]
    return {
        "path": paths,
        "label": np.array([f"c{len(p) % 7}" for p in paths], dtype=object),
        "error": batch["error"],
    }


def write_batch(batch: dict, output: str) -> dict:
    import pyarrow as pa

    from distcls.label.parts import write_parts

    columns = {c: pa.array([v or None for v in batch[c]], pa.string()) for c in ("path", "label", "error")}
    table = pa.table(columns)
    write_parts(table, output, 64.0)
    return {"rows": np.array([len(table)])}


def run_distcls(plan_out: str) -> dict:
    """The job as distcls runs it: plan (stored) less what is done, bucket by bucket; parts; counts at the end."""
    import ray.data

    from distcls.label.buckets import index_output
    from distcls.label.plan import StoredPlan
    from distcls.label.status import peak_rss_mb
    from distcls.runtime import init_ray

    init_ray()
    started = time.perf_counter()
    plan = StoredPlan.read(plan_out)
    index = index_output(plan_out, plan, None)
    planned_s = time.perf_counter() - started
    if index.todo:
        ds = ray.data.from_arrow_refs(index.todo).repartition(target_num_rows_per_block=PART_ROWS)
        ds = ds.map_batches(fake_label, batch_format="numpy").map_batches(
            write_batch, fn_kwargs={"output": plan_out}, batch_size=PART_ROWS, batch_format="numpy"
        )
        for _ in ds.iter_batches(batch_size=None):
            pass
    final = index_output(plan_out, StoredPlan.read(plan_out), None)
    return {"planned_s": planned_s, "rows": final.rows, "distinct": final.distinct, "driver_peak_rss_mb": peak_rss_mb()}


def run_ray_data(plan_out: str, output: str, checkpoints: str) -> dict:
    """The same job with Ray Data's checkpointing: ids in `checkpoints`, data files in `output`."""
    import pyarrow.parquet as pq
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    from distcls.label.plan import StoredPlan
    from distcls.label.status import peak_rss_mb
    from distcls.runtime import init_ray

    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(id_column="path", checkpoint_path=checkpoints, delete_checkpoint_on_success=False)
    shards = StoredPlan.read(plan_out).shards()
    started = time.perf_counter()
    ds = ray.data.read_parquet(shards, columns=["path", "error"]).map_batches(fake_label, batch_format="numpy")
    ds.write_parquet(output, min_rows_per_file=PART_ROWS)
    seconds = time.perf_counter() - started
    files = glob.glob(os.path.join(output, "**", "*.parquet"), recursive=True)
    paths = pq.ParquetDataset(files).read(columns=["path"]).column("path") if files else None
    rows = len(paths) if paths is not None else 0
    distinct = len(set(paths.to_pylist())) if paths is not None else 0
    return {"write_s": seconds, "rows": rows, "distinct": distinct, "driver_peak_rss_mb": peak_rss_mb()}


def rows_in(folder: str) -> int:
    import pyarrow.parquet as pq

    total = 0
    for path in glob.glob(os.path.join(folder, "*.parquet")):
        try:
            total += pq.ParquetFile(path).metadata.num_rows
        except Exception:  # written while counting: counted next time
            continue
    return total


def session_rss_mb(sid: int) -> float:
    from distcls.tools.bench.scale import session_members

    total = 0
    for pid in session_members(sid):
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total / 1024


def run_one(args: list[str], watch: str, kill_at: int | None) -> dict:
    """A phase in its own session; SIGKILL it all once `watch` holds kill_at rows; sample the session's RSS."""
    from distcls.tools.bench.scale import kill_session

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    before = len(glob.glob(os.path.join(watch, "*.parquet")))
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "distcls.tools.bench.checkpointing", *args],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    first_new, peak, killed = None, 0.0, None
    while proc.poll() is None:
        peak = max(peak, session_rss_mb(proc.pid))
        if first_new is None and len(glob.glob(os.path.join(watch, "*.parquet"))) > before:
            first_new = time.perf_counter() - started
        if kill_at is not None and (rows := rows_in(watch)) >= kill_at:
            kill_session(proc.pid)
            killed = rows
            break
        time.sleep(0.5)
    out = proc.communicate()[0]
    lines = [line for line in out.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines and killed is None else {}
    return {
        **result,
        "wall_s": time.perf_counter() - started,
        "first_new_file_s": first_new,
        "session_peak_rss_mb": peak,
        "killed_at": killed,
    }


def compare(n: int, work: str) -> dict:
    from distcls.tools.bench.scale_plan import run_phase

    plan_out = os.path.join(work, "distcls")
    run_phase("list", plan_out, n)
    result = {"objects": n}
    killed = run_one(["distcls", plan_out], plan_out, n // 2)
    resumed = run_one(["distcls", plan_out], plan_out, None)
    result["distcls"] = {**resumed, "killed_at": killed["killed_at"], "exact": resumed["rows"] == resumed["distinct"] == n}
    output, checkpoints = os.path.join(work, "ray-out"), os.path.join(work, "ray-ckpt")
    args = ["ray", plan_out, output, checkpoints]
    os.makedirs(output, exist_ok=True)
    killed = run_one(args, output, n // 2)
    resumed = run_one(args, output, None)
    result["ray_data"] = {**resumed, "killed_at": killed["killed_at"], "exact": resumed["rows"] == resumed["distinct"] == n}
    return result


if __name__ == "__main__":
    if sys.argv[1] == "distcls":
        print(json.dumps(run_distcls(sys.argv[2])), flush=True)
    elif sys.argv[1] == "ray":
        print(json.dumps(run_ray_data(*sys.argv[2:5])), flush=True)
    else:
        count = int(sys.argv[1])
        folder = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="distcls-bench-ckpt-")
        try:
            print(json.dumps(compare(count, folder), indent=1), flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

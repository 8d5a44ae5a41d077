"""`distcls bench scale --plan-only --objects N`: what a labeling job does before inference, at sizes whose files
would exceed this machine's inodes: N synthetic keys (generated listing pages, no files), listed into a plan by
the plan's own shard writer in Ray tasks (LISTERS listers, pages of 1,000 keys), a half-done output (parts of
every other key, in the label output's schema), then the rerun's planning: the stored plan less the labeled
paths, bucket by bucket (label/buckets.py), exactly as `distcls label` runs it. Each phase is a separate
process with its own local Ray; the rerun's driver peak RSS is read from /proc (VmHWM).

bench.json keys (under scale.plan_only): driver_peak_rss_mb (the rerun's driver), subtract_s (the rerun's
planning with half done), keys_per_s (listing into plan shards), and the counts that show it exact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from distcls.tools.config import BenchConfig

LISTERS = 8  # top-level prefixes of the synthetic bucket, one lister each
PAGE = 1000  # keys per generated listing page (the S3 maximum)
PART_ROWS = 2000  # rows per part of the half-done output (the --part-rows default)
INPUT = "s3://synthetic-bucket/photos"  # never read: the keys are generated


def synthetic_keys(lister: int, n: int, after: str | None = None):
    """(path, error) for `n` keys of lister `lister`, page by page in listing (sorted) order, after `after`."""
    prefix = f"{INPUT}/p{lister:02d}/"
    start = int(after[len(prefix) :].split(".")[0]) + 1 if after else 0
    for page in range(start, n, PAGE):
        for i in range(page, min(page + PAGE, n)):
            yield f"{prefix}{i:010d}.jpg", ""


def listers_for(n: int) -> list[tuple]:
    from distcls.label.manifest import Lister

    per = [n // LISTERS + (1 if i < n % LISTERS else 0) for i in range(LISTERS)]
    return [(i, per[i], Lister("tree", (f"{INPUT}/p{i:02d}",))) for i in range(LISTERS)]


def list_phase(output: str, n: int) -> dict:
    """Write the plan of n synthetic keys with the plan's shard writer, one Ray task per lister."""
    import ray

    from distcls.label.manifest import Source
    from distcls.label.plan import StoredPlan, read_progress, shard_blocks
    from distcls.label.status import peak_rss_mb
    from distcls.runtime import init_ray

    init_ray()
    listers = listers_for(n)
    plan = StoredPlan.start(output, Source(input=INPUT), [lst for _, _, lst in listers])

    def run(i: int, count: int, lister) -> int:
        start = read_progress(plan.uri, lister)
        keys = synthetic_keys(i, count, start["after"])
        return sum(len(t) for t in shard_blocks(lister, plan.uri, keys, None, start=start))

    started = time.perf_counter()
    task = ray.remote(num_cpus=0.25)(run)
    listed = sum(ray.get([task.remote(i, count, lst) for i, count, lst in listers]))
    seconds = time.perf_counter() - started
    return {"listed": listed, "list_s": seconds, "keys_per_s": listed / seconds, "driver_peak_rss_mb": peak_rss_mb()}


def half_phase(output: str, n: int) -> dict:
    """Parts holding every other key of every lister (what a job killed at half leaves), in Ray tasks."""
    import ray

    from distcls.runtime import init_ray

    init_ray()
    task = ray.remote(num_cpus=1)(write_half)
    jobs = [(i, lo, min(lo + 200_000, count)) for i, count, _ in listers_for(n) for lo in range(0, count, 200_000)]
    started = time.perf_counter()
    rows = sum(ray.get([task.remote(output, i, lo, hi) for i, lo, hi in jobs]))
    return {"labeled": rows, "write_half_s": time.perf_counter() - started}


def write_half(output: str, lister: int, lo: int, hi: int) -> int:
    import numpy as np
    import pyarrow as pa

    from distcls.label.parts import output_schema, write_parts

    prefix = f"{INPUT}/p{lister:02d}/"
    paths = [f"{prefix}{i:010d}.jpg" for i in range(lo + lo % 2, hi, 2)]
    for s in range(0, len(paths), PART_ROWS):
        chunk = paths[s : s + PART_ROWS]
        k = len(chunk)
        f32 = pa.array(np.ones(k, np.float32))
        columns = {
            "path": pa.array(chunk, pa.string()),
            "label": pa.array(["x"] * k, pa.string()),
            "score": f32,
            "topk_labels": pa.array([["x"]] * k, pa.list_(pa.string())),
            "topk_scores": pa.array([[1.0]] * k, pa.list_(pa.float32())),
            "margin": f32,
            "entropy": f32,
            "ood_score": f32,
            "error": pa.nulls(k, pa.string()),
            "model": pa.array(["synthetic"] * k, pa.string()),
            "labeled_at": pa.array(np.zeros(k, np.int64), pa.timestamp("us", tz="UTC")),
        }
        write_parts(pa.table(columns, schema=output_schema()), output, 64.0)
    return len(paths)


def rerun_phase(output: str, n: int) -> dict:
    """The rerun's planning, as `distcls label` does it (plan_work): the stored plan less what is done."""
    from distcls.config import LabelConfig
    from distcls.label.job import plan_work
    from distcls.label.status import peak_rss_mb

    cfg = LabelConfig(checkpoint="unused", input=INPUT, output=output)
    started = time.perf_counter()
    work = plan_work(cfg, INPUT, {})
    seconds = time.perf_counter() - started
    index = work["index"]
    return {
        "subtract_s": seconds,
        "driver_peak_rss_mb": peak_rss_mb(),
        "planned": work["plan"].keys,
        "todo": index.todo_rows,
        "rows": index.rows,
        "distinct": index.distinct,
        "buckets": index.buckets,
    }


def run_phase(phase: str, output: str, n: int) -> dict:
    """One phase in a process of its own (its own local Ray), its figures read back as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "distcls.tools.bench.scale_plan", phase, output, str(n)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench scale --plan-only: phase {phase} exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def bench_plan_only(cfg: BenchConfig) -> dict:
    n = cfg.objects
    local = cfg.scale_dir or tempfile.mkdtemp(prefix="distcls-bench-plan-")
    output = os.path.join(local, f"plan-only-{n}")
    shutil.rmtree(output, ignore_errors=True)
    try:
        listed = run_phase("list", output, n)
        print(
            f"bench scale --plan-only: {listed['listed']:,} synthetic keys planned, {listed['keys_per_s']:,.0f} keys/s",
            flush=True,
        )
        half = run_phase("half", output, n)
        print(f"  half-done output: {half['labeled']:,} rows in {half['write_half_s']:.0f} s", flush=True)
        rerun = run_phase("rerun", output, n)
        print(
            f"  rerun planning: {rerun['subtract_s']:.1f} s in {rerun['buckets']} buckets, {rerun['todo']:,} to do, "
            f"driver peak {rerun['driver_peak_rss_mb']:.0f} MB",
            flush=True,
        )
        return {
            "objects": n,
            "driver_peak_rss_mb": rerun["driver_peak_rss_mb"],
            "subtract_s": rerun["subtract_s"],
            "keys_per_s": listed["keys_per_s"],
            "list_driver_peak_rss_mb": listed["driver_peak_rss_mb"],
            "labeled_before_rerun": half["labeled"],
            "planned": rerun["planned"],
            "todo": rerun["todo"],
            "todo_exact": rerun["todo"] == n - half["labeled"] and rerun["planned"] == n,
            "buckets": rerun["buckets"],
        }
    finally:
        if not cfg.scale_dir:
            shutil.rmtree(local, ignore_errors=True)
        else:
            shutil.rmtree(output, ignore_errors=True)


if __name__ == "__main__":
    phase, out, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    figures = {"list": list_phase, "half": half_phase, "rerun": rerun_phase}[phase](out, count)
    print(json.dumps(figures), flush=True)

"""`distcls bench scale --objects N [--store local|s3]`: `distcls label` over N small real images, as a user
runs it (a separate process, its own local Ray), measured from outside.

N 32x32 PNG crops of real photos, 1,000 per folder, are labeled by the bundled EfficientNet-Lite0 at 32 px.
Three runs: a full run (time to the first part, throughput, the driver's peak RSS, rows), a rerun with
everything done, and a run SIGKILLed (with its whole Ray session) at about half and run again (the rerun's
planning time with half done, and exactly N rows after it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from distcls import storage
from distcls.tools.config import BenchConfig

PER_FOLDER = 1000
DISTINCT = 512  # distinct crops; the objects cycle through them


def small_pngs(n: int, seed: int = 0) -> list[bytes]:
    """n distinct 32x32 PNG crops of scikit-image's real sample photos."""
    from PIL import Image
    from skimage import data

    sources = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket(), data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        size = int(rng.integers(32, min(src.shape[:2]) // 2))
        y, x = int(rng.integers(0, src.shape[0] - size)), int(rng.integers(0, src.shape[1] - size))
        buf = io.BytesIO()
        Image.fromarray(src[y : y + size, x : x + size]).resize((32, 32), Image.BILINEAR).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_objects(root: str, n: int) -> float:
    """N PNGs under root/dNNNN/NNNNNNN.png (kept for a later run of the same N); returns seconds spent."""
    marker = storage.join_uri(root, "_objects.json")
    if storage.exists(marker) and json.loads(storage.read_text(marker)).get("objects") == n:
        return 0.0
    started = time.perf_counter()
    pngs = small_pngs(DISTINCT)
    names = ((storage.join_uri(root, f"d{i // PER_FOLDER:05d}", f"{i:07d}.png"), pngs[i % DISTINCT]) for i in range(n))
    scheme, path = storage.split_uri(root)
    if scheme == "file":
        for folder in range(-(-n // PER_FOLDER)):
            os.makedirs(os.path.join(path, f"d{folder:05d}"), exist_ok=True)

        def put(item):
            with open(item[0], "wb") as f:
                f.write(item[1])

        with ThreadPoolExecutor(8) as pool:
            for _ in pool.map(put, names, chunksize=256):
                pass
    else:
        storage.ensure_bucket(root)
        storage.write_many(names, workers=32)
    storage.write_text(marker, json.dumps({"objects": n}))
    return time.perf_counter() - started


def session_members(sid: int) -> list[int]:
    """PIDs of the live (not zombie) processes of session `sid` (a label command and the Ray it started)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in "ZX" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def kill_session(sid: int, timeout: float = 60) -> None:
    """SIGKILL every process of session `sid` (a machine lost at once) until none is left."""
    deadline = time.monotonic() + timeout
    while (pids := session_members(sid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def rows_written(output: str) -> int:
    """Rows in the output's parts, from the Parquet footers."""
    import pyarrow.parquet as pq

    from distcls.label import existing_parts

    total = 0
    for part in existing_parts(output):
        scheme, path = storage.split_uri(part)
        try:
            total += pq.ParquetFile(path if scheme == "file" else io.BytesIO(storage.read_bytes(part))).metadata.num_rows
        except Exception:  # a part removed while counting (a repair): counted next time
            continue
    return total


def label_command(checkpoint: str, input_uri: str, output: str, n: int) -> list[str]:
    """`distcls label` with its defaults, except parts of at most n/20 rows (so a kill at half leaves some)."""
    return [
        sys.executable,
        "-m",
        "distcls.cli",
        "label",
        "--checkpoint",
        checkpoint,
        "--input",
        input_uri,
        "--output",
        output,
        "--part-rows",
        str(min(2000, max(10, n // 20))),
    ]


def run_label(cmd: list[str], log: str, output: str, kill_at_rows: int | None = None) -> dict:
    """Run a label command in its own session; the time to its first part; optionally SIGKILL it (and its
    Ray) once kill_at_rows rows are written."""
    from distcls.label import existing_parts

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    first_part = None
    killed_at = None
    while proc.poll() is None:
        if first_part is None and existing_parts(output):
            first_part = time.perf_counter() - started
        if kill_at_rows is not None and first_part is not None and (rows := rows_written(output)) >= kill_at_rows:
            kill_session(proc.pid)
            killed_at = rows
            break
        time.sleep(0.25 if first_part is None else 1.0)
    code = proc.wait()
    seconds = time.perf_counter() - started
    if killed_at is None and code != 0:
        raise RuntimeError(f"bench scale: `{' '.join(cmd)}` exited {code}; see {log}")
    return {"seconds": seconds, "first_part_s": first_part, "killed_at_rows": killed_at}


def success(output: str) -> dict:
    return json.loads(storage.read_text(storage.join_uri(output, "_SUCCESS.json")))


def list_rate(input_uri: str) -> tuple[int, float]:
    """Keys listed per second by the plan's listers, run one after the other in this process."""
    from distcls.label.manifest import Source
    from distcls.label.plan import iter_keys, make_listers

    source = Source(input=input_uri)
    started = time.perf_counter()
    n = sum(1 for lister in make_listers(source) for _ in iter_keys(lister, source))
    return n, n / max(time.perf_counter() - started, 1e-9)


def steady_rate(output: str) -> float:
    """Rows per second between the first and the last batch labeled (labeled_at), without start-up."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from distcls.label import existing_parts

    lo = hi = None
    rows = 0
    for part in existing_parts(output):
        scheme, path = storage.split_uri(part)
        column = pq.read_table(path if scheme == "file" else io.BytesIO(storage.read_bytes(part)), columns=["labeled_at"]).column(
            0
        )
        bounds = pc.min_max(column).as_py()
        lo = bounds["min"] if lo is None else min(lo, bounds["min"])
        hi = bounds["max"] if hi is None else max(hi, bounds["max"])
        rows += len(column)
    return rows / max((hi - lo).total_seconds(), 1e-9) if rows else 0.0


def bench_scale(cfg: BenchConfig) -> dict:
    from distcls.checkpoint import from_pretrained

    if cfg.plan_only:
        from distcls.tools.bench.scale_plan import bench_plan_only

        return {"plan_only": bench_plan_only(cfg)}
    n = cfg.objects
    local = cfg.scale_dir or tempfile.mkdtemp(prefix="distcls-bench-scale-")
    root = f"s3://bench-scale/n{n}" if cfg.store == "s3" else os.path.join(local, f"n{n}")
    input_uri, work = storage.join_uri(root, "in"), tempfile.mkdtemp(prefix="run-", dir=local)
    try:
        made = make_objects(input_uri, n)
        print(f"bench scale: {n} PNGs under {input_uri}" + (f" (made in {made:.0f} s)" if made else " (kept)"), flush=True)
        checkpoint = os.path.join(local, "lite0-32")
        if not os.path.exists(os.path.join(checkpoint, "distcls.json")):
            from_pretrained(out=checkpoint, image_size=32)
        listed, keys_per_s = list_rate(input_uri)
        print(f"  listing: {listed} keys, {keys_per_s:,.0f} keys/s", flush=True)
        log = os.path.join(work, "label.log")
        out_full = storage.join_uri(root, f"out-{os.path.basename(work)}-full")
        full = run_label(label_command(checkpoint, input_uri, out_full, n), log, out_full)
        record = success(out_full)
        print(
            f"  full run: {full['seconds']:.0f} s, first part after {full['first_part_s']:.1f} s, {record['rows']} rows",
            flush=True,
        )
        rerun = run_label(label_command(checkpoint, input_uri, out_full, n), log, out_full)
        rerun_record = success(out_full)
        out_kill = storage.join_uri(root, f"out-{os.path.basename(work)}-killed")
        killed = run_label(label_command(checkpoint, input_uri, out_kill, n), log, out_kill, kill_at_rows=n // 2)
        resumed = run_label(label_command(checkpoint, input_uri, out_kill, n), log, out_kill)
        resumed_record = success(out_kill)
        result = {
            "objects": n,
            "store": cfg.store,
            "list_keys_per_s": keys_per_s,
            "time_to_first_part_s": full["first_part_s"],
            "driver_peak_rss_mb": max(r["last_run"]["driver_peak_rss_mb"] for r in (record, rerun_record, resumed_record)),
            "driver_peak_rss_mb_by_run": {
                "full": record["last_run"]["driver_peak_rss_mb"],
                "rerun_done": rerun_record["last_run"]["driver_peak_rss_mb"],
                "resume_half": resumed_record["last_run"]["driver_peak_rss_mb"],
            },
            "images_per_s": record["rows"] / full["seconds"],
            "steady_images_per_s": steady_rate(out_full),
            "seconds": full["seconds"],
            "rows": record["rows"],
            "distinct_paths": record["distinct_paths"],
            "rerun_done_s": rerun["seconds"],
            "killed_at_rows": killed["killed_at_rows"],
            "resume_half_s": resumed_record["last_run"]["plan_seconds"],
            "resume_run_s": resumed["seconds"],
            "rows_after_kill_and_rerun": resumed_record["rows"],
            "distinct_after_kill_and_rerun": resumed_record["distinct_paths"],
        }
        print(
            f"  rerun (all done): {rerun['seconds']:.1f} s; killed at {killed['killed_at_rows']} rows, the rerun "
            f"planned in {result['resume_half_s']:.1f} s and ended with {result['rows_after_kill_and_rerun']} rows "
            f"({result['distinct_after_kill_and_rerun']} distinct)",
            flush=True,
        )
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if cfg.store == "local":
            for out in (f"out-{os.path.basename(work)}-full", f"out-{os.path.basename(work)}-killed"):
                shutil.rmtree(os.path.join(root, out), ignore_errors=True)
        if not cfg.scale_dir:
            shutil.rmtree(local, ignore_errors=True)

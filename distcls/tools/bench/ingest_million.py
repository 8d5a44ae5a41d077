"""`distcls bench ingest`, its last part: the training driver on a packed set of 1,000,000 tiny images.

The set is written directly, not through 1,000,000 files (write_million); `distcls train` then runs on it as a
user runs it, its own process with its own local Ray, measured from outside (measure_driver).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

from distcls import __version__, storage
from distcls.tools.config import BenchConfig

CLASS_NAMES = ("chelsea", "astronaut", "coffee", "rocket", "immunohistochemistry")  # the sample photos' order
TINY_SIDE = 16  # pixels of the set's PNGs (about 640 bytes each)
TINY_DISTINCT = 512
VAL_FRACTION = 0.01  # the set's val split: 10,000 of 1,000,000


def tiny_pngs() -> tuple[list[bytes], list[int]]:
    """TINY_DISTINCT PNGs of TINY_SIDE px (crops of the real sample photos) and their classes (the source)."""
    from PIL import Image

    from distcls.tools.bench.scale import small_pngs

    blobs = []
    for png in small_pngs(TINY_DISTINCT):
        buf = io.BytesIO()
        Image.open(io.BytesIO(png)).resize((TINY_SIDE, TINY_SIDE), Image.BILINEAR).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    return blobs, [i % len(CLASS_NAMES) for i in range(TINY_DISTINCT)]  # small_pngs cycles the 5 photos


def shard_table(blobs: list[bytes], paths: list[str], labels: list[int], digests: list[str]):
    """A shard's table as `distcls pack` writes it (pack.pack_shard): HF image struct, label, size, sha256."""
    import pyarrow as pa

    from distcls.packed_format import hf_schema_metadata

    image = pa.StructArray.from_arrays([pa.array(blobs, pa.binary()), pa.array(paths, pa.string())], names=["bytes", "path"])
    side = pa.array([TINY_SIDE] * len(blobs), pa.int32())
    columns = {"image": image, "label": pa.array(labels, pa.int64()), "width": side, "height": side}
    return pa.table({**columns, "sha256": pa.array(digests, pa.string())}).replace_schema_metadata(
        hf_schema_metadata(list(CLASS_NAMES))
    )


def write_million(out: str, n: int) -> dict:
    """N tiny images packed without N files: pack's own planner (pack.plan_shards: the val split and shards of
    the default --shard-mb, from a listing made here), pack's Parquet layout (shard_table, row groups of
    pack.ROW_GROUP_BYTES, its compression), then _rejected.parquet and _dataset.json as pack.finish writes them.
    Rows cycle through TINY_DISTINCT real crops; their stored paths name objects never written (<out>/_source/)."""
    from distcls.config.data import PackConfig
    from distcls.pack import Listing, plan_shards

    started = time.perf_counter()
    blobs, classes = tiny_pngs()
    paths = [f"{out}/_source/{i // 1000:04d}/{i:07d}.png" for i in range(n)]
    labels = [classes[i % TINY_DISTINCT] for i in range(n)]
    listing = Listing(paths, labels, [len(blobs[i % TINY_DISTINCT]) for i in range(n)], list(CLASS_NAMES), "direct")
    shard_mb = PackConfig(data="-", out="-").shard_mb
    shard_of, shards = plan_shards(listing, VAL_FRACTION, 0, int(shard_mb * 2**20))
    rows_of: dict[int, list[int]] = {}
    for i, s in enumerate(shard_of):
        rows_of.setdefault(s, []).append(i)
    splits: dict[str, dict] = {}
    for shard in shards:
        rows = rows_of[shard["id"]]
        size = write_shard(os.path.join(out, shard["name"]), rows, blobs, listing)
        split = splits.setdefault(shard["split"], {"rows": 0, "bytes": 0, "counts": dict.fromkeys(CLASS_NAMES, 0), "shards": []})
        split["shards"].append({"name": shard["name"], "rows": len(rows), "bytes": size})
        split["rows"], split["bytes"] = split["rows"] + len(rows), split["bytes"] + size
        for c, k in zip(*np.unique([labels[i] for i in rows], return_counts=True)):
            split["counts"][CLASS_NAMES[c]] += int(k)
    write_meta(out, n, shard_mb, splits)
    mb = sum(s["bytes"] for s in splits.values()) / 2**20
    return {"images": n, "seconds": time.perf_counter() - started, "shards": len(shards), "mb": mb}


def write_shard(uri: str, rows: list[int], blobs: list[bytes], listing) -> int:
    """One shard file, as pack.pack_shard writes it; returns its size."""
    from distcls.pack import ROW_GROUP_BYTES, write_table

    data = [blobs[i % TINY_DISTINCT] for i in rows]
    digests = [hashlib.sha256(b).hexdigest() for b in blobs]
    table = shard_table(
        data, [listing.paths[i] for i in rows], [listing.labels[i] for i in rows], [digests[i % TINY_DISTINCT] for i in rows]
    )
    per_group = max(1, int(ROW_GROUP_BYTES * len(rows) / max(1, sum(map(len, data)))))
    compression = {"image.bytes": "NONE", "image.path": "SNAPPY", "label": "SNAPPY", "width": "SNAPPY", "height": "SNAPPY"}
    return write_table(
        uri,
        table,
        row_group_size=per_group,
        compression={**compression, "sha256": "NONE"},
        use_dictionary=["image.path", "label", "width", "height"],  # rows repeat 512 crops; real ones do not
    )


def write_meta(out: str, n: int, shard_mb: float, splits: dict) -> None:
    """_rejected.parquet (empty) and _dataset.json, with the fields pack.finish writes."""
    import pyarrow as pa

    from distcls.pack import REJECTED, write_table
    from distcls.packed_format import DATASET_JSON, FORMAT_VERSION, PACK_FORMAT

    empty = pa.table({k: pa.array([], pa.string()) for k in ("path", "label", "error")})
    write_table(os.path.join(out, REJECTED), empty)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    meta = {"format": PACK_FORMAT, "format_version": FORMAT_VERSION, "distcls_version": __version__}
    meta |= {"source": "distcls bench ingest (written directly)", "fingerprint": "direct", "class_names": list(CLASS_NAMES)}
    meta |= {"listed": n, "ignored": 0, "created_at": now, "splits": splits}
    meta["options"] = {"val_fraction": VAL_FRACTION, "seed": 0, "shard_mb": shard_mb, "max_side": None}
    meta |= {"rejected": {"file": REJECTED, "rows": 0, "by_kind": {}}, "finished_at": now}
    storage.write_text(os.path.join(out, DATASET_JSON), json.dumps(meta, indent=1))


def memory_mb(pid: int) -> tuple[float, float] | None:
    """(VmHWM: the process's peak RSS so far, RssAnon: its heap and other private memory now) in MB, or None
    once it is gone. VmHWM counts the pages of shared libraries it touched (importing torch alone is ~0.5 GB of
    it on the development machine); RssAnon is what grows with the data."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmHWM"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def import_rss_mb() -> float:
    """Peak RSS of a process that only imports what the training driver imports (the floor under any data)."""
    code = "import distcls.train.trainer, ray.train.torch; print(open('/proc/self/status').read())"
    status = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


PHASES = {"splits_read": "validation ", "recipe_chosen": "recipe:", "workers_up": "workers on nodes"}  # driver lines


def follow(proc, log: str, started: float, seen: dict) -> threading.Thread:
    """A thread copying the process's output to `log` and noting when each PHASES line first shows."""

    def run() -> None:
        with open(log, "ab") as out:
            for line in proc.stdout:
                out.write(line)
                text = line.decode(errors="replace")
                for phase, prefix in PHASES.items():
                    if phase not in seen and prefix in text:
                        seen[phase] = time.time() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def measure_driver(cfg: BenchConfig, data: str, runs: str, log: str, timeout: float = 900) -> dict:
    """`distcls train --data DATA` as a user runs it (its own process and local Ray): its memory, polled, and the
    seconds from its start to the first step: the marker of the trainer's step hook (DISTCLS_TEST_FAULT=1), written
    as step 1 begins, once step 0 is done; the hook then fails the run. Also when the driver printed its splits,
    its recipe, and the workers' first line (`phases`)."""
    from distcls.tools.bench.scale import kill_session

    name = f"ingest-1m-{os.getpid()}"
    cmd = [sys.executable, "-m", "distcls.cli", "train", "--data", data, "--epochs", "1", "--num-workers", "1"]
    cmd += ["--image-size", str(cfg.image_size), "--batch-size", str(cfg.batch_size), "--no-cache-data"]
    cmd += ["--storage", runs, "--name", name]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"DISTCLS_TEST_FAULT": "1"}
    marker, phases = os.path.join(runs, name, "fault-injected.txt"), {}
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    reader = follow(proc, log, started, phases)
    peak, anon, first_step, deadline = 0.0, 0.0, None, started + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            now = memory_mb(proc.pid) or (0.0, 0.0)
            peak, anon = max(peak, now[0]), max(anon, now[1])
            if first_step is None and os.path.exists(marker):
                first_step = os.path.getmtime(marker) - started
                deadline = min(deadline, time.time() + 60)  # the hook fails the run; its ending is not measured
            time.sleep(0.05)
    finally:
        kill_session(proc.pid)
        proc.wait()
        reader.join(timeout=10)
    if first_step is None and os.path.exists(marker):
        first_step = os.path.getmtime(marker) - started
    if first_step is None:
        raise RuntimeError(f"bench ingest: `distcls train --data {data}` never reached its first step; see {log}")
    return {"driver_peak_rss_mb": peak, "driver_peak_anon_mb": anon, "first_step_s": first_step, "phases_s": phases}


def bench_million(cfg: BenchConfig, work: str, log: str) -> dict:
    folder = os.path.join(cfg.ingest_dir or work, f"tiny-{cfg.ingest_million}")
    marker = os.path.join(folder, "_dataset.json")
    if os.path.exists(marker) and json.loads(storage.read_text(marker)).get("listed") == cfg.ingest_million:
        made = {"images": cfg.ingest_million, "seconds": 0.0, "kept": True}
    else:
        shutil.rmtree(folder, ignore_errors=True)
        made = write_million(folder, cfg.ingest_million)
    got = measure_driver(cfg, folder, os.path.join(work, "runs-1m"), log) | {"driver_import_rss_mb": import_rss_mb()}
    print(
        f"{cfg.ingest_million:,} tiny images packed ({made.get('mb', 0):.0f} MB, written in {made['seconds']:.0f} s): "
        f"distcls train driver peak RSS {got['driver_peak_rss_mb']:.0f} MB (private {got['driver_peak_anon_mb']:.0f} MB; "
        f"its imports alone {got['driver_import_rss_mb']:.0f} MB), first step after {got['first_step_s']:.1f} s "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in got['phases_s'].items())})",
        flush=True,
    )
    return {**got, "pack": made}

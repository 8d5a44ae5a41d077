"""`distcls bench ingest`: training's input pipeline on real photos, against a plain PyTorch DataLoader script.

The photos: --ingest-images JPEGs of 500x375 (harness.make_photos: random crops of scikit-image's five real
photos; the class is the source photo) as an ImageFolder on the embedded S3 server. In order:
1. The training driver on 1,000,000 tiny images (--ingest-million; ingest_million.py), first, while nothing else
   runs: peak RSS and seconds from the start of `distcls train` to its first step.
2. `distcls pack` S3 -> S3 with --ingest-max-side and --val-fraction 0.1, shards sized for about --ingest-shards
   train shards: images/s end to end, Ray already running (as on a cluster). The shards are then copied to a
   local folder.
3. The plain script (distcls/tools/plain_ingest.py) over the same shards on the same server, per worker count,
   each of --ingest-loader-workers tried: the best is its figure. Ray is shut down meanwhile.
4. `distcls train` (the bench's --model, --image-size, --batch-size; AdamW; --ingest-epochs, the first a
   warm-up) per worker count: per object from S3, packed on S3, packed local, cached (--cache-data on the S3
   pack). Rates and data-wait fractions are rank 0's (the trainer's train_seconds and data_wait_seconds) over
   the epochs after the first; the plain script's are measured the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from distcls import storage
from distcls.tools.bench.ingest_million import CLASS_NAMES, bench_million  # make_photos' sources, in order
from distcls.tools.config import BenchConfig

TRAIN_MODES = ("per_object_s3", "packed_s3", "packed_local", "cached")


def steady(epochs: list[dict]) -> dict:
    """Images/s and data-wait share over the epochs after the first (all of them when there is one)."""
    use = epochs[1:] or epochs
    seconds = sum(e["seconds"] for e in use)
    return {
        "images_per_s_per_worker": sum(e["images"] for e in use) / max(seconds, 1e-9),
        "data_wait_fraction": sum(e["data_wait_seconds"] for e in use) / max(seconds, 1e-9),
        "epochs_images_per_s": [e["images"] / max(e["seconds"], 1e-9) for e in epochs],
    }


def distcls_epochs(result: dict) -> list[dict]:
    return [
        {
            "images": e["train_images_per_s_per_worker"] * e["train_seconds"],
            "seconds": e["train_seconds"],
            "data_wait_seconds": e["data_wait_seconds"],
        }
        for e in result["epochs"]
    ]


def train_config(cfg: BenchConfig, data: str, runs: str, workers: int, mode: str):
    """The fine-tune every distcls row runs; what costs compute is explicit (the plain script does the same)."""
    from distcls.config import TrainConfig
    from distcls.models import get_model_info

    return TrainConfig(
        data=data,
        val_fraction=0.1,  # per-object rows; a packed set brings its own val split (the same 10%)
        model=cfg.model,
        weights="bundled" if get_model_info(cfg.model).bundled else "none",
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        epochs=cfg.ingest_epochs,
        lr=1e-3,
        label_smoothing=0.1,
        random_crops=True,
        crop_scale_min=0.35,
        cache_data=mode == "cached",
        num_workers=workers,
        storage=runs,
        name=f"ingest-{mode}-w{workers}-{os.getpid()}",
        seed=0,
    )


def write_photos(cfg: BenchConfig, prefix: str) -> int:
    """The photo set as prefix/<class>/<index>.jpg; returns its bytes."""
    from distcls.tools.bench.harness import make_photos

    photos = make_photos(cfg.ingest_images, seed=11)
    storage.ensure_bucket(prefix)
    names = [storage.join_uri(prefix, CLASS_NAMES[i % len(CLASS_NAMES)], f"{i:06d}.jpg") for i in range(len(photos))]
    storage.write_many(zip(names, photos), workers=32)
    return sum(map(len, photos))


def pack_photos(cfg: BenchConfig, source: str, out: str, source_bytes: int) -> dict:
    from distcls.config.data import PackConfig
    from distcls.pack import run_pack

    shard_mb = max(0.01, source_bytes / max(1, cfg.ingest_shards) / 2**20)
    summary = run_pack(
        PackConfig(data=source, out=out, val_fraction=0.1, max_side=cfg.ingest_max_side, shard_mb=shard_mb), progress=False
    )
    packed_bytes = sum(s["bytes"] for s in summary["splits"].values())
    print(
        f"distcls pack S3 -> S3: {summary['images']} photos in {summary['seconds']:.1f} s = {summary['images_per_s']:.1f} "
        f"images/s; {source_bytes / 2**20:.1f} MB -> {packed_bytes / 2**20:.1f} MB (--max-side {cfg.ingest_max_side}), "
        f"{summary['splits']['train']['shards']} train shards",
        flush=True,
    )
    return {
        "images_per_s": summary["images_per_s"],
        "seconds": summary["seconds"],
        "images": summary["images"],
        "rejected": summary["rejected"],
        "shard_mb": shard_mb,
        "source_mb": source_bytes / 2**20,
        "packed_mb": packed_bytes / 2**20,
        "splits": summary["splits"],
    }


def copy_tree(src: str, dst: str) -> None:
    """Every file under src to the same relative path under dst (the S3 pack -> a local folder)."""
    base = src.rstrip("/") + "/"
    items = ((os.path.join(dst, uri[len(base) :]), storage.read_bytes(uri)) for uri in storage.list_files(src))
    storage.write_many(items)


# --- the plain DataLoader script -------------------------------------------------------------------------


def run_plain(cfg: BenchConfig, data: str, spec, world: int, loader_workers: int, log: str) -> dict:
    cmd = [sys.executable, "-m", "distcls.tools.plain_ingest", "--data", data, "--spec", json.dumps(spec.to_dict())]
    cmd += ["--num-classes", str(len(CLASS_NAMES)), "--model", cfg.model, "--epochs", str(cfg.ingest_epochs)]
    cmd += ["--batch-size", str(cfg.batch_size), "--world", str(world), "--loader-workers", str(loader_workers)]
    cmd += ["--weights", train_config(cfg, data, "-", world, "plain").weights]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "ab") as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench ingest: the plain script exited {done.returncode}; see {log}")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def bench_plain(cfg: BenchConfig, data: str, spec, log: str) -> dict:
    """The plain script per worker count; every loader-worker count tried, the best kept."""
    out = {}
    for world in cfg.workers:
        tried = {}
        for k in cfg.ingest_loader_workers:
            tried[k] = steady(run_plain(cfg, data, spec, world, k, log)["epochs"])
            print(
                f"plain DataLoader script, {world} worker(s), {k} loader workers: "
                f"{tried[k]['images_per_s_per_worker']:.1f} images/s per worker "
                f"(data wait {tried[k]['data_wait_fraction']:.0%})",
                flush=True,
            )
        best = max(tried, key=lambda k: tried[k]["images_per_s_per_worker"])
        out[f"plain_s3_{world}w"] = {**tried[best], "loader_workers": best, "tuning": tried}
    return out


# --- distcls train -----------------------------------------------------------------------------------------


def bench_distcls(cfg: BenchConfig, photos: str, packed: str, local: str, runs: str) -> dict:
    from distcls.train.trainer import run_training

    data = {"per_object_s3": photos, "packed_s3": packed, "packed_local": local, "cached": packed}
    out = {}
    for workers in cfg.workers:
        for mode in (m for m in TRAIN_MODES if m in cfg.ingest_parts):
            result = run_training(train_config(cfg, data[mode], runs, workers, mode), announce=False)
            row = steady(distcls_epochs(result))
            out[f"{mode}_{workers}w"] = row
            print(
                f"distcls train, {mode.replace('_', ' ')}, {workers} worker(s): {row['images_per_s_per_worker']:.1f} "
                f"images/s per worker (data wait {row['data_wait_fraction']:.0%})",
                flush=True,
            )
    return out


# --- the whole benchmark ------------------------------------------------------------------------------------


def ratio(a: dict, a_key: str, b: dict, b_key: str) -> float | None:
    if a_key not in a or b_key not in b:
        return None
    return a[a_key]["images_per_s_per_worker"] / max(b[b_key]["images_per_s_per_worker"], 1e-9)


def summarize(cfg: BenchConfig, runs: dict) -> dict:
    """The bench.json keys of the issue, from the rows (None where a row was not run)."""
    out = {
        "ratio_packed_s3_vs_cached": ratio(runs, "packed_s3_1w", runs, "cached_1w"),
        "data_wait_fraction_packed_s3": runs["packed_s3_1w"]["data_wait_fraction"] if "packed_s3_1w" in runs else None,
        "ratio_packed_vs_plain_loader": ratio(runs, "packed_s3_1w", runs, "plain_s3_1w"),
        "ratio_packed_vs_per_object_s3": ratio(runs, "packed_s3_1w", runs, "per_object_s3_1w"),
        "ratio_packed_vs_plain_loader_2w": ratio(runs, "packed_s3_2w", runs, "plain_s3_2w"),
        "per_worker_scaling_2w": ratio(runs, "packed_s3_2w", runs, "packed_s3_1w"),
        "per_worker_scaling_2w_cached": ratio(runs, "cached_2w", runs, "cached_1w"),
        "per_worker_scaling_2w_plain": ratio(runs, "plain_s3_2w", runs, "plain_s3_1w"),
    }
    out["scaling_limit"] = scaling_limit(out, runs)
    return out


def scaling_limit(out: dict, runs: dict) -> str | None:
    """What the measurements say limits per-worker scaling at 2 workers."""
    packed, cached = out["per_worker_scaling_2w"], out["per_worker_scaling_2w_cached"]
    if packed is None:
        return None
    cores, wait = os.cpu_count() or 1, runs["packed_s3_2w"]["data_wait_fraction"]
    if cached is not None and cached < 0.9 and packed >= 0.9 * cached:
        return (
            f"compute: cached data (no ingest at all) scales {cached:.2f} too; 2 workers + decode on {cores} cores "
            f"(data wait at 2 workers {wait:.0%})"
        )
    if wait > 0.1:
        also = "" if cached is None else f"; cached data scales {cached:.2f}"
        return f"ingest: rank 0 waits for data {wait:.0%} of the time at 2 workers on {cores} cores{also}"
    return f"per-worker rate {packed:.2f} of 1 worker, data wait {wait:.0%}, on {cores} cores"


def bench_ingest(cfg: BenchConfig, root: str) -> dict:
    """All of it (see the module doc); `root` is the S3 prefix of the embedded server."""
    import ray

    from distcls.runtime import init_ray
    from distcls.train.trainer import train_spec

    work = tempfile.mkdtemp(prefix="distcls-bench-ingest-")
    log = os.path.join(work, "ingest.log")
    photos, packed, local = f"{root}/ingest/photos", f"{root}/ingest/packed", os.path.join(work, "packed")
    result: dict = {"images": cfg.ingest_images, "max_side": cfg.ingest_max_side, "epochs": cfg.ingest_epochs}
    result |= {"model": cfg.model, "image_size": cfg.image_size, "batch_size": cfg.batch_size, "log": log}
    runs: dict = {}
    try:
        if "million" in cfg.ingest_parts:
            result["million"] = bench_million(cfg, work, log)
            result["driver_peak_rss_mb_1m"] = result["million"]["driver_peak_rss_mb"]
            result["first_step_s_1m"] = result["million"]["first_step_s"]
            result["driver_peak_anon_mb_1m"] = result["million"]["driver_peak_anon_mb"]
        if set(cfg.ingest_parts) - {"million"}:
            init_ray(num_cpus=max(os.cpu_count() or 1, 4))
            result["pack"] = pack_photos(cfg, photos, packed, write_photos(cfg, photos))
            copy_tree(packed, local)
        spec = train_spec(train_config(cfg, packed, work, 1, "packed_s3"))
        if "plain" in cfg.ingest_parts:
            ray.shutdown()  # the plain script runs on a machine without Ray (pack started it)
            runs |= bench_plain(cfg, packed, spec, log)
        if set(cfg.ingest_parts) & set(TRAIN_MODES):
            init_ray(num_cpus=max(os.cpu_count() or 1, 4))  # again, after the plain script
            runs |= bench_distcls(cfg, photos, packed, local, os.path.join(work, "runs"))
    finally:
        if not cfg.ingest_dir:
            shutil.rmtree(os.path.join(work, f"tiny-{cfg.ingest_million}"), ignore_errors=True)
        for sub in ("packed", "runs", "runs-1m"):
            shutil.rmtree(os.path.join(work, sub), ignore_errors=True)
    result |= {"runs": runs, **summarize(cfg, runs)}
    print("\n".join(run_table(runs)), flush=True)
    return result


def run_table(runs: dict) -> list[str]:
    lines = [f"{'ingest row':<32} {'images/s/worker':>15} {'data wait':>10}"]
    for key, row in runs.items():
        extra = f"  ({row['loader_workers']} loader workers)" if "loader_workers" in row else ""
        lines.append(f"{key:<32} {row['images_per_s_per_worker']:>15.1f} {row['data_wait_fraction']:>10.1%}{extra}")
    return lines


def table_rows(r: dict) -> list[tuple]:
    """The bench table's ingest lines (None values print as nan)."""
    nan = float("nan")

    def get(key: str) -> float:
        return nan if r.get(key) is None else r[key]

    rows = [
        ("ingest: packed S3 / cached, 1 worker (per worker)", get("ratio_packed_s3_vs_cached"), ">= 0.95"),
        ("ingest: data wait share, packed S3, 1 worker", get("data_wait_fraction_packed_s3"), "<= 0.05"),
        ("ingest: packed S3 / plain DataLoader script, 1 worker", get("ratio_packed_vs_plain_loader"), ">= 1.0"),
        ("ingest: packed S3 / per-object S3, 1 worker", get("ratio_packed_vs_per_object_s3"), None),
        ("ingest: packed S3 / plain DataLoader script, 2 workers", get("ratio_packed_vs_plain_loader_2w"), None),
        ("ingest: per-worker scaling at 2 workers, packed S3", get("per_worker_scaling_2w"), None),
        ("ingest: per-worker scaling at 2 workers, cached", get("per_worker_scaling_2w_cached"), None),
        ("ingest: pack S3 -> S3, images/s", r["pack"]["images_per_s"] if "pack" in r else nan, None),
    ]
    if "million" in r:
        n = r["million"]["pack"]["images"]
        rows += [
            (f"ingest: train driver peak RSS, MB ({n:,} images)", get("driver_peak_rss_mb_1m"), "<= 500"),
            (f"ingest: driver private (anon) RSS, MB ({n:,} images)", get("driver_peak_anon_mb_1m"), None),
            ("ingest: peak RSS of the driver's imports alone, MB", r["million"]["driver_import_rss_mb"], None),
            (f"ingest: seconds to the first step ({n:,} images)", get("first_step_s_1m"), "<= 60"),
        ]
    return rows

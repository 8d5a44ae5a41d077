"""`distcls pack`: an ImageFolder prefix or a labeled manifest -> Parquet shards of encoded images.

The driver lists the source once (paths, labels, sizes), splits it (per class, by a seeded hash of the path),
plans shards of about --shard-mb from the object sizes and writes the plan to OUT/_pack/. A Ray Data job over
shard ids then packs each shard in one task: read its objects with the bounded read (objects.read_object),
decode each one with the decoder training uses (images.decode_image: the same images refused, with the same
kinds), re-encode those over --max-side, and write OUT/<split>/shard-NNNNN.parquet (whole or not at all) and its
rejected rows, OUT/_pack/rejected-NNNNN.parquet, which marks the shard done. Last come OUT/_rejected.parquet
(path, label, error) and OUT/_dataset.json. Every listed object lands exactly once: in one shard or in
_rejected.parquet. A killed pack continues with --resume: finished shards are kept (checked by their footers).
Shards follow the Hugging Face `datasets` image convention (see packed.py), so they are also an HF dataset.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distcls import DistclsError, __version__, objects, storage
from distcls.datasets import MANIFEST_EXTENSIONS, READ_THREADS, class_index, read_manifest
from distcls.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, open_image, out_of_memory, sniff_format
from distcls.packed_format import (
    DATASET_JSON,
    FORMAT_VERSION,
    META_THREADS,
    PACK_FORMAT,
    SHARD_COMPRESSION,
    read_footer,
    shard_table,
)
from distcls.progress import Progress

if TYPE_CHECKING:
    from distcls.config.data import PackConfig

WORK = "_pack"  # plan, state and per-shard rejected parts while a pack runs; removed when it is complete
REJECTED = "_rejected.parquet"
ROW_GROUP_BYTES = 32 << 20  # Parquet row groups of about this much image data: readers stream by row group
PNG_LEVEL = 3  # zlib level of re-encoded PNGs: 2.4x faster than the default 6 for 4% more bytes (photo crops)
SIZE_SAMPLE = 64  # objects of a manifest whose sizes are looked up to plan its shards
OPTIONS = ("val_fraction", "seed", "shard_mb", "max_side", "max_object_mb")  # what a --resume must repeat


@dataclass
class Listing:
    paths: list[str]
    labels: list[int]
    sizes: list[int]
    class_names: list[str]
    fingerprint: str
    ignored: int = 0


def list_source(uri: str) -> Listing:
    """One listing of --data: a manifest (sizes sampled) or an ImageFolder prefix (sizes from the listing)."""
    if uri.lower().endswith(MANIFEST_EXTENSIONS):
        index = read_manifest(uri)
        seen: set[str] = set()
        for p in index.paths:
            if p in seen:
                raise DistclsError(f"pack: manifest {uri} lists {p} more than once; keep one row per object")
            seen.add(p)
        size = average_size(index.paths)
        return finish_listing(index.paths, index.labels, [size] * len(index), index.class_names, sized=False)
    fs, base = storage.get_filesystem(uri)
    scheme, root = storage.split_uri(uri)[0], base.rstrip("/")
    with storage.storage_errors(uri):
        if not fs.isdir(base):
            raise DistclsError(f"pack: --data {uri} is neither a folder/prefix nor a manifest ({', '.join(MANIFEST_EXTENSIONS)})")
        found = fs.find(base, detail=True)
    paths, names, sizes, ignored = [], [], [], 0
    for name, info in sorted(found.items()):
        rel = name[len(root) :].lstrip("/")
        if info.get("type") == "directory":
            continue
        if "/" not in rel or not name.lower().endswith(IMAGE_EXTENSIONS):
            ignored += 1
            continue
        paths.append(storage.to_uri(scheme, name))
        names.append(rel.split("/", 1)[0])
        sizes.append(int(info.get("size") or 0))
    if not paths:
        raise DistclsError(f"pack: no images found under {uri}; expected {root}/<class>/<image> or a manifest file")
    mapping = class_index(names)
    return finish_listing(paths, [mapping[n] for n in names], sizes, list(mapping), ignored=ignored)


def finish_listing(paths, labels, sizes, class_names, sized=True, ignored=0) -> Listing:
    """The listing with its fingerprint: a hash of (path, class, size) in path order (no sizes for a manifest)."""
    h = hashlib.sha256()
    for i in sorted(range(len(paths)), key=paths.__getitem__):
        h.update(f"{paths[i]}\t{class_names[labels[i]]}\t{sizes[i] if sized else ''}\n".encode())
    return Listing(paths, labels, sizes, class_names, h.hexdigest(), ignored)


def average_size(paths: list[str]) -> int:
    """Mean size of up to SIZE_SAMPLE objects spread over `paths` (a manifest's shards are planned from it)."""
    step = max(1, len(paths) // SIZE_SAMPLE)

    def size(path: str) -> int | None:
        try:
            fs, p = storage.get_filesystem(path)
            return int(fs.size(p))
        except Exception:  # a missing object is rejected when it is read; here it only leaves the sample
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        sizes = [s for s in pool.map(size, paths[::step][:SIZE_SAMPLE]) if s is not None]
    return int(sum(sizes) / len(sizes)) if sizes else 100 << 10


def path_key(seed: int, path: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{path}".encode()).digest()


def plan_shards(listing: Listing, val_fraction: float, seed: int, shard_bytes: int) -> tuple[list[int], list[dict]]:
    """(shard id of each object, shards). Per class, the objects with the lowest seeded path hashes go to val
    (round(fraction * n), at least 1 when n >= 2); each split is cut in hash order (classes mixed in every shard)
    into shards of at most shard_bytes (one object at least)."""
    order = sorted(range(len(listing.paths)), key=lambda i: path_key(seed, listing.paths[i]))
    split = ["train"] * len(order)
    if val_fraction > 0:
        by_class: dict[int, list[int]] = {}
        for i in order:
            by_class.setdefault(listing.labels[i], []).append(i)
        for rows in by_class.values():
            for i in rows[: 0 if len(rows) < 2 else max(1, round(val_fraction * len(rows)))]:
                split[i] = "val"
    shard_of, shards = [0] * len(order), []
    for name in ("train", "val"):
        used, rows = 0, 0
        for i in (i for i in order if split[i] == name):
            if not rows or used + listing.sizes[i] > shard_bytes:
                count = sum(s["split"] == name for s in shards)
                shards.append({"id": len(shards), "split": name, "name": f"{name}/shard-{count:05d}.parquet"})
                used, rows = 0, 0
            shard_of[i], used, rows = len(shards) - 1, used + listing.sizes[i], rows + 1
    return shard_of, shards


def start_or_resume(cfg: PackConfig, listing: Listing) -> dict:
    """Write the plan and state of a new pack, or check that --resume continues the same one."""
    import pyarrow as pa

    out, state_uri = cfg.out.rstrip("/"), storage.join_uri(cfg.out, WORK, "state.json")
    options = {k: getattr(cfg, k) for k in OPTIONS}
    done = storage.join_uri(out, DATASET_JSON)
    old = None
    if cfg.resume and nonempty(out) and (storage.exists(done) or storage.exists(state_uri)):
        old = json.loads(storage.read_text(done if storage.exists(done) else state_uri))
    elif cfg.resume and nonempty(out) and top_entries(out) != [WORK]:  # a pack killed before its state: start over
        raise DistclsError(f"pack: --out {out} holds no pack to resume (no {DATASET_JSON} nor {WORK}/state.json); empty it")
    if old is None:
        shard_of, shards = plan_shards(listing, cfg.val_fraction, cfg.seed, int(cfg.shard_mb * (1 << 20)))
        plan = pa.table({"path": listing.paths, "label": listing.labels, "shard": pa.array(shard_of, pa.int32())})
        write_table(storage.join_uri(out, WORK, "plan.parquet"), plan.sort_by("shard"), row_group_size=4096)
        created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        state = {"format": PACK_FORMAT, "source": cfg.data, "fingerprint": listing.fingerprint, "options": options}
        state |= {"class_names": listing.class_names, "shards": shards, "listed": len(listing.paths), "created_at": created}
        state["ignored"] = listing.ignored
        storage.write_text(state_uri, json.dumps(state, indent=1))
        return state
    if old.get("fingerprint") != listing.fingerprint:
        raise DistclsError(
            f"pack: --data {cfg.data} changed since the pack in {out} started ({old.get('listed')} objects then, "
            f"{len(listing.paths)} now, or other names/sizes); pack it into an empty --out"
        )
    was = old["options"]
    changed = [f"--{k.replace('_', '-')} {options[k]} (was {was.get(k)})" for k in OPTIONS if was.get(k) != options[k]]
    if changed:
        raise DistclsError(f"pack: --resume with other options than the pack in {out}: {', '.join(changed)}; repeat them")
    return old


def top_entries(uri: str) -> list[str]:
    fs, path = storage.get_filesystem(uri)
    with storage.storage_errors(uri):
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False))


def nonempty(uri: str) -> bool:
    fs, path = storage.get_filesystem(uri)
    with storage.storage_errors(uri):
        return fs.exists(path) and (not fs.isdir(path) or bool(fs.ls(path)))


def check_out(cfg: PackConfig) -> None:
    (ds, dpath), (os_, opath) = storage.split_uri(cfg.data), storage.split_uri(cfg.out)
    if ds == os_ and (opath == dpath or opath.startswith(dpath.rstrip("/") + "/")):
        raise DistclsError(f"pack: --out {cfg.out} is inside --data {cfg.data}; write the pack somewhere else")
    if not cfg.resume and nonempty(cfg.out):
        raise DistclsError(f"pack: --out {cfg.out} is not empty; pass --resume to continue the pack there, or use an empty --out")


# --- one shard (a Ray Data task) --------------------------------------------------------------------------


def encode_one(path: str, max_side: int | None, max_bytes: int) -> tuple[bytes | None, int, int, str]:
    """(stored bytes, width, height, "") for a good image; (None, 0, 0, "kind: message") for a bad object."""
    try:
        data = objects.read_object(path, max_bytes)
    except objects.ObjectReadError as exc:
        return None, 0, 0, exc.row
    except DistclsError as exc:
        return None, 0, 0, f"read_error: {exc}"
    except MemoryError:
        return None, 0, 0, "too_large: reading the object needs more memory than this worker could get"
    try:
        return (*encode_image(data, max_side), "")
    except ImageDecodeError as exc:
        return None, 0, 0, str(exc)
    except MemoryError:
        return None, 0, 0, str(out_of_memory())


def encode_image(data: bytes, max_side: int | None) -> tuple[bytes, int, int]:
    """Decode once (as training does); a long side over max_side is re-encoded: JPEG at quality 90, else PNG."""
    from PIL import Image

    stored = open_image(data).size if max_side is not None else (0, 0)
    if max(stored) <= (max_side or 0):
        img = decode_image(data)
        return data, img.size[0], img.size[1]
    scale = max_side / max(stored)  # a JPEG decodes at the smallest DCT scale that keeps its long side >= max_side
    img = decode_image(data, draft_size=(math.ceil(stored[0] * scale), math.ceil(stored[1] * scale)))
    scale = max_side / max(img.size)
    if scale < 1:
        size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    if sniff_format(data) == "JPEG":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue(), img.size[0], img.size[1]


def write_table(uri: str, table, **kw) -> int:
    """A whole Parquet file at once (local: temporary name + rename; S3: one PUT); returns its size."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    storage.write_bytes(uri, buf.getvalue())
    return buf.tell()


def pack_shard(row: dict, out: str, class_names: list[str], max_side: int | None, max_bytes: int) -> dict:
    """Pack shard `row["shard"]`: its Parquet file (good images) then its rejected part (the done marker)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sid = int(row["shard"])
    fs, plan_path = storage.get_pyarrow_filesystem(storage.join_uri(out, WORK, "plan.parquet"))
    plan = pq.read_table(plan_path, filesystem=fs, filters=[("shard", "=", sid)])
    paths, labels = plan.column("path").to_pylist(), plan.column("label").to_pylist()
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(paths)))) as pool:
        results = list(pool.map(lambda p: encode_one(p, max_side, max_bytes), paths))
    good = [i for i, r in enumerate(results) if not r[3]]
    bad = [i for i, r in enumerate(results) if r[3]]
    size = 0
    if good:
        blobs = [results[i][0] for i in good]
        rows = ([paths[i] for i in good], [labels[i] for i in good], [results[i][1] for i in good], [results[i][2] for i in good])
        table = shard_table(blobs, *rows, class_names)
        per_group = max(1, int(ROW_GROUP_BYTES * len(blobs) / max(1, sum(map(len, blobs)))))
        size = write_table(storage.join_uri(out, row["name"]), table, row_group_size=per_group, compression=SHARD_COMPRESSION)
    counts = Counter(labels[i] for i in good)
    info = {"rows": len(good), "bytes": size, "counts": [counts.get(c, 0) for c in range(len(class_names))]}
    rejected = pa.table(
        {
            "path": pa.array([paths[i] for i in bad], pa.string()),
            "label": pa.array([class_names[labels[i]] for i in bad], pa.string()),
            "error": pa.array([results[i][3] for i in bad], pa.string()),
        }
    ).replace_schema_metadata({b"distcls_shard": json.dumps(info).encode()})
    write_table(part_uri(out, sid), rejected)
    return {"shard": sid, "rows": len(good), "rejected": len(bad), "bytes": size}


def part_uri(out: str, sid: int) -> str:
    return storage.join_uri(out, WORK, f"rejected-{sid:05d}.parquet")


# --- the job ----------------------------------------------------------------------------------------------


def finished_shard(out: str, shard: dict) -> dict | None:
    """A shard's record if it is done: its rejected part reads, and its Parquet footer has the rows it says."""
    try:
        info = json.loads(read_footer(part_uri(out, shard["id"])).schema.metadata[b"distcls_shard"])
        if info["rows"] and read_footer(storage.join_uri(out, shard["name"])).rows != info["rows"]:
            return None
    except (DistclsError, KeyError, TypeError, ValueError):
        return None
    return info


def run_shards(cfg: PackConfig, state: dict, todo: list[dict], progress: bool) -> int:
    """Pack `todo` in a Ray Data job; returns the images processed. Prints shards done and images/s."""
    import ray.data

    from distcls.runtime import init_ray

    if not todo:
        return 0
    init_ray()
    fault = os.environ.get("DISTCLS_TEST_PACK_FAULT", "")  # test hook: "N:kill" / "N:raise" after N shards
    kwargs = {"out": cfg.out.rstrip("/"), "class_names": state["class_names"], "max_side": cfg.max_side}
    kwargs["max_bytes"] = objects.max_object_bytes(cfg.max_object_mb)
    items = [{"shard": s["id"], "name": s["name"]} for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(pack_shard, fn_kwargs=kwargs, num_cpus=1, **({"concurrency": cfg.concurrency} if cfg.concurrency else {}))
    images, total = 0, len(state["shards"])
    meter = Progress("pack", total, "shards", done=total - len(todo), enabled=progress)
    for n, row in enumerate(ds.iter_rows(), start=1):
        images += row["rows"] + row["rejected"]
        meter.add(1)
        if fault and n == int(fault.split(":")[0]):
            if fault.endswith(":kill"):
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected pack failure after {n} shards (DISTCLS_TEST_PACK_FAULT)")
    meter.close()
    if progress:
        print(f"pack: {images} images in {len(todo)} shards this run", flush=True)
    return images


def finish(cfg: PackConfig, state: dict, infos: dict[int, dict]) -> dict:
    """Merge the rejected parts into _rejected.parquet, write _dataset.json (last), drop OUT/_pack/."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, names = cfg.out.rstrip("/"), state["class_names"]
    parts = [pq.read_table(io.BytesIO(storage.read_bytes(part_uri(out, s["id"])))) for s in state["shards"]]
    rejected = pa.concat_tables([p.replace_schema_metadata(None) for p in parts])
    write_table(storage.join_uri(out, REJECTED), rejected)
    splits: dict[str, dict] = {}
    for s in state["shards"]:
        info = infos[s["id"]]
        split = splits.setdefault(s["split"], {"rows": 0, "bytes": 0, "counts": Counter(), "shards": []})
        split["counts"].update(dict(zip(names, info["counts"])))
        if info["rows"]:
            split["shards"].append({"name": s["name"], "rows": info["rows"], "bytes": info["bytes"]})
            split["rows"], split["bytes"] = split["rows"] + info["rows"], split["bytes"] + info["bytes"]
    for split in splits.values():
        split["counts"] = {n: split["counts"].get(n, 0) for n in names}
    by_kind = Counter(e.split(":", 1)[0] for e in rejected.column("error").to_pylist())
    meta = {k: state[k] for k in ("source", "fingerprint", "class_names", "listed", "ignored", "created_at", "options")}
    meta = {"format": PACK_FORMAT, "format_version": FORMAT_VERSION, "distcls_version": __version__, **meta}
    meta |= {"splits": splits, "rejected": {"file": REJECTED, "rows": rejected.num_rows, "by_kind": dict(by_kind)}}
    meta["finished_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    storage.write_text(storage.join_uri(out, DATASET_JSON), json.dumps(meta, indent=1))
    storage.remove(storage.join_uri(out, WORK), recursive=True)
    remove_leftovers(out)
    return meta


def remove_leftovers(out: str) -> None:
    """Temporary files of local writes that a killed pack left beside its shards (S3 PUTs leave none)."""
    scheme, path = storage.split_uri(out)
    for folder, _dirs, files in os.walk(path) if scheme == "file" else ():
        for name in files:
            if ".tmp-" in name:
                os.remove(os.path.join(folder, name))


def run_pack(cfg: PackConfig, progress: bool = True) -> dict:
    """`distcls pack`: returns a summary (see summary_line); the pack is in cfg.out."""
    started = time.monotonic()
    check_out(cfg)
    listing = list_source(cfg.data)
    state = start_or_resume(cfg, listing)
    out = cfg.out.rstrip("/")
    if "splits" in state:  # --resume of a pack that is complete: nothing to do
        return summary(cfg, state, kept=sum(len(s["shards"]) for s in state["splits"].values()), images=0, started=started)
    with ThreadPoolExecutor(max_workers=META_THREADS) as pool:
        found = dict(zip([s["id"] for s in state["shards"]], pool.map(lambda s: finished_shard(out, s), state["shards"])))
    todo = [s for s in state["shards"] if found[s["id"]] is None]
    if progress and cfg.resume:
        print(f"pack: resuming {out}: {len(state['shards']) - len(todo)} of {len(state['shards'])} shards already done")
    images = run_shards(cfg, state, todo, progress)
    infos = {s["id"]: found[s["id"]] or finished_shard(out, s) for s in state["shards"]}
    missing = [s["name"] for s in state["shards"] if infos[s["id"]] is None]
    if missing:
        raise DistclsError(f"pack: shard(s) {', '.join(missing[:3])} of {out} were not written; run again with --resume")
    return summary(cfg, finish(cfg, state, infos), kept=len(state["shards"]) - len(todo), images=images, started=started)


def summary(cfg: PackConfig, meta: dict, kept: int, images: int, started: float) -> dict:
    seconds = time.monotonic() - started
    splits = {k: {"rows": v["rows"], "shards": len(v["shards"]), "bytes": v["bytes"]} for k, v in meta["splits"].items()}
    return {
        "out": cfg.out,
        "source": meta["source"],
        "classes": len(meta["class_names"]),
        "splits": splits,
        "images": sum(v["rows"] for v in splits.values()),
        "rejected": meta["rejected"]["rows"],
        "rejected_by_kind": meta["rejected"]["by_kind"],
        "kept_shards": kept,
        "seconds": seconds,
        "images_per_s": images / seconds if images else 0.0,
    }


def summary_line(s: dict) -> str:
    """One line for the CLI."""
    parts = ", ".join(f"{k} {v['rows']} in {v['shards']} shards ({v['bytes'] / 2**20:.1f} MB)" for k, v in s["splits"].items())
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(s["rejected_by_kind"].items())) or "none"
    kept = f"; kept {s['kept_shards']} finished shards" if s["kept_shards"] else ""
    return (
        f"packed {s['images']} images of {s['classes']} classes ({parts}); rejected {s['rejected']} ({kinds}){kept}; "
        f"{s['seconds']:.1f}s, {s['images_per_s']:.1f} images/s -> {s['out']}"
    )

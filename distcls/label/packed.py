"""`distcls label` on packed data: every row of every split of a `distcls pack` (found by its `_dataset.json`), or
of one Parquet or WebDataset shard file, gets its output row. A row's `path` (its sample id: the original
object's path) is the output's path and the resume key; its bytes come from the shard (Ray Data reads the
shards), never from the original object, so no path is confined: nothing outside the set is read.

The plan is the set itself: OUTPUT/_plan/_plan.json names it with one lister of kind `packed`, whose done marker
holds the row count, so `--status`, a rerun (the rows not yet in the output) and _SUCCESS.json work as they do
for a listed prefix.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from distcls import storage
from distcls.config import LabelConfig
from distcls.label.manifest import Lister, Source
from distcls.label.plan import StoredPlan, now
from distcls.packed import PackedSet, open_packed
from distcls.packed_format import DATASET_JSON
from distcls.splits import PackedSplit
from distcls.transforms import PreprocessSpec


def packed_input(cfg: LabelConfig) -> PackedSet | None:
    """--input as packed data: a folder with _dataset.json, or one .parquet / .tar shard; else None (a prefix to
    list). Checked with one HEAD request: a prefix of a million images is never listed here."""
    if cfg.manifest or not cfg.input:
        return None
    uri = cfg.input.rstrip("/")
    if not (uri.lower().endswith((".parquet", ".tar")) or storage.exists(storage.join_uri(uri, DATASET_JSON))):
        return None
    return open_packed(uri)


def packed_plan(cfg: LabelConfig, packed: PackedSet) -> tuple[StoredPlan, str]:
    """OUTPUT/_plan for a packed input, written anew each run (the set's metadata is the plan); and a line on it."""
    lister = Lister("packed", (packed.source,))
    plan = StoredPlan.start(cfg.output, Source(input=cfg.input.rstrip("/")), [lister])
    rows = sum(packed.num_rows(split) for split in packed.splits)
    marker = {"lister": asdict(lister), "keys": rows, "shards": 0, "finished_at": now()}
    storage.write_text(storage.join_uri(plan.uri, f"{lister.id}.done.json"), json.dumps(marker))
    return StoredPlan.read(cfg.output), f"the packed set {packed.source} ({', '.join(packed.splits)})"


def packed_sample(packed: PackedSet, spec: PreprocessSpec, max_bytes: int) -> np.ndarray | None:
    """A few decoded images of the set's first rows, for the runtime's compile check."""
    return PackedSplit(packed, packed.splits[0]).sample_images(spec, 64, max_bytes)


def packed_rows(packed: PackedSet, spec: PreprocessSpec, done, max_bytes: int):
    """Every split's rows decoded (Ray Data tasks), less those whose path the output already has (`done`)."""
    import ray

    datasets = [packed.dataset(split, spec, max_bytes=max_bytes) for split in packed.splits]
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    if not len(done):
        return ds
    return ds.map_batches(not_done, fn_kwargs={"done": ray.put(done.combine_chunks())}, batch_format="numpy")


def not_done(batch: dict[str, np.ndarray], done) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: the rows whose path is not in `done` (an Arrow array, or its object ref)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    done = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    keep = np.asarray(pc.invert(pc.is_in(pa.array([str(p) for p in batch["path"]], pa.string()), value_set=done)))
    return {k: np.asarray(v)[keep] for k, v in batch.items()}

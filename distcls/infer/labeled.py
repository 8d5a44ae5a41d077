"""A model over labeled data (a per-object index or a split of packed data): logits, labels and paths of every
image that decoded, with the inference engine on Ray Data (what evaluate, calibrate and find-label-issues' folds
run).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distcls.checkpoint import read_meta
from distcls.datasets import ErrorTally, LabeledIndex
from distcls.infer.batch import predict_dataset
from distcls.infer.engine import prepare_runtime
from distcls.runtime import init_ray
from distcls.splits import LabeledSplit, as_split
from distcls.transforms import PreprocessSpec


@dataclass
class Predictions:
    """A model's logits over labeled data (undecodable images counted in `skipped`, not returned)."""

    logits: np.ndarray  # (N, C) float32
    labels: np.ndarray  # (N,) int64
    paths: list[str]
    skipped: ErrorTally
    runtime: str
    note: str


def predict_labeled(
    uri: str,
    data: LabeledSplit | LabeledIndex,
    batch_size: int = 64,
    concurrency: int = 1,
    num_gpus: float = 0,
    runtime: str = "auto",
    announce: str | None = None,
    max_bytes: int | None = None,
) -> Predictions:
    """Run a verified model over labeled data with the inference engine (Ray Data actors); images over
    `max_bytes` (default: objects.DEFAULT_MAX_OBJECT_BYTES) are too_large error rows."""
    meta = read_meta(uri)
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    data = as_split(data)
    runtime, note = prepare_runtime(uri, runtime, num_gpus > 0, data.sample_images(spec, max_bytes=max_bytes))
    if announce:
        print(f"{announce}: runtime {runtime} ({note})", flush=True)
    init_ray()
    ds = predict_dataset(data.dataset(spec, max_bytes=max_bytes), uri, batch_size, concurrency, num_gpus, runtime=runtime)
    tally, logits, labels, paths = ErrorTally(), [], [], []
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        batch = tally.drop_errors(batch)
        if len(batch["label"]):
            logits.append(np.asarray(batch["logits"], dtype=np.float32))
            labels.append(np.asarray(batch["label"], dtype=np.int64))
            paths += [str(p) for p in batch["path"]]
    k = len(meta["class_names"])
    if not logits:
        return Predictions(np.zeros((0, k), np.float32), np.zeros(0, np.int64), [], tally, runtime, note)
    return Predictions(np.concatenate(logits), np.concatenate(labels), paths, tally, runtime, note)

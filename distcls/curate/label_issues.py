"""`distcls find-label-issues`: likely mislabeled images in a training set, with cleanlab.

1. The labeled data is cut into K stratified folds (seeded). For each fold a model is fine-tuned on the
   other K-1 with `distcls train` (the same recipe and flags; the held-out fold is its validation split,
   so each fold's best checkpoint is also calibrated on it) and predicts the held-out fold: every image gets
   probabilities from a model that never trained on it (out-of-sample, as confident learning requires).
   Folds run as concurrent Ray Train runs, `--max-concurrent` at a time (default: as many as the
   cluster's CPUs allow for `--num-workers` workers each).
2. cleanlab's `find_label_issues` (Northcutt et al., confident learning) flags images whose given label
   disagrees with the out-of-sample probabilities beyond each class's own threshold, ranked by
   self-confidence (the probability of the given label: lowest first).

Packed data (distcls.packed): its train split; the fold of an image is a hash of its sample id and --seed, so each
fold's runs read the shards and keep their rows by that hash in the pipeline (no manifests, no copies). cleanlab
needs every label and probability on the driver, so this command lists the split's ids and labels there (the one
command that does: its output is one row per image).

Output in --out: label_issues.parquet (every image: path, given_label, suggested_label, quality,
is_issue, rank among issues), pred_probs.parquet (the out-of-sample probabilities), summary.json, and
contact_sheet.png (the top issues with given -> suggested label), plus the fold runs under folds/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from distcls import DistclsError, storage
from distcls.config import FindLabelIssuesConfig, TrainConfig, from_config
from distcls.datasets import LabeledIndex, load_labeled_index
from distcls.splits import PackedSplit, open_packed_split

SHEET_MAX = 60


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) per image: each class's images shuffled (seeded) and dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold[rows] = np.arange(len(rows)) % k
    return fold


def write_manifest(uri: str, index: LabeledIndex, rows: np.ndarray) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"path": [index.paths[i] for i in rows], "label": [index.class_names[index.labels[i]] for i in rows]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def fold_config(cfg: FindLabelIssuesConfig, train_manifest: str, val_manifest: str | None, k: int) -> TrainConfig:
    """Fold k's `distcls train` run: the training fields of `cfg` (model, weights, epochs, image_size, batch_size,
    num_workers, lr, seed), on the other folds, scored on fold k."""
    return from_config(
        TrainConfig,
        cfg,
        data=train_manifest,
        val_data=val_manifest,
        storage=storage.join_uri(cfg.out, "folds"),
        name=f"fold-{k}",
        keep=1,
    )


def run_fold(cfg: FindLabelIssuesConfig, index: LabeledIndex, fold: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Train on the other folds, predict fold k: (rows of fold k that decoded, calibrated probabilities)."""
    from distcls.train.trainer import run_training

    manifests = storage.join_uri(cfg.out, "folds", "manifests")
    held = np.flatnonzero(fold == k)
    train_m = write_manifest(storage.join_uri(manifests, f"train-{k}.parquet"), index, np.flatnonzero(fold != k))
    val_m = write_manifest(storage.join_uri(manifests, f"heldout-{k}.parquet"), index, held)
    result = run_training(fold_config(cfg, train_m, val_m, k))
    return predict_fold(cfg, result["checkpoint"], index.subset(held), index.paths, held, k)


def run_packed_fold(cfg: FindLabelIssuesConfig, data: PackedSplit, index: LabeledIndex, fold: np.ndarray, k: int):
    """run_fold on packed data: the runs read the shards, keeping the rows of the other folds (or of fold k)."""
    from distcls.train.trainer import run_training

    held = np.flatnonzero(fold == k)
    rest, heldout = (FoldSplit(data, cfg, k, h, index.subset(np.flatnonzero((fold == k) == h))) for h in (False, True))
    result = run_training(fold_config(cfg, cfg.data, None, k), splits=(rest, heldout))
    return predict_fold(cfg, result["checkpoint"], heldout, index.paths, held, k)


def predict_fold(cfg: FindLabelIssuesConfig, checkpoint: str, held_data, paths: list[str], held: np.ndarray, k: int):
    """(rows of fold k that decoded, their calibrated probabilities) from the fold's best checkpoint."""
    from distcls.checkpoint import read_meta
    from distcls.infer.labeled import predict_labeled
    from distcls.scores import Calibration, probabilities

    p = predict_labeled(checkpoint, held_data)
    calibration = Calibration.of(read_meta(checkpoint))
    row_of = {paths[i]: i for i in held}
    rows = np.array([row_of[path] for path in p.paths], dtype=np.int64)
    print(f"fold {k + 1}/{cfg.folds}: {len(rows)} held-out images predicted by {checkpoint}", flush=True)
    return rows, probabilities(p.logits, calibration.temperature)


def hash_folds(ids: list[str], k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of each sample id: a seeded hash, so a Ray Data task can tell it from the id alone."""
    key = seed.to_bytes(8, "little", signed=True)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, key=key).digest(), "little") % k for i in ids),
        dtype=np.int64,
        count=len(ids),
    )


def keep_fold(batch: dict, folds: int, k: int, seed: int, held: bool) -> dict:
    """Ray Data map_batches function: the rows of fold k (held) or of every other fold."""
    keep = (hash_folds([str(i) for i in batch["path"]], folds, seed) == k) == held
    return {name: np.asarray(v)[keep] for name, v in batch.items()}


class FoldSplit:
    """A packed split restricted to fold k (held) or to the other folds, with its counts from `index` (the split's
    ids and labels, which find-label-issues holds anyway)."""

    is_packed = True

    def __init__(self, data: PackedSplit, cfg: FindLabelIssuesConfig, k: int, held: bool, index: LabeledIndex):
        self.data, self.folds, self.k, self.seed, self.held, self.index = data, cfg.folds, k, cfg.seed, held, index
        self.class_names, self.ignored = data.class_names, []
        self.split = f"{data.split}, {'fold' if held else 'all but fold'} {k + 1} of {cfg.folds}"
        self.source = f"{data.packed.source} ({self.split})"

    def __len__(self) -> int:
        return len(self.index)

    def counts(self) -> dict[str, int]:
        return self.index.counts()

    def dataset(self, spec, train: bool = False, shuffle_seed: int | None = None, max_bytes: int | None = None):
        kw = {"folds": self.folds, "k": self.k, "seed": self.seed, "held": self.held}
        return self.data.dataset(spec, train, shuffle_seed, max_bytes).map_batches(keep_fold, fn_kwargs=kw, batch_size=None)

    def sample_bytes(self, n: int = 16, max_bytes: int | None = None) -> list[bytes]:
        return self.data.sample_bytes(n, max_bytes)

    def sample_images(self, spec, n: int = 16, max_bytes: int | None = None):
        return self.data.sample_images(spec, n, max_bytes)


def default_concurrency(cfg: FindLabelIssuesConfig) -> int:
    import ray

    from distcls.runtime import init_ray

    init_ray()
    cpus = ray.cluster_resources().get("CPU", os.cpu_count() or 1)
    per_run = cfg.num_workers + 2  # the workers plus room for Ray Data's decode tasks
    return max(1, min(cfg.folds, int(cpus // per_run)))


def out_of_sample_probs(
    cfg: FindLabelIssuesConfig, index: LabeledIndex, packed: PackedSplit | None
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, C) with NaN rows for undecodable images, fold per image)."""
    if packed is None:
        fold = stratified_folds(np.asarray(index.labels), cfg.folds, cfg.seed)
        one = lambda k: run_fold(cfg, index, fold, k)  # noqa: E731
    else:
        fold = hash_folds(index.paths, cfg.folds, cfg.seed)
        check_hash_folds(cfg, index, fold)
        one = lambda k: run_packed_fold(cfg, packed, index, fold, k)  # noqa: E731
    concurrent = cfg.max_concurrent or default_concurrency(cfg)
    print(f"find-label-issues: {len(index)} images, {cfg.folds} folds, {concurrent} at a time", flush=True)
    probs = np.full((len(index), len(index.class_names)), np.nan, dtype=np.float64)
    if concurrent == 1:  # in this thread: Ray Train's fit() sets up signal handling where it can
        results = [one(k) for k in range(cfg.folds)]
    else:
        with ThreadPoolExecutor(max_workers=concurrent) as pool:
            results = list(pool.map(one, range(cfg.folds)))
    for rows, p in results:
        probs[rows] = p
    return probs, fold


def load_labeled(uri: str) -> tuple[LabeledIndex, PackedSplit | None]:
    """Every image's id and label: an ImageFolder prefix or a manifest as listed, packed data's train split."""
    packed = open_packed_split(uri, ("train",))
    if packed is None:
        return load_labeled_index(uri), None
    ids, labels = packed.packed.paths_and_labels(packed.split)
    known = [i for i, y in enumerate(labels) if 0 <= y < len(packed.class_names)]  # rows without a class are not judged
    return LabeledIndex([ids[i] for i in known], [labels[i] for i in known], packed.class_names, packed.source), packed


def check_hash_folds(cfg: FindLabelIssuesConfig, index: LabeledIndex, fold: np.ndarray) -> None:
    """Every fold's training part (the other folds) must hold every class."""
    labels = np.asarray(index.labels)
    for k in range(cfg.folds):
        missing = [n for c, n in enumerate(index.class_names) if not ((labels == c) & (fold != k)).any()]
        if missing:
            raise DistclsError(
                f"find-label-issues: classes {missing} of {cfg.data} all fall in fold {k + 1} (folds by a hash of the "
                "sample id); add images of them or try another --seed"
            )


def rank_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is_issue bool, quality) from cleanlab: confident learning's issues and self-confidence scores."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    is_issue = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    return np.asarray(is_issue, dtype=bool), np.asarray(quality, dtype=np.float64)


def run_find_label_issues(cfg: FindLabelIssuesConfig) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    index, packed = load_labeled(cfg.data)
    counts = np.bincount(np.asarray(index.labels), minlength=len(index.class_names))
    if counts.min() < cfg.folds:
        small = [n for n, c in zip(index.class_names, counts) if c < cfg.folds]
        raise DistclsError(
            f"find-label-issues: classes {small} have fewer images than --folds {cfg.folds}; every fold needs each "
            "class in its training part: lower --folds or add images"
        )
    probs, fold = out_of_sample_probs(cfg, index, packed)
    ok = ~np.isnan(probs).any(axis=1)
    labels = np.asarray(index.labels)
    is_issue = np.zeros(len(index), dtype=bool)
    quality = np.full(len(index), np.nan)
    is_issue[ok], quality[ok] = rank_issues(labels[ok], probs[ok])
    suggested = np.where(ok, np.nan_to_num(probs).argmax(axis=1), -1)
    rank = np.zeros(len(index), dtype=np.int32)
    issue_rows = np.flatnonzero(is_issue)
    issue_rows = issue_rows[np.argsort(quality[issue_rows], kind="stable")]
    rank[issue_rows] = np.arange(1, len(issue_rows) + 1)
    names = index.class_names
    table = pa.table(
        {
            "path": index.paths,
            "given_label": [names[i] for i in labels],
            "suggested_label": [names[i] if i >= 0 else None for i in suggested],
            "quality": quality,
            "is_issue": is_issue,
            "rank": rank,
            "fold": fold,
        }
    )
    pred = pa.table({"path": index.paths, **{f"p_{n}": probs[:, c] for c, n in enumerate(names)}})
    for name, t in (("label_issues.parquet", table), ("pred_probs.parquet", pred)):
        buf = io.BytesIO()
        pq.write_table(t, buf)
        storage.write_bytes(storage.join_uri(cfg.out, name), buf.getvalue())
    top = [
        {
            "path": index.paths[i],
            "label": f"{names[labels[i]]}->{names[suggested[i]]}",
            "score": float(quality[i]),
            "rank": int(rank[i]),
            "quality": float(quality[i]),
        }
        for i in issue_rows[:SHEET_MAX]
    ]
    storage.write_bytes(storage.join_uri(cfg.out, "contact_sheet.png"), issues_sheet(top))
    summary = {
        "data": cfg.data,
        "images": len(index),
        "predicted": int(ok.sum()),
        "folds": cfg.folds,
        "issues": int(is_issue.sum()),
        "out_of_sample_accuracy": float((suggested[ok] == labels[ok]).mean()) if ok.any() else None,
        "seconds": round(time.perf_counter() - started, 1),
        "settings": dataclasses.asdict(cfg),
    }
    storage.write_text(storage.join_uri(cfg.out, "summary.json"), json.dumps(summary, indent=2, default=str))
    return summary


def issues_sheet(rows: list[dict]) -> bytes:
    from distcls.plots import contact_sheet, thumbnails

    thumbs = thumbnails([r["path"] for r in rows])
    return contact_sheet(rows, thumbs, "quality")

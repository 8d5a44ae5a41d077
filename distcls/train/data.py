"""A training run's data: its two splits, what the recipe reads from them, the Ray Datasets the workers read and
how Ray Train deals them out.

- Splits (`load_splits`): --data's train split; validation from --val-data, else a stratified split of
  per-object data, else packed data's own `val` split (`distcls pack --val-fraction`).
- Training dataset (`training_datasets`): per-object data is shuffled on the driver (paths only) and
  --sampler balanced draws its epoch there (`balance`). Packed data is shuffled in the pipeline: the shard order
  per epoch (Ray Data's FileShuffleConfig, seeded by (seed, epoch)), then the rows of each block of a shard
  (`shuffle_rows`, seeded by (seed, epoch, the block's rows)); --sampler balanced repeats or drops each row there
  with seeded stochastic rounding, so that every class has an equal expected share of an epoch. The workers add
  a bounded local shuffle buffer.
- Validation is a dataset too. `EveryRowConfig` splits both over the workers with equal=False (Ray Train's
  default, equal=True, drops up to world-1 rows): every image is read once per epoch by one worker, and the
  shards may differ by a few rows (the workers keep in step: see worker.lockstep).
"""

from __future__ import annotations

import zlib

import numpy as np
from ray.train import DataConfig

from distcls import DistclsError
from distcls.config import TrainConfig
from distcls.datasets import DECODE_CPUS, ROWS_PER_BLOCK, LabeledIndex, stratified_split
from distcls.splits import HELD_OUT_SPLITS, LabeledSplit, ObjectSplit, open_labeled
from distcls.train.position import POSITION_FILE, drop_consumed, execution_index, read_position
from distcls.transforms import PreprocessSpec

CONSUMPTION_ENV = "DISTCLS_TEST_CONSUMPTION_LOG"  # test hook: a folder; each worker logs the sample ids it trained on


def load_splits(cfg: TrainConfig) -> tuple[LabeledSplit, LabeledSplit]:
    """(train, validation) of a run; packed data without a `val` split and without --val-data is refused."""
    names = list(cfg.class_names) or None
    train = open_labeled(cfg.data, data_names=names)
    if cfg.val_data:
        return train, open_labeled(cfg.val_data, train.class_names, HELD_OUT_SPLITS, data_names=names)
    if train.is_packed:
        val = train.other("val")
        if val is None:
            raise DistclsError(
                f"train: packed data {cfg.data} has no val split ({', '.join(train.packed.splits)}); pack it with "
                "--val-fraction (e.g. distcls pack --val-fraction 0.1) or pass --val-data"
            )
        return train, val
    fit, held = stratified_split(train.index, cfg.val_fraction, cfg.seed)
    return ObjectSplit(fit), ObjectSplit(held)


def sample_native_size(train: LabeledSplit, n: int = 16, max_bytes: int | None = None) -> int | None:
    """Median shorter side of up to `n` training images (headers only), or None when none opens. Packed data:
    the first rows of its first shard."""
    from distcls.images import ImageDecodeError, open_image

    sides = []
    for blob in train.sample_bytes(n, max_bytes):
        try:
            sides.append(min(open_image(blob).size))
        except (ImageDecodeError, OSError):
            continue
    return int(np.median(sides)) if sides else None


def balance(index: LabeledIndex, seed: int) -> LabeledIndex:
    """--sampler balanced on per-object data: an epoch of the same size in which every present class has an
    equal share. Each class's share cycles through its images in a seeded order (a rare class repeats each of
    its images evenly; a common one contributes that many distinct images, not repeats). The draw is made
    once on the driver, so it streams and shards like any index."""
    labels = np.asarray(index.labels)
    present = np.flatnonzero(np.bincount(labels, minlength=len(index.class_names)))
    rng = np.random.default_rng(seed)
    shares = np.full(len(present), len(labels) // len(present))
    shares[rng.permutation(len(present))[: len(labels) - shares.sum()]] += 1
    rows = []
    for c, share in zip(present, shares):
        members = rng.permutation(np.flatnonzero(labels == c))
        rows.append(np.resize(members, share))  # np.resize repeats the sequence to the share's length
    return index.subset(np.sort(np.concatenate(rows)))


def balanced_copies(counts: list[int]) -> np.ndarray:
    """Expected copies of a row of each class in a balanced epoch of the same size: N / (present classes * n_c)."""
    n = np.asarray(counts, dtype=np.float64)
    present = int((n > 0).sum())
    return np.where(n > 0, n.sum() / max(1, present) / np.maximum(n, 1), 0.0)


def shuffle_rows(batch: dict[str, np.ndarray], seed: int, copies: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Ray Data map_batches function over one block: its rows permuted, seeded by (seed, epoch, the block's first
    and last sample ids); with `copies` (--sampler balanced), each row of class c first repeated floor(copies[c])
    times plus once more with probability frac(copies[c]). Rows without a class (error rows) stay once."""
    ids = batch["path"]
    if not len(ids):
        return batch
    rng = np.random.default_rng([seed, execution_index(), zlib.crc32(f"{ids[0]}\n{ids[-1]}".encode())])
    rows = np.arange(len(ids))
    if copies is not None:
        labels = np.asarray(batch["label"])
        known = (labels >= 0) & (labels < len(copies))
        expected = np.where(known, copies[np.clip(labels, 0, len(copies) - 1)], 1.0)
        whole = np.floor(expected)
        rows = np.repeat(rows, (whole + (rng.random(len(ids)) < expected - whole)).astype(np.int64))
    rows = rng.permutation(rows)
    return {k: np.asarray(v)[rows] for k, v in batch.items()}


def dealt(ds, n: int, workers: int):
    """`ds` in blocks small enough that each of the `workers` is dealt several (equal=False deals whole blocks):
    the decoders' blocks of ROWS_PER_BLOCK rows as they are, smaller ones for a small split (n rows), which may
    otherwise be read as one block."""
    rows = int(max(1, -(-n // (4 * workers))))
    if rows >= ROWS_PER_BLOCK:
        return ds
    return ds.repartition(target_num_rows_per_block=rows)  # streaming: splits and joins blocks as they pass


def training_datasets(cfg: TrainConfig, spec: PreprocessSpec, train: LabeledSplit, val: LabeledSplit, max_bytes: int) -> dict:
    """{"train": ..., "val": ...} for the TorchTrainer (no "val" when the validation split is empty)."""
    datasets = {"train": train_dataset(cfg, spec, train, max_bytes)}
    if len(val):
        datasets["val"] = dealt(val.dataset(spec, max_bytes=max_bytes), len(val), cfg.max_workers)
    return datasets


def train_dataset(cfg: TrainConfig, spec: PreprocessSpec, train: LabeledSplit, max_bytes: int, skip: tuple | None = None):
    """The training dataset. Each epoch's rows come in an order seeded by (seed, epoch): per-object data's paths
    are shuffled block by block before they are read (--ordered-ingest), packed data's shard order and rows as
    described above. `skip`: (epoch, consumed hashes) of a step checkpoint: that epoch drops the samples already
    trained on (per-object data before reading them; see distcls.train.position)."""
    skipping = () if skip is None or cfg.cache_data else ((drop_consumed, {"epoch": skip[0], "consumed": skip[1]}),)
    if not train.is_packed:
        source = ObjectSplit(balance(train.index, cfg.seed)) if cfg.sampler == "balanced" else train
        stages = (((shuffle_rows, {"seed": cfg.seed}),) if cfg.ordered_ingest else ()) + skipping
        ds = source.dataset(spec, train=cfg.random_crops, shuffle_seed=cfg.seed, max_bytes=max_bytes, path_stages=stages)
    else:
        copies = balanced_copies(list(train.counts().values())) if cfg.sampler == "balanced" else None
        ds = train.dataset(spec, train=cfg.random_crops, shuffle_seed=cfg.seed, max_bytes=max_bytes).map_batches(
            shuffle_rows, fn_kwargs={"seed": cfg.seed, "copies": copies}, batch_size=None, num_cpus=DECODE_CPUS
        )
        for fn, kwargs in skipping:
            ds = ds.map_batches(fn, fn_kwargs=kwargs, batch_size=None, num_cpus=DECODE_CPUS)
    ds = dealt(ds, len(train), cfg.max_workers)
    if cfg.cache_data:
        ds = ds.materialize()  # decoded once into the object store; epochs read from memory
        if skip is not None:
            ds = ds.map_batches(drop_consumed, fn_kwargs={"epoch": skip[0], "consumed": skip[1]}, batch_size=None)
    return ds


class EveryRowConfig(DataConfig):
    """Ray Train's DataConfig with every dataset split by streaming_split(equal=False): each row goes to exactly
    one worker (equal=True truncates up to world-1 rows to make the shards equal). The training dataset's
    execution index starts at the epoch the run continues from, so that a restored run reads epoch e's shards
    in the order an uninterrupted run did. After a step checkpoint, the training dataset is built again
    (`rebuild(skip)`) without the samples the interrupted epoch has consumed; configure runs at every (re)start
    of the worker group, with however many workers it has."""

    def __init__(self, train_options, run_uri: str, rebuild=None):
        super().__init__(datasets_to_split="all", execution_options={"train": train_options})
        self.run_uri, self.rebuild = run_uri, rebuild

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        hints = worker_node_ids if self._enable_shard_locality else None
        epoch, consumed = resume_position(self.run_uri)
        for name, ds in datasets.items():
            if name == "train" and consumed is not None:
                ds = self.skip(ds, epoch, consumed)
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            if name == "train":
                ds.context._execution_idx = epoch
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i][name] = split
        return output

    def skip(self, ds, epoch: int, consumed: np.ndarray):
        """The training dataset without the consumed samples of `epoch`: built again with the filter before decoding
        (streamed data), or the filter on top (data cached in the object store: decoded once, not again)."""
        from ray.data.dataset import MaterializedDataset

        if self.rebuild is None or isinstance(ds, MaterializedDataset):
            return ds.map_batches(drop_consumed, fn_kwargs={"epoch": epoch, "consumed": consumed}, batch_size=None)
        return self.rebuild((epoch, consumed))


def resume_position(run_uri: str) -> tuple[int, np.ndarray | None]:
    """The epoch the workers will start at (that of the checkpoint they restore; 0 for a new run) and, for a step
    checkpoint, the hashes of the samples that epoch has consumed."""
    from distcls.checkpoint import read_verified_file
    from distcls.train.resume import find_restorable, latest_registered

    try:
        found = find_restorable(run_uri, latest_registered(run_uri))
        if found is None:
            return 0, None
        metrics = found.meta.get("metrics", {})
        consumed = None
        if metrics.get("mid_epoch"):
            consumed = read_position(read_verified_file(found.uri, POSITION_FILE, found.meta))
        return int(metrics.get("epoch", 0)), consumed
    except Exception:  # the workers report an unusable checkpoint themselves
        return 0, None

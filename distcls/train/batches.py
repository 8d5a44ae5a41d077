"""What a training worker iterates: its Ray Data shards as numpy batches (bad images dropped and counted, masks
for DDP), kept in step across workers whose shards differ in length, and the all-reduce the epoch's sums use."""

from __future__ import annotations

import itertools
import os

import numpy as np
import torch

from distcls.datasets import ErrorTally

EMPTY_IDS = np.asarray([], dtype=object)  # a placeholder step consumes no sample


def train_batches(shard, batch_size: int, tally: ErrorTally, seed: int | None = None):
    """Numpy batches from the Ray Data shard with bad images dropped (and counted), locally shuffled when
    given a `seed`. Each carries `ids`: the sample ids of every row it consumed.

    A batch made only of bad images is kept with mask 0, so that every DDP worker takes the same steps. A
    batch of one image (a shard's last, or the one good image of a batch) gets a masked copy of it: in
    training mode BatchNorm needs more than one value per channel, which a single image whose feature map
    has shrunk to 1x1 (small inputs) does not give.
    """
    for batch in shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        prefetch_batches=2,
        # Without a seed (--ordered-ingest) there is no local buffer: the rows come in the pipeline's seeded order
        # (see train.data), so a run resumed mid-epoch gets the very batches an uninterrupted one has.
        local_shuffle_buffer_size=4 * batch_size if seed is not None else None,
        local_shuffle_seed=seed,
    ):
        ids = batch["path"]  # every row the step consumes, bad images included (the epoch's position)
        good = tally.drop_errors(batch)
        if len(good["label"]):
            good["mask"] = np.ones(len(good["label"]), dtype=np.float32)
        else:
            good = batch
            good["mask"] = np.zeros(len(batch["label"]), dtype=np.float32)
        yield {**pad_single(good), "ids": ids}


def lockstep(batches, placeholder: dict[str, np.ndarray]):
    """`batches` until every worker's shard is exhausted. Shards split with equal=False differ by a few rows, and
    DDP needs every worker to take every step: before each step the workers all-reduce whether they still have a
    batch; one that has run out takes the step with a mask-0 copy of its last batch (`placeholder` if it had
    none), which adds no loss and no gradient of its own. Every worker so runs the same optimizer steps on the
    same averaged gradients, keeping its optimizer state and step count identical to the others'."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        yield from batches
        return
    last = placeholder
    for batch in itertools.chain(batches, itertools.repeat(None)):
        if allreduce([batch is not None])[0] == 0:  # a small collective per step; the loss's .item() syncs anyway
            return
        if batch is None:
            batch = {**last, "mask": np.zeros(len(last["label"]), dtype=np.float32), "ids": EMPTY_IDS}
        last = batch
        yield batch


def placeholder_batch(size: int) -> dict[str, np.ndarray]:
    """Two black images with mask 0: what a worker whose shard had no batch at all steps with."""
    return {
        "image": np.zeros((2, 3, size, size), dtype=np.uint8),
        "label": np.zeros(2, dtype=np.int64),
        "path": np.asarray(["", ""], dtype=object),
        "error": np.asarray(["", ""], dtype=object),
        "mask": np.zeros(2, dtype=np.float32),
        "ids": EMPTY_IDS,
    }


def log_consumption(batches, folder: str | None, epoch: int, rank: int):
    """Test hook (DISTCLS_TEST_CONSUMPTION_LOG=<folder>, read by the driver): the sample ids of the rows this
    worker trained on (mask 1), appended to <folder>/epoch-E-rank-R.txt."""
    if not folder:
        yield from batches
        return
    with open(os.path.join(folder, f"epoch-{epoch}-rank-{rank}.txt"), "a") as f:
        for batch in batches:
            f.writelines(f"{p}\n" for p, m in zip(batch["path"], batch["mask"]) if m > 0)
            f.flush()
            yield batch


def pad_single(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A one-row batch as two rows: the row and a copy of it with mask 0 (no loss, no gradient of its own)."""
    if len(batch["label"]) != 1:
        return batch
    padded = {k: np.concatenate([v, v]) if isinstance(v, np.ndarray) and len(v) == 1 else v for k, v in batch.items()}
    padded["mask"] = np.array([batch["mask"][0], 0.0], dtype=np.float32)
    return padded


def allreduce(values: list[float] | np.ndarray) -> np.ndarray:
    """Sum a vector over all workers (gloo/nccl via torch.distributed); identity with one worker."""
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            tensor = tensor.cuda()
        torch.distributed.all_reduce(tensor)
    return tensor.cpu().numpy()


def val_batches(shard, batch_size: int, tally: ErrorTally):
    """This worker's share of the validation dataset (every image is evaluated by exactly one worker)."""
    if shard is None:
        return
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        good = tally.drop_errors(batch)
        if len(good["label"]):
            yield good

"""Where a run is inside an epoch, for mid-epoch checkpoints and an exact resume.

A step checkpoint records the epoch and the set of samples consumed in it so far, as 64-bit hashes of their
sample ids (the `path` column every training row carries), merged over all workers. A restore reads the epoch
again minus those samples: the filter drops them in the pipeline, after the epoch's seeded shuffles (so the
rest arrive in the order an uninterrupted run had them) and before decoding where the data allows (per-object
data: before the object is read). The position is global, not a per-worker cursor: Ray Data deals blocks to
whichever worker asks first (streaming_split, equal=False), so only the set of consumed ids says what was
seen, and it is re-split among however many workers resume (an elastic run may come back smaller).

Samples a worker had prefetched but not trained on when the checkpoint was taken are not in the set: they are
read again after a restore, so each is trained on exactly once. With --sampler balanced on packed data a row
may be drawn twice in an epoch; once one copy is consumed, a resumed epoch drops the others.

Cost: 8 bytes per consumed sample (a 10M-image epoch checkpointed at its end: 80 MB, stored as .npy).
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterable

import numpy as np

# The metric Ray Train's retention ranks checkpoints by: an epoch checkpoint's validation accuracy (0..1); a
# step checkpoint's -1 - 1/(1 + step) (below every epoch checkpoint, the newest highest). Ray keeps the top
# --keep + --keep-step-checkpoints and always the latest, so the newest step checkpoints outlive older ones, and
# those of an epoch that has since finished go before any epoch checkpoint.
CHECKPOINT_RANK = "checkpoint_rank"
POSITION_FILE = "position.npy"  # sorted uint64 hashes of the sample ids consumed in the interrupted epoch


def hash_ids(ids: Iterable) -> np.ndarray:
    """64-bit hashes (blake2b) of sample ids; at 10M ids the chance of one collision is ~3e-6."""
    out = [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") for i in ids]
    return np.asarray(out, dtype=np.uint64)


def position_bytes(consumed: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.unique(np.asarray(consumed, dtype=np.uint64)), allow_pickle=False)
    return buffer.getvalue()


def read_position(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False).astype(np.uint64)


def execution_index() -> int:
    """Which execution of its dataset a Ray Data task belongs to: the epoch (EveryRowConfig starts it at the
    epoch the run resumes from). Ray's FileShuffleConfig seeds the shard order with the same number."""
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


def drop_consumed(batch: dict, epoch: int, consumed: np.ndarray) -> dict:
    """Ray Data map_batches function: in the execution of `epoch` (the interrupted one), the rows whose sample
    id is in `consumed` (sorted hashes) are dropped; in every other epoch the batch passes unchanged."""
    ids = batch["path"]
    if execution_index() != epoch or not len(ids) or not len(consumed):
        return batch
    hashes = hash_ids(ids)
    found = np.searchsorted(consumed, hashes)
    seen = consumed[np.minimum(found, len(consumed) - 1)] == hashes
    keep = np.flatnonzero(~seen)
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


class EpochPosition:
    """A worker's record of the samples it trained on in the current epoch (the hashes of every row of each batch
    it stepped on, bad images included, placeholders not), plus those of the checkpoint it resumed from."""

    def __init__(self, resumed: np.ndarray | None = None):
        self.parts: list[np.ndarray] = [resumed] if resumed is not None and len(resumed) else []

    def add(self, ids) -> None:
        if ids is not None and len(ids):
            self.parts.append(hash_ids(ids))

    def merged(self) -> np.ndarray:
        """Every worker's consumed hashes (an all-gather), sorted and unique; the resumed set is in every rank's."""
        import torch.distributed as dist

        mine = np.unique(np.concatenate(self.parts)) if self.parts else np.zeros(0, dtype=np.uint64)
        self.parts = [mine]
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return mine
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return np.unique(np.concatenate(gathered))


# ray.train.get_preemption_info() is a collective through Ray (about 10 ms a call on the 2-core machine, 1 or 2
# workers): asked every 10 steps it costs well under 1% of a step, and 10 steps are seconds on a GPU, well inside
# the 30-120 s a drain notice gives.
POLL_STEPS = 10


class CheckpointClock:
    """When to take a step checkpoint: every N steps, every M minutes (any rank's clock, agreed in a collective),
    or when Ray Train reports that a node of the run is being drained for preemption (ray.train's
    get_preemption_info: a barrier every rank asks at the same steps)."""

    def __init__(self, every_steps: int | None, every_minutes: float | None, world: int):
        self.every_steps, self.every_minutes, self.world = every_steps, every_minutes, world
        self.last = time.monotonic()
        self.preempted = False  # a checkpoint was already taken for the current drain

    def due(self, steps_done: int) -> str | None:
        """Why a checkpoint is due after `steps_done` steps of the run ('steps', 'minutes', 'preemption'), or None.
        The two collectives (the preemption notice, the minutes) are asked every POLL_STEPS steps."""
        polled = steps_done % POLL_STEPS == 0
        if polled and self.preemption_notice():
            return "preemption"
        if self.every_steps and steps_done % self.every_steps == 0:
            return "steps"
        if polled and self.every_minutes and self.agree(time.monotonic() - self.last >= 60 * self.every_minutes):
            return "minutes"
        return None

    def taken(self) -> None:
        self.last = time.monotonic()

    def preemption_notice(self) -> bool:
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None or self.preempted:
            return False
        self.preempted = True
        print(
            f"preemption notice: node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} (ranks "
            f"{info.preempted_ranks}) are being drained; taking a step checkpoint before they go",
            flush=True,
        )
        return True

    def agree(self, mine: bool) -> bool:
        if self.world == 1:
            return mine
        from distcls.train.batches import allreduce

        return bool(allreduce([float(mine)])[0] > 0)

"""What a worker group restores: the checkpoint's weights, optimizer and counters, and after a step checkpoint the
interrupted epoch's position, partial sums and RNG states; the worker-count changes of an elastic run."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from distcls import DistclsError
from distcls.checkpoint import read_verified_file
from distcls.train.loop import WeightEma
from distcls.train.position import POSITION_FILE, read_position
from distcls.train.resume import find_restorable


@dataclass
class Resumed:
    """What a worker group restored from a checkpoint: the epoch to run next and the step count; after a step
    checkpoint also the interrupted epoch's consumed samples, its partial sums and every rank's RNG states."""

    epoch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    consumed: np.ndarray | None = None  # mid-epoch: the hashes of the samples consumed in `epoch`
    partial: dict = field(default_factory=dict)  # mid-epoch: the epoch's EpochStats sums so far
    rng: list = field(default_factory=list)  # mid-epoch: per rank, (numpy generator state, torch RNG state)
    world: int = 0  # the worker count that wrote the checkpoint
    resizes: list = field(default_factory=list)

    @property
    def mid_epoch(self) -> bool:
        return self.consumed is not None


def restore(
    model, optimizer, run_uri: str, latest: str | None = None, announce: bool = True, ema: WeightEma | None = None
) -> Resumed:
    """Load weights and optimizer state from the newest checkpoint of the run, `latest` (Ray Train's) or
    older, that verifies: a damaged or half-written one is passed over, never trained on. With a weight average
    the checkpoint's weights are the average's and the live weights come from the training state. A step
    checkpoint resumes its epoch at the next unseen sample (distcls.train.position)."""
    found = find_restorable(run_uri, latest)
    if found is None:
        raise DistclsError(
            f"train: Ray Train restored run {run_uri}, but it has no checkpoint folder; start a new run with another --name"
        )
    saved = load_safetensors(found.weights)
    state = torch.load(io.BytesIO(found.train_state), map_location="cpu", weights_only=True)
    model.net.load_state_dict(state.get("live_weights", saved), strict=True)
    if ema is not None:
        ema.module.net.load_state_dict(saved if "live_weights" in state else model.net.state_dict(), strict=True)
        ema.updates = int(state.get("ema_updates", 0))
    optimizer.load_state_dict(state["optimizer"])
    out = Resumed(int(state["epoch"]) + 1, int(state["step"]), list(state["history"]), world=int(state.get("world", 0)))
    out.resizes = list(state.get("resizes", []))
    if state.get("mid_epoch"):
        out.epoch = int(state["epoch"])
        out.consumed = read_position(read_verified_file(found.uri, POSITION_FILE, found.meta))
        out.partial, out.rng = dict(state["partial"]), list(state["rng"])
    if announce:
        where = f" after {len(out.consumed)} of its samples" if out.mid_epoch else ""
        print(found.resuming_line(next_epoch=out.epoch + 1) + where, flush=True)
    return out


def note_resize(resumed: Resumed, world: int, rank: int) -> None:
    """A restart with another worker count than the checkpoint's (an elastic run lost or regained a node): said
    once and recorded (the checkpoints and result.json carry the list). The global position is kept; each worker
    keeps --batch-size, so the global batch follows the worker count, and the LR schedule's position is kept in
    samples (the step count is rescaled to the new steps per epoch)."""
    if not resumed.world or resumed.world == world:
        return
    event = {"epoch": resumed.epoch + 1, "step": resumed.step, "from_workers": resumed.world, "to_workers": world}
    resumed.resizes.append(event)
    if rank == 0:
        print(f"resized: {resumed.world} -> {world} workers at epoch {event['epoch']}, step {resumed.step}", flush=True)


def epoch_start_step(resumed: Resumed, world: int) -> int:
    """The optimizer steps before the epoch the workers start, in units of this worker count's steps."""
    step = resumed.step - int(resumed.partial.get("steps", 0))
    if resumed.world and resumed.world != world:
        step = round(step * resumed.world / world)
    return step


def rng_states(rng: np.random.Generator) -> list:
    """This rank's RNG states: the epoch's numpy generator (augmentation, mixing) and torch's (dropout)."""
    states = [rng.bit_generator.state, torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state())
    return states


def set_rng_states(rng: np.random.Generator, states: list) -> None:
    rng.bit_generator.state = states[0]
    torch.set_rng_state(states[1])
    if len(states) > 2 and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[2])


def gather_objects(value) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out

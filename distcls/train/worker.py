"""The Ray Train per-worker function: shards in, DDP, one report (and rank-0 checkpoint) per epoch."""

from __future__ import annotations

import io
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from distcls import DistclsError, storage
from distcls.checkpoint import read_verified_file, write_local_checkpoint
from distcls.config import DistillConfig, TrainConfig
from distcls.datasets import ErrorTally
from distcls.device import DevicePolicy
from distcls.metrics import summarize
from distcls.models import create_model, freeze_backbone, get_model_info, head_parameter_names
from distcls.redact import redact_values
from distcls.train.batches import allreduce, lockstep, log_consumption, placeholder_batch, train_batches, val_batches
from distcls.train.batches import pad_single as pad_single  # re-exported: its old home
from distcls.train.loop import EpochStats, Mixer, WeightEma, build_optimizer, evaluate, train_one_epoch, warmup_cosine
from distcls.train.objectives import build_objective
from distcls.train.position import CHECKPOINT_RANK, POSITION_FILE, CheckpointClock, EpochPosition, position_bytes, read_position
from distcls.train.resume import TRAIN_STATE, find_restorable, latest_registered
from distcls.transforms import PreprocessSpec, train_augment


def sync_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank.

    DDP broadcasts buffers at the start of each training forward, so after the last step each rank holds
    its own statistics; without this, ranks would validate slightly different models than the checkpoint.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


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


def maybe_inject_failure(fault: dict | None, run_uri: str, step: int, rank: int, reported: str | None = None) -> None:
    """Test hook (DISTCLS_TEST_FAULT=STEP[:kill], read by the driver): rank 0 fails once at that global step;
    a marker in the run dir keeps restarts from failing. `raise` throws an exception; `kill` sends SIGKILL
    to this worker process (as a preempted or OOM-killed machine would: no exception, no cleanup)."""
    if not fault or step != fault["at_step"] or rank != 0:
        return
    marker = storage.join_uri(run_uri, "fault-injected.txt")
    if storage.exists(marker):
        return
    # After this worker reported a checkpoint (`reported`: its folder name), fail only once Ray Train has
    # registered it (its snapshot names it): the controller takes reports asynchronously, and a kill inside
    # that window would test a race, not a restart.
    deadline = time.monotonic() + 60
    while reported and latest_registered(run_uri) != reported and time.monotonic() < deadline:
        time.sleep(0.1)
    storage.write_text(marker, f"injected ({fault['mode']}) at step {step} in pid {os.getpid()}\n")
    if fault["mode"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"fault injection: worker failed at step {step} (DISTCLS_TEST_FAULT)")


def quiet_worker_logs() -> None:
    import logging
    import warnings

    import ray.train.v2._internal.execution.context as train_context

    # Ray logs every report (with all metrics) at INFO under a file-path logger name; we print one line.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    # Ray Train sends the root logger (INFO) to the console: botocore's "Found credentials in environment
    # variables." showed on every run.
    for name in ("botocore", "boto3", "s3fs", "aiobotocore", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray hands out read-only numpy views (zero-copy); the model never writes into its input.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def gather_node_ids(world: int) -> list[str]:
    """The Ray node id of every rank (rank order), gathered over the DDP process group."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [node]
    nodes: list = [None] * world
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


@dataclass
class Worker:
    """What one training worker holds across epochs (built once by `setup_worker`)."""

    cfg: TrainConfig
    config: dict
    class_names: list[str]
    spec: PreprocessSpec
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # the Classifier; `ddp_model` wraps it
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    teacher: object
    loss_fn: object
    shard: object
    val_shard: object  # None without validation images
    worker_nodes: list[str]
    ema: WeightEma | None = None  # with --ema: the weight average, evaluated and saved
    start_epoch: int = 0
    step: int = 0  # optimizer steps before the current epoch
    history: list = field(default_factory=list)
    resumed: Resumed = field(default_factory=Resumed)
    clock: CheckpointClock | None = None  # with --checkpoint-every-steps/-minutes, and for preemption notices
    checkpoint_seconds: list = field(default_factory=list)  # the current epoch's step checkpoints, each's seconds
    reported: str | None = None  # rank 0: the folder name of the last checkpoint it reported (for the fault hook)

    @property
    def evaluated(self) -> torch.nn.Module:
        """The model validated and saved: the weight average with --ema, else the live weights."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.config["num_train"] / self.world / self.cfg.batch_size))


def train_func(config: dict) -> None:
    """Ray Train's per-worker loop: set up, then per epoch train, validate, and report (with a checkpoint)."""
    quiet_worker_logs()
    w = setup_worker(config)
    for epoch in range(w.start_epoch, w.cfg.epochs):
        started = time.perf_counter()
        stats, train_tally = train_epoch(w, epoch)
        train_seconds = time.perf_counter() - started
        sync_buffers(w.model)
        if w.ema is not None:
            sync_buffers(w.ema.module)
        val_tally = ErrorTally()
        val = evaluate(
            w.evaluated,
            val_batches(w.val_shard, w.cfg.batch_size * 2, val_tally),
            len(w.class_names),
            w.device,
            loss_fn=torch.nn.CrossEntropyLoss(),
        )
        metrics = epoch_metrics(w, epoch, stats, val, train_tally, val_tally, train_seconds, started)
        w.history.append(metrics)
        report(metrics, w, config, train_tally, val_tally)


def setup_worker(config: dict) -> Worker:
    """The model (restored when Ray Train hands back a checkpoint), optimizer, objective and data shards."""
    import ray.train
    import ray.train.torch

    cfg = (DistillConfig if "teacher" in config["train"] else TrainConfig)(**config["train"])
    class_names, spec = config["class_names"], PreprocessSpec.from_dict(config["preprocessing"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    model = create_model(cfg.model, len(class_names), cfg.weights, spec=spec)
    if cfg.freeze == "backbone":
        freeze_backbone(model)
    backbone_scale = 1.0 if cfg.weights == "none" else cfg.backbone_lr_scale
    head = head_parameter_names(get_model_info(cfg.model))
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, head, backbone_scale)
    ema = WeightEma(model, cfg.ema) if cfg.ema else None
    resumed = Resumed(world=world)
    if (latest := ray.train.get_checkpoint()) is not None:  # a restart after a failure, or --resume
        resumed = restore(model, optimizer, config["run_uri"], latest.path, announce=rank == 0, ema=ema)
        note_resize(resumed, world, rank)
    model = DevicePolicy.of(device).place(model)
    if ema is not None:
        ema.module = DevicePolicy.of(device).place(ema.module)
    ddp_model = ray.train.torch.prepare_model(model)
    worker_nodes = gather_node_ids(world)
    if rank == 0 and resumed.epoch == 0 and not resumed.mid_epoch:
        print(f"{world} workers on nodes: " + ", ".join(f"rank {r} {n[:8]}" for r, n in enumerate(worker_nodes)), flush=True)
    weights = torch.tensor(config["class_weights"], dtype=torch.float32, device=device) if config["class_weights"] else None
    teacher, loss_fn = build_objective(cfg, class_names, spec, device, weights)  # a teacher loads once per worker
    return Worker(
        cfg,
        config,
        class_names,
        spec,
        rank,
        world,
        device,
        model,
        ddp_model,
        optimizer,
        teacher,
        loss_fn,
        ray.train.get_dataset_shard("train"),
        ray.train.get_dataset_shard("val") if config.get("has_val") else None,
        worker_nodes,
        ema,
        resumed.epoch,
        epoch_start_step(resumed, world),
        resumed.history,
        resumed,
        CheckpointClock(cfg.checkpoint_every_steps, cfg.checkpoint_every_minutes, world),
    )


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


def train_epoch(w: Worker, epoch: int) -> tuple[EpochStats, ErrorTally]:
    """One epoch over this worker's shard. Every random draw of the epoch (augmentation, dropout, local
    shuffle) is seeded by (seed, rank, epoch): a run restored from a checkpoint repeats the epoch an
    uninterrupted run would have had. After a step checkpoint the epoch continues where it stopped: its
    partial sums, this rank's RNG states (same worker count) and the samples it has still to see."""
    cfg = w.cfg
    rng = np.random.default_rng([cfg.seed, w.rank, epoch])
    torch.manual_seed(int(rng.integers(2**31)))
    augment = train_augment(w.spec, cfg.random_crops, cfg.augment, rng)
    mixer = Mixer(cfg.mixup, cfg.cutmix, rng) if cfg.mixup > 0 or cfg.cutmix > 0 else None
    shuffle_seed = None if cfg.ordered_ingest else int(rng.integers(2**31))
    resuming = w.resumed.mid_epoch and epoch == w.resumed.epoch
    if resuming and w.resumed.world == w.world and w.rank < len(w.resumed.rng):
        set_rng_states(rng, w.resumed.rng[w.rank])
    position = EpochPosition(w.resumed.consumed if resuming else None)
    w.ddp_model.train()
    if cfg.freeze == "backbone":
        w.model.net.eval()  # linear probe: the backbone's BatchNorm statistics stay as pretrained
    tally = ErrorTally()
    total_steps = w.steps_per_epoch * cfg.epochs
    warmup_steps = int(cfg.warmup_epochs * w.steps_per_epoch)
    size = w.spec.resize_size if cfg.random_crops else w.spec.image_size
    batches = lockstep(train_batches(w.shard, cfg.batch_size, tally, seed=shuffle_seed), placeholder_batch(size))

    def step_end(stats: EpochStats, batch: dict) -> None:
        position.add(batch.get("ids"))
        if w.clock is not None and (reason := w.clock.due(w.step + stats.steps)):
            save_step_checkpoint(w, epoch, stats, position, rng, reason)

    stats = train_one_epoch(
        w.ddp_model,
        log_consumption(batches, w.config.get("consumption_log"), epoch, w.rank),
        w.optimizer,
        w.loss_fn,
        w.device,
        schedule=lambda s: warmup_cosine(s, warmup_steps, total_steps),
        start_step=w.step,
        stats=EpochStats(**w.resumed.partial) if resuming else None,
        augment=augment,
        teacher=w.teacher,
        mixer=mixer,
        after_step=(lambda: w.ema.update(w.model)) if w.ema is not None else None,
        on_step=lambda s: maybe_inject_failure(w.config.get("fault"), w.config["run_uri"], s, w.rank, reported=w.reported),
        on_step_end=step_end,
    )
    w.step += stats.steps
    return stats, tally


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


def save_step_checkpoint(w: Worker, epoch: int, stats: EpochStats, position: EpochPosition, rng, reason: str) -> None:
    """A mid-epoch checkpoint (every rank takes part: the consumed sets and RNG states are gathered). It is
    ranked below every epoch checkpoint, newest highest, so Ray's retention keeps the newest ones."""
    import dataclasses

    started = time.perf_counter()
    consumed = position.merged()
    rngs = gather_objects(rng_states(rng))
    step = w.step + stats.steps
    metrics = {
        "epoch": epoch,  # the epoch a restore continues (0-based), as an epoch checkpoint's "epoch" is the next one
        "step": step,
        "mid_epoch": 1,
        "samples_in_epoch": int(len(consumed)),
        "workers": w.world,
        CHECKPOINT_RANK: -1.0 - 1.0 / (1 + step),
    }
    if w.rank == 0:
        print(f"step checkpoint ({reason}): epoch {epoch + 1}, step {step}, {len(consumed)} samples of it done", flush=True)
    extra_state = {"epoch": epoch, "step": step, "mid_epoch": True, "partial": dataclasses.asdict(stats), "rng": rngs}
    report_checkpoint(w, metrics, extra_state, {POSITION_FILE: position_bytes(consumed)})
    w.clock.taken()
    w.checkpoint_seconds.append(time.perf_counter() - started)


def epoch_metrics(
    w: Worker,
    epoch: int,
    stats: EpochStats,
    val: dict,
    train_tally: ErrorTally,
    val_tally: ErrorTally,
    train_seconds: float,
    started: float,
) -> dict:
    """The epoch's metrics summed over all workers (an all-reduce): plain Python numbers, for JSON and the
    weights_only training state."""
    k = len(w.class_names)
    summed = allreduce(
        [
            stats.loss_sum,
            stats.samples,
            val["loss_sum"],
            val["top5"],
            train_tally.count,
            val_tally.count,
            *val["confusion_matrix"].ravel(),
        ]
    )
    cm = summed[6:].reshape(k, k).astype(np.int64)
    summary = summarize(cm, w.class_names, top5_hits=int(summed[3]))
    metrics = {
        "epoch": epoch + 1,
        "step": w.step,
        "train_loss": summed[0] / max(1, summed[1]),
        "val_loss": summed[2] / max(1, summary["num_samples"]),
        "val_accuracy": summary["accuracy"],
        "val_macro_precision": summary["macro_precision"],
        "val_macro_recall": summary["macro_recall"],
        "val_macro_f1": summary["macro_f1"],
        "val_samples": summary["num_samples"],
        "skipped_train": int(summed[4]),
        "skipped_val": int(summed[5]),
        "train_images_per_s_per_worker": stats.samples / max(train_seconds, 1e-9),
        "data_wait_fraction": stats.data_seconds / max(train_seconds, 1e-9),
        "data_wait_seconds": stats.data_seconds,
        "train_seconds": train_seconds,
        "epoch_seconds": time.perf_counter() - started,
        # 0 for a run that started fresh; N when this worker group was restored from epoch N's checkpoint
        "restored_from_epoch": w.start_epoch,
        "workers": w.world,
        "step_checkpoints": len(w.checkpoint_seconds),  # taken in this epoch (by this worker group)
        "step_checkpoint_seconds": float(sum(w.checkpoint_seconds)),
    }
    w.checkpoint_seconds.clear()
    if k >= 5:
        metrics["val_top5_accuracy"] = summary["top5_accuracy"]
    metrics = {key: int(v) if isinstance(v, (int, np.integer)) else float(v) for key, v in metrics.items()}
    metrics[CHECKPOINT_RANK] = metrics["val_accuracy"]  # epoch checkpoints rank by accuracy, above step ones
    metrics["worker_nodes"] = ",".join(w.worker_nodes)  # the Ray node of each rank, in rank order
    return metrics


def report(metrics: dict, w: Worker, config: dict, train_tally: ErrorTally, val_tally: ErrorTally) -> None:
    """The epoch's line (rank 0) and its checkpoint: ray.train.report on every rank (it is a barrier)."""
    if w.rank == 0:
        print_epoch(metrics, w, train_tally, val_tally)
    report_checkpoint(w, metrics, {"epoch": metrics["epoch"] - 1, "step": metrics["step"]})
    if w.clock is not None:
        w.clock.taken()


def print_epoch(metrics: dict, w: Worker, train_tally: ErrorTally, val_tally: ErrorTally) -> None:
    line = (
        f"epoch {metrics['epoch']}/{w.cfg.epochs}  train_loss {metrics['train_loss']:.4f}  "
        f"val_loss {metrics['val_loss']:.4f}  val_acc {metrics['val_accuracy']:.4f}  "
        f"val_f1 {metrics['val_macro_f1']:.4f}  skipped {metrics['skipped_train']}+{metrics['skipped_val']}  "
        f"{metrics['train_images_per_s_per_worker']:.1f} img/s/worker  "
        f"(data wait {metrics['data_wait_fraction']:.0%})  {metrics['epoch_seconds']:.1f}s"
    )
    print(line, flush=True)
    for example in (train_tally.examples + val_tally.examples)[:3]:
        print(f"  skipped: {example}", flush=True)


def report_checkpoint(w: Worker, metrics: dict, state_fields: dict, files: dict | None = None) -> None:
    """ray.train.report with a checkpoint from rank 0 (the others report the metrics alone): the evaluated
    weights (the average with --ema) and, in train_state.pt, the optimizer, the live weights and `state_fields`."""
    import ray.train

    if w.rank != 0:
        ray.train.report(metrics)
        return
    state = {"optimizer": w.optimizer.state_dict(), "history": w.history, "world": w.world, "resizes": w.resumed.resizes}
    state |= state_fields
    if w.ema is not None:
        state["live_weights"] = {k: v.detach().cpu() for k, v in w.model.net.state_dict().items()}
        state["ema_updates"] = w.ema.updates
    buffer = io.BytesIO()
    torch.save(state, buffer)
    config = w.config
    with tempfile.TemporaryDirectory() as d:  # train_state.pt's sha256 goes into distcls.json with the weights'
        write_local_checkpoint(
            d,
            w.evaluated,
            w.class_names,
            metrics=metrics,
            # no credentials in the record: a password or signature in any URI of the config becomes ***
            config=redact_values(config["train"]),
            extra=redact_values(
                {"history": w.history, "resizes": w.resumed.resizes, "run": config["run_uri"], **config.get("extra_meta", {})}
            ),
            files={TRAIN_STATE: buffer.getvalue(), **(files or {})},
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    w.reported = ray.train.get_checkpoint().path.rstrip("/").rsplit("/", 1)[-1]
    if storage.split_uri(config["run_uri"])[0] == "file":  # Ray copied it into local storage without fsync
        storage.sync_local_tree(ray.train.get_checkpoint().path)

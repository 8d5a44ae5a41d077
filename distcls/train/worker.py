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

from distcls import storage
from distcls.checkpoint import write_local_checkpoint
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
from distcls.train.position import CHECKPOINT_RANK, POSITION_FILE, CheckpointClock, EpochPosition, position_bytes
from distcls.train.resume import TRAIN_STATE, latest_registered
from distcls.train.state import Resumed, epoch_start_step, gather_objects, note_resize, restore, rng_states, set_rng_states
from distcls.transforms import PreprocessSpec, train_augment


def sync_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank.

    DDP broadcasts buffers at the start of each training forward, so after the last step each rank holds
    its own statistics; without this, ranks would validate slightly different models than the checkpoint.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


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
    progress: object = None  # rank 0: the run's progress line (distcls.progress), in images over all workers
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
    run_progress(w)
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


def run_progress(w: Worker) -> None:
    """Rank 0's progress line over the whole run (done / total images, rate, ETA), every 30 s in the job log."""
    from distcls.progress import Progress

    if w.rank != 0:
        return
    n = int(w.config["num_train"])
    done = w.start_epoch * n + (len(w.resumed.consumed) if w.resumed.mid_epoch else 0)
    w.progress = Progress("train", total=n * w.cfg.epochs, unit="images", done=done, every_s=30.0)


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
        if w.progress is not None:  # rank 0's count times the workers: the shards differ by a few rows at most
            w.progress.add(len(batch.get("ids", ())) * w.world)
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

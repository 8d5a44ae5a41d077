"""`distcls bench resume`: what a worker killed mid-epoch costs, with step checkpoints and with epoch checkpoints only.

Three `distcls train` runs of the same config (Fashion-MNIST, --resume-per-class images per class as a local
ImageFolder, streamed (no cache), 1 worker, --image-size, --batch-size, 2 epochs, --ordered-ingest):
1. `straight`: step checkpoints every --resume-every-steps steps, nothing killed: the wall time to beat, each step
   checkpoint's seconds (the worker times them) and bytes, against the step time;
2. `steps`: the same, its worker SIGKILLed (the fault hook DISTCLS_TEST_FAULT=STEP:kill) half-way through epoch 2;
   Ray Train restores the latest step checkpoint (--max-failures 1);
3. `epochs`: step checkpoints off (--checkpoint-every-minutes 0), the same kill: it restores epoch 1's checkpoint.
For 2 and 3: the extra wall time against 1 and the samples trained on twice (per-sample consumption logs).
"""

from __future__ import annotations

import glob
import os
import tempfile
import time
from collections import Counter

from distcls import storage
from distcls.tools.config import BenchConfig


def run(cfg: BenchConfig, data: dict, runs: str, name: str, fault: str | None, log: str | None, **kw) -> dict:
    from distcls.config import TrainConfig
    from distcls.train.data import CONSUMPTION_ENV
    from distcls.train.trainer import FAULT_ENV, run_training

    train = TrainConfig(
        data=data["train"],
        val_data=data["val"],
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        num_workers=1,
        epochs=2,
        storage=runs,
        name=name,
        max_failures=1,
        no_calibrate=True,
        cache_data=False,  # streamed, as a dataset-scale run is: a restore reads what is left again
        **kw,
    )
    for var, value in ((FAULT_ENV, fault), (CONSUMPTION_ENV, log)):
        os.environ.pop(var, None)
        if value:
            os.environ[var] = value
    started = time.perf_counter()
    try:
        result = run_training(train, announce=False)
    finally:
        os.environ.pop(FAULT_ENV, None)
        os.environ.pop(CONSUMPTION_ENV, None)
    return {"wall_s": time.perf_counter() - started, "result": result}


def repeated(log: str, epoch: int) -> int:
    seen: Counter = Counter()
    for path in glob.glob(f"{log}/epoch-{epoch}-rank-*.txt"):
        with open(path) as f:
            seen.update(f.read().split())
    return sum(seen.values()) - len(seen)


def step_checkpoint_bytes(run_uri: str) -> int | None:
    from distcls.checkpoint import read_meta
    from distcls.train.resume import list_checkpoints

    for uri in list_checkpoints(run_uri):
        if read_meta(uri)["metrics"].get("mid_epoch"):
            return sum(os.path.getsize(storage.split_uri(f)[1]) for f in storage.list_files(uri))  # a local run
    return None


def bench_resume(cfg: BenchConfig) -> dict:
    from distcls.tools.config import FashionMnistConfig
    from distcls.tools.fmnist import write_fashion_mnist

    with tempfile.TemporaryDirectory(prefix="distcls-bench-resume-") as root:
        write_fashion_mnist(FashionMnistConfig(out=f"{root}/fm", limit_per_class=cfg.resume_per_class, splits=("train",)))
        write_fashion_mnist(FashionMnistConfig(out=f"{root}/fmval", limit_per_class=20, splits=("test",)))
        data = {"train": f"{root}/fm/train", "val": f"{root}/fmval/test"}
        steps_per_epoch = -(-cfg.resume_per_class * 10 // cfg.batch_size)
        kill_at = steps_per_epoch + steps_per_epoch // 2
        every = cfg.resume_every_steps
        straight = run(cfg, data, f"{root}/runs", "straight", None, None, checkpoint_every_steps=every)
        out = {"steps_per_epoch": steps_per_epoch, "killed_at_step": kill_at, "every_steps": every}
        epochs = straight["result"]["epochs"]
        out["straight_wall_s"] = straight["wall_s"]
        out["epoch_s"] = [e["epoch_seconds"] for e in epochs]
        step_s = sum(e["train_seconds"] - e["step_checkpoint_seconds"] for e in epochs) / (2 * steps_per_epoch)
        ckpts = sum(e["step_checkpoints"] for e in epochs)
        out["step_s"] = step_s
        out["step_checkpoint_s"] = sum(e["step_checkpoint_seconds"] for e in epochs) / max(1, ckpts)
        out["step_checkpoint_bytes"] = step_checkpoint_bytes(f"{root}/runs/straight")
        out["checkpoint_overhead_fraction"] = out["step_checkpoint_s"] / max(every * step_s, 1e-9)
        for name, kw in (("steps", {"checkpoint_every_steps": every}), ("epochs", {"checkpoint_every_minutes": 0})):
            log = f"{root}/log-{name}"
            os.makedirs(log)
            killed = run(cfg, data, f"{root}/runs", name, f"{kill_at}:kill", log, **kw)
            out[name] = {
                "wall_s": killed["wall_s"],
                "lost_s": killed["wall_s"] - straight["wall_s"],
                "repeated_samples": repeated(log, 1),
                "val_accuracy": killed["result"]["metrics"]["val_accuracy"],
            }
        out["straight_val_accuracy"] = straight["result"]["metrics"]["val_accuracy"]
        return out

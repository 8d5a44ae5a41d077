"""Benchmarks: distcls against plain PyTorch, side by side in one run. Measured, never asserted.

`distcls bench train`: images/s per worker of `distcls train` (Ray Train + Ray Data streaming from the
loopback S3 server) against a plain single-process PyTorch loop over the same images held in memory,
same model, batch size, image size, optimizer and threads per process.

`distcls bench transfer`: on real Fashion-MNIST (N training images per class), the bundled pretrained
EfficientNet-Lite0 against the same architecture from scratch, same budget; each picks its own learning
rate on a held-out 20% of the training images; both are then scored on the full test split.

`distcls bench label` (bench_label.py) and `distcls bench serve` (bench_serve.py): the inference paths
against plain scripts and servers, one row per runtime (torch, onnx).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from distcls import storage
from distcls.config import EvaluateConfig, TrainConfig, from_config
from distcls.datasets import load_labeled_index
from distcls.models import create_model, default_spec, get_model_info, head_parameter_names
from distcls.tools.config import BenchConfig, FashionMnistConfig
from distcls.tools.fmnist import write_fashion_mnist
from distcls.train.loop import build_optimizer, masked_loss
from distcls.transforms import augment_batch, preprocess_bytes


def plain_train_rate(cfg: BenchConfig, images: np.ndarray, labels: np.ndarray, threads: int) -> float:
    """The baseline: a careful single-process loop over in-memory decoded images (augmented per batch and
    normalised in the model, as distcls does), same optimizer settings; warm-up steps are not timed.
    With --use-gpu: the images live on the GPU, bf16 autocast and channels_last, as distcls's GPU workers."""
    import contextlib

    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(cfg.model, 10, "bundled" if get_model_info(cfg.model).bundled else "none", image_size=cfg.image_size).to(
        device
    )
    if cfg.use_gpu:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.01, 0.9, head_parameter_names(get_model_info(cfg.model)), 0.1)
    model.train()
    x_all, y_all = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    ones = torch.ones(cfg.batch_size, device=device)
    spec = model.spec
    rng = np.random.default_rng(0)
    n, b = len(labels), cfg.batch_size
    steps = max(cfg.warmup_steps + 5, cfg.epochs * (n // b))
    done, started = 0, None
    for step in range(steps):
        if step == cfg.warmup_steps:
            if cfg.use_gpu:
                torch.cuda.synchronize()
            started, done = time.perf_counter(), 0
        i = (step * b) % max(1, n - b + 1)
        x, y = augment_batch(x_all[i : i + b], spec, rng), y_all[i : i + b]  # the same per-batch augmentation
        if cfg.use_gpu:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16) if cfg.use_gpu else contextlib.nullcontext():
            logits = model(x)
        loss = masked_loss(logits, y, ones[: len(y)], None, 0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += len(y)
    if cfg.use_gpu:
        torch.cuda.synchronize()
    return done / (time.perf_counter() - started)


def distcls_train_rate(cfg: BenchConfig, data: str, storage_uri: str, workers: int, cache: bool) -> dict:
    from distcls.train.trainer import run_training

    train_cfg = from_config(  # the bench's model, epochs, batch_size, image_size, backbone_lr_scale, use_gpu
        TrainConfig,
        cfg,
        data=data,
        val_fraction=0.1,
        weights="bundled" if get_model_info(cfg.model).bundled else "none",
        num_workers=workers,
        storage=storage_uri,
        cache_data=cache,
        name=f"bench-train-w{workers}-{'cache' if cache else 'stream'}-{os.getpid()}",
    )
    result = run_training(train_cfg)
    steady = [h["train_images_per_s_per_worker"] for h in result["epochs"][1:]] or [
        result["epochs"][0]["train_images_per_s_per_worker"]
    ]
    return {"per_worker": max(steady), "epochs": [h["train_images_per_s_per_worker"] for h in result["epochs"]]}


def bench_train(cfg: BenchConfig, root: str) -> dict:
    data = f"{root}/fm"
    write_fashion_mnist(FashionMnistConfig(out=data, limit_per_class=cfg.images_per_class, splits=("train",)), progress=False)
    index = load_labeled_index(f"{data}/train")
    spec = default_spec(cfg.model, cfg.image_size)
    images = np.stack([preprocess_bytes(storage.read_bytes(p), spec, train=True) for p in index.paths])
    labels = np.asarray(index.labels, dtype=np.int64)
    plain = plain_train_rate(cfg, images, labels, threads=1)
    print(f"plain PyTorch loop ({'1 GPU, bf16' if cfg.use_gpu else '1 thread'}): {plain:.1f} images/s", flush=True)
    out = {"plain_images_per_s": plain}
    for mode in cfg.train_data:
        cache = mode == "cached"
        for workers in cfg.workers:
            got = distcls_train_rate(cfg, f"{data}/train", f"{root}/runs", workers, cache)
            key = f"{mode}_{workers}w"
            out[key] = {"images_per_s_per_worker": got["per_worker"], "epochs": got["epochs"], "ratio": got["per_worker"] / plain}
            print(
                f"distcls train, {mode} from S3, {workers} worker(s): {got['per_worker']:.1f} images/s per worker"
                f" = {got['per_worker'] / plain:.2f} of the plain loop",
                flush=True,
            )
    return out


def bench_transfer(cfg: BenchConfig, root: str) -> dict:
    from distcls.evaluate import run_evaluation
    from distcls.train.trainer import run_training

    data = f"{root}/fmt"
    write_fashion_mnist(FashionMnistConfig(out=data, limit_per_class=cfg.transfer_per_class, splits=("train",)), progress=False)
    write_fashion_mnist(
        FashionMnistConfig(out=f"{root}/fmtest", splits=("test",), limit_per_class=cfg.transfer_test_per_class), progress=False
    )
    out: dict = {}
    for weights in ("bundled", "none"):
        runs = []
        for lr in cfg.transfer_lrs:
            name = f"transfer-{weights}-{lr:g}-{os.getpid()}"
            result = run_training(
                TrainConfig(
                    data=f"{data}/train",
                    val_fraction=0.2,
                    model="efficientnet_lite0",
                    weights=weights,
                    lr=lr,
                    backbone_lr_scale=cfg.backbone_lr_scale,
                    epochs=cfg.transfer_epochs,
                    batch_size=cfg.batch_size,
                    image_size=cfg.image_size,
                    num_workers=2,
                    storage=f"{root}/runs",
                    name=name,
                    seed=0,
                    cache_data=True,
                )
            )
            runs.append((result["metrics"]["val_accuracy"], lr, result["checkpoint"]))
            print(f"{weights:>7} lr {lr:g}: held-out accuracy {result['metrics']['val_accuracy']:.4f}", flush=True)
        best_val, best_lr, best_ckpt = max(runs)
        with tempfile.TemporaryDirectory() as d:
            report = run_evaluation(
                EvaluateConfig(checkpoint=best_ckpt, data=f"{root}/fmtest/test", out=d, batch_size=128, concurrency=2)
            )
        out[weights] = {
            "lr": best_lr,
            "heldout_accuracy": best_val,
            "test_accuracy": report["accuracy"],
            "test_macro_f1": report["macro_f1"],
            "test_images": report["num_samples"],
            "lr_sweep": {f"{lr:g}": acc for acc, lr, _ in runs},
        }
        print(
            f"{weights:>7}: test accuracy {report['accuracy']:.4f} on {report['num_samples']} images (lr {best_lr:g})", flush=True
        )
    out["pretrained_minus_scratch"] = out["bundled"]["test_accuracy"] - out["none"]["test_accuracy"]
    return out

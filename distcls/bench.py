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

import dataclasses
import json
import os
import tempfile
import time

import numpy as np
import torch

from distcls import DistclsError, storage
from distcls.bench_harness import machine
from distcls.config import BenchConfig, EvaluateConfig, FashionMnistConfig, TrainConfig
from distcls.datasets import load_labeled_index
from distcls.fmnist import write_fashion_mnist
from distcls.models import create_model, default_spec, get_model_info, head_parameter_names
from distcls.s3server import S3Server, restore_env, use_server_env
from distcls.train.loop import build_optimizer, masked_loss
from distcls.transforms import augment_batch, preprocess_bytes


def plain_train_rate(cfg: BenchConfig, images: np.ndarray, labels: np.ndarray, threads: int) -> float:
    """The baseline: a careful single-process loop over in-memory decoded images (augmented per batch and
    normalised in the model, as distcls does), same optimizer settings; warm-up steps are not timed.
    With --use-gpu: the images live on the GPU, bf16 autocast and channels_last, as distcls's GPU workers."""
    from distcls.train.loop import autocast

    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(cfg.model, 10, "bundled" if get_model_info(cfg.model).bundled else "none",
                         image_size=cfg.image_size).to(device)
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
        x, y = augment_batch(x_all[i:i + b], spec, rng), y_all[i:i + b]  # the same per-batch augmentation
        if cfg.use_gpu:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, cfg.use_gpu):
            logits = model(x)
        loss = masked_loss(logits, y, ones[:len(y)], None, 0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += len(y)
    if cfg.use_gpu:
        torch.cuda.synchronize()
    return done / (time.perf_counter() - started)


def distcls_train_rate(cfg: BenchConfig, data: str, storage_uri: str, workers: int, cache: bool) -> dict:
    from distcls.train.trainer import run_training

    train_cfg = TrainConfig(data=data, val_fraction=0.1, model=cfg.model,
                            weights="bundled" if get_model_info(cfg.model).bundled else "none",
                            epochs=cfg.epochs, batch_size=cfg.batch_size, image_size=cfg.image_size,
                            num_workers=workers, storage=storage_uri, cache_data=cache, use_gpu=cfg.use_gpu,
                            name=f"bench-train-w{workers}-{'cache' if cache else 'stream'}-{os.getpid()}")
    result = run_training(train_cfg)
    steady = [h["train_images_per_s_per_worker"] for h in result["epochs"][1:]] or \
        [result["epochs"][0]["train_images_per_s_per_worker"]]
    return {"per_worker": max(steady), "epochs": [h["train_images_per_s_per_worker"] for h in result["epochs"]]}


def bench_train(cfg: BenchConfig, root: str) -> dict:
    data = f"{root}/fm"
    write_fashion_mnist(FashionMnistConfig(out=data, limit_per_class=cfg.images_per_class, splits=("train",)),
                        progress=False)
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
            out[key] = {"images_per_s_per_worker": got["per_worker"], "epochs": got["epochs"],
                        "ratio": got["per_worker"] / plain}
            print(f"distcls train, {mode} from S3, {workers} worker(s): {got['per_worker']:.1f} images/s per worker"
                  f" = {got['per_worker'] / plain:.2f} of the plain loop", flush=True)
    return out


def bench_transfer(cfg: BenchConfig, root: str) -> dict:
    from distcls.evaluate import run_evaluation
    from distcls.train.trainer import run_training

    data = f"{root}/fmt"
    write_fashion_mnist(FashionMnistConfig(out=data, limit_per_class=cfg.transfer_per_class, splits=("train",)),
                        progress=False)
    write_fashion_mnist(FashionMnistConfig(out=f"{root}/fmtest", splits=("test",),
                                           limit_per_class=cfg.transfer_test_per_class), progress=False)
    out: dict = {}
    for weights in ("bundled", "none"):
        runs = []
        for lr in cfg.transfer_lrs:
            name = f"transfer-{weights}-{lr:g}-{os.getpid()}"
            result = run_training(TrainConfig(
                data=f"{data}/train", val_fraction=0.2, model="efficientnet_lite0", weights=weights, lr=lr,
                backbone_lr_scale=cfg.backbone_lr_scale, epochs=cfg.transfer_epochs, batch_size=cfg.batch_size,
                image_size=cfg.image_size, num_workers=2, storage=f"{root}/runs", name=name, seed=0,
                cache_data=True))
            runs.append((result["metrics"]["val_accuracy"], lr, result["checkpoint"]))
            print(f"{weights:>7} lr {lr:g}: held-out accuracy {result['metrics']['val_accuracy']:.4f}", flush=True)
        best_val, best_lr, best_ckpt = max(runs)
        with tempfile.TemporaryDirectory() as d:
            report = run_evaluation(EvaluateConfig(checkpoint=best_ckpt, data=f"{root}/fmtest/test", out=d,
                                                   batch_size=128, concurrency=2))
        out[weights] = {"lr": best_lr, "heldout_accuracy": best_val, "test_accuracy": report["accuracy"],
                        "test_macro_f1": report["macro_f1"], "test_images": report["num_samples"],
                        "lr_sweep": {f"{lr:g}": acc for acc, lr, _ in runs}}
        print(f"{weights:>7}: test accuracy {report['accuracy']:.4f} on {report['num_samples']} images "
              f"(lr {best_lr:g})", flush=True)
    out["pretrained_minus_scratch"] = out["bundled"]["test_accuracy"] - out["none"]["test_accuracy"]
    return out


def table(results: dict) -> list[str]:
    """One line per measured ratio, next to its roadmap target (targets are for the 2-core CPU machine)."""
    rows = []
    for key, value in results.get("train", {}).items():
        if isinstance(value, dict):
            rows.append((f"train {key.replace('_', ', ')} vs plain loop (per worker)", value["ratio"], ">= 0.95"))
    if "label" in results:
        label = results["label"]
        rows += [("label vs plain PyTorch DataLoader script", label["ratio_vs_plain_torch"], ">= 2.0"),
                 (f"label vs plain {label['default_runtime']} DataLoader script (same runtime)",
                  label["ratio_vs_plain_same_runtime"], ">= 0.9"),
                 (f"label vs {label['default_runtime']} model-only ceiling", label["ratio_vs_ceiling_same_runtime"],
                  ">= 0.6"),
                 ("label top-1 agreement, default runtime vs torch", label["top1_agreement_default_vs_torch"],
                  ">= 0.995")]
    if "serve" in results:
        serve, n = results["serve"], results["serve"]["ratio_clients"]
        rows += [(f"serve req/s vs plain PyTorch server, {n} clients", serve["ratio_rps_vs_plain_torch"], ">= 1.5"),
                 (f"serve p99 vs plain PyTorch server, {n} clients", serve["ratio_p99_vs_plain_torch"], "<= 1.0"),
                 (f"serve req/s vs plain {serve['default_runtime']} server, {n} clients",
                  serve["ratio_rps_vs_plain_same_runtime"], ">= 0.8")]
    if "autoscale" in results:
        a = results["autoscale"]
        rows += [("autoscale: most classifier replicas under load (1..3)", a["max_replicas_seen"], "> 1"),
                 ("autoscale: seconds from the end of load back to 1 replica", a["scale_down_s"] or float("nan"), None),
                 ("autoscale: failed requests", a["failed_requests"], "0"),
                 ("autoscale: cold start from 0 replicas, seconds", a["cold_start_s"] or float("nan"), None)]
    if "transfer" in results:
        rows.append(("transfer: pretrained minus scratch test accuracy", results["transfer"]["pretrained_minus_scratch"],
                     None))
    if "recipe" in results:
        rows += [("recipe: min test accuracy ratio, default flags / plain loop",
                  results["recipe"]["min_ratio_default_vs_plain"], ">= 0.98"),
                 ("recipe: most points below the plain loop", results["recipe"]["max_points_below_plain"], "<= 2"),
                 ("recipe: largest data wait share", results["recipe"]["max_data_wait_fraction"], "< 0.15")]
    if "scale" in results:
        sc = results["scale"]
        rows += [(f"scale: rows / objects ({sc['objects']} objects, {sc['store']})", sc["rows"] / sc["objects"], "1"),
                 ("scale: distinct paths / objects", sc["distinct_paths"] / sc["objects"], "1"),
                 ("scale: driver peak RSS, MB", sc["driver_peak_rss_mb"], "<= 1024"),
                 ("scale: seconds to the first part", sc["time_to_first_part_s"], "<= 60"),
                 ("scale: rerun with everything done, seconds", sc["rerun_done_s"], "<= 60"),
                 ("scale: planning with half done, seconds", sc["resume_half_s"], None),
                 ("scale: images/s end to end", sc["images_per_s"], None),
                 ("scale: images/s first to last batch", sc["steady_images_per_s"], None),
                 ("scale: rows after kill at ~50% and rerun / objects", sc["rows_after_kill_and_rerun"] / sc["objects"],
                  "1"),
                 ("scale: listing, keys/s", sc["list_keys_per_s"], None)]
    lines = [f"{'measure':<66} {'value':>7}  target"]
    for name, value, target in rows:
        lines.append(f"{name:<66} {value:7.2f}  {target or ''}")
    return lines


def run_bench(cfg: BenchConfig) -> dict:
    from distcls.runtime import init_ray

    if cfg.use_gpu and not torch.cuda.is_available():  # checked here: validating a config never probes CUDA
        raise DistclsError("bench: --use-gpu, but no CUDA GPU is visible to PyTorch on this machine; drop --use-gpu")
    results: dict = {"settings": dataclasses.asdict(cfg)}
    with S3Server(port=0) as server:
        previous = use_server_env(server)
        try:
            results["machine"] = machine()
            if cfg.which == "scale":  # `distcls label` runs as its own process with its own Ray
                from distcls.bench_scale import bench_scale

                results["scale"] = bench_scale(cfg)
            else:
                init_ray(num_cpus=max(os.cpu_count() or 1, 4))
            if cfg.which in ("train", "all"):
                results["train"] = bench_train(cfg, "s3://bench")
            if cfg.which in ("label", "all"):
                from distcls.bench_label import bench_label

                with tempfile.TemporaryDirectory(prefix="distcls-bench-label-") as local:
                    results["label"] = bench_label(cfg, "s3://bench" if cfg.label_storage == "s3" else local)
            if cfg.which in ("serve", "all"):
                from distcls.bench_serve import bench_serve

                results["serve"] = bench_serve(cfg, "s3://bench")
            if cfg.which in ("autoscale", "all"):
                from distcls.bench_autoscale import bench_autoscale

                results["autoscale"] = bench_autoscale(
                    "s3://bench", clients_high=cfg.autoscale_clients, load_seconds=cfg.autoscale_load_seconds,
                    idle_seconds=cfg.autoscale_idle_seconds, out_png=os.path.splitext(cfg.out)[0] + "-autoscale.png")
            if cfg.which in ("transfer", "all"):
                results["transfer"] = bench_transfer(cfg, "s3://bench")
            if cfg.which in ("recipe", "all"):
                from distcls.bench_recipe import bench_recipe

                results["recipe"] = bench_recipe(cfg)
        finally:
            restore_env(previous)
    storage.write_text(cfg.out, json.dumps(results, indent=2))
    print("\n" + "\n".join(table(results)), flush=True)
    return results

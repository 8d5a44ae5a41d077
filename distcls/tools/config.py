"""The tool configs: `data fashion-mnist`, `s3-server`, `demo` and `bench`. They use the option machinery of
`distcls.config`; the library never imports them (an import-linter contract)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from distcls.config import Config, Problems, check_model, opt

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INGEST_PARTS = ("per_object_s3", "packed_s3", "packed_local", "cached", "plain", "million")


@dataclass
class FashionMnistConfig(Config):
    """`distcls data fashion-mnist`: the official IDX files -> PNGs in an ImageFolder layout."""

    command = "data fashion-mnist"

    out: str = opt(help="where to write: URI/train/<class>/<index>.png and URI/test/<class>/<index>.png")
    limit_per_class: int | None = opt(None, help="write at most N images per class and split")
    source: str | None = opt(
        None,
        help="folder with the IDX files (.gz or raw); else $DISTCLS_DATA_DIR, else "
        f"{FASHION_MNIST_DEFAULT_DIR}, else download (MD5-checked)",
    )
    splits: tuple[str, ...] = opt(("train", "test"), help="which splits to write, comma-separated")
    workers: int = opt(16, min=1, max=256, help="concurrent uploads")

    def validate(self, p: Problems) -> None:
        p.check(bool(self.out), "out", self.out, "give an output URI, e.g. s3://bucket/fashion-mnist")
        p.check(
            self.limit_per_class is None or self.limit_per_class > 0,
            "limit_per_class",
            self.limit_per_class,
            "must be a positive number of images",
        )
        bad = [s for s in self.splits if s not in ("train", "test")]
        p.check(not bad and bool(self.splits), "splits", ",".join(self.splits), "use train, test or train,test")

    def resolved_source(self) -> str | None:
        return self.source or os.environ.get("DISTCLS_DATA_DIR") or None


@dataclass
class S3ServerConfig(Config):
    """`distcls s3-server`: an S3-compatible server on loopback until interrupted."""

    command = "s3-server"

    host: str = opt("127.0.0.1", help="address to listen on; keep loopback unless you mean to expose it")
    port: int = opt(9000, min=0, max=65535, help="port to listen on (0 picks a free one)")

    def validate(self, p: Problems) -> None:
        p.check(bool(self.host), "host", self.host, "give an address such as 127.0.0.1")


@dataclass
class DemoConfig(Config):
    """`distcls demo`: the whole product end to end on real data."""

    command = "demo"

    train_per_class: int = opt(1000, min=2, help="Fashion-MNIST training images per class (of 6,000)")
    test_per_class: int | None = opt(None, gt=0, help="test images per class (default: all 1,000, the full split)")
    full: bool = opt(False, help="use all 70,000 Fashion-MNIST images")
    image_size: int = opt(64, min=16, max=512, help="model input size in pixels")
    epochs: int = opt(3, min=1, help="fine-tuning epochs")
    label_images: int = opt(200, min=1, help="test images copied without their folders to the 'unlabeled' prefix")
    serve_requests: int = opt(20, min=1, help="HTTP requests (one test image each) sent to the endpoint")
    serve_split_requests: int = opt(
        300, min=1, help="requests (4 clients) sent to the best/last checkpoints split 90/10, to see the split"
    )
    bucket: str | None = opt(None, help="use this storage URI instead of the embedded S3 server")
    s3_port: int = opt(0, help="port of the embedded S3 server (0 picks a free one)")
    out: str = opt("demo-out", help="local folder for reports and labels")


@dataclass
class BenchConfig(Config):
    """`distcls bench`: measured ratios against plain PyTorch, side by side in one run."""

    command = "bench"

    which: str = opt(
        "train",
        help="which benchmark",
        choices=(
            "train",
            "label",
            "serve",
            "autoscale",
            "transfer",
            "recipe",
            "scale",
            "trust",
            "imbalance",
            "modern",
            "tune",
            "ingest",
            "resume",
            "all",
        ),
    )
    model: str = opt("efficientnet_lite0", help="architecture for the train benchmark")
    images_per_class: int = opt(20, min=4, help="Fashion-MNIST images per class for the train benchmark")
    image_size: int = opt(64, help="model input size")
    batch_size: int = opt(32, help="images per step per worker")
    epochs: int = opt(3, min=1, help="epochs of the train benchmark (the first is warm-up)")
    warmup_steps: int = opt(3, help="untimed steps of the plain loop")
    workers: tuple[int, ...] = opt((1, 2), help="distcls worker counts to measure, comma-separated")
    train_data: tuple[str, ...] = opt(
        ("streamed", "cached"),
        help="distcls train data modes to measure: streamed "
        "(Ray Data from S3 every epoch) and/or cached (decoded once, in memory)",
    )
    transfer_per_class: int = opt(100, help="training images per class for the transfer benchmark")
    transfer_epochs: int = opt(8, help="epochs for each transfer run (same budget for both)")
    transfer_test_per_class: int | None = opt(
        None, help="test images per class the transfer runs are scored on (default: all 10,000 of the test split)"
    )
    transfer_lrs: tuple[float, ...] = opt((1e-3, 3e-3), help="learning rates each transfer run picks from")
    backbone_lr_scale: float = opt(1.0, help="backbone lr scale of the pretrained transfer run")
    recipe_settings: tuple[str, ...] = opt(
        ("fmnist20", "fmnist100", "fmnist1000", "digits", "faces"),
        help="recipe benchmark datasets: fmnistN (N images per class), digits, faces; comma-separated",
    )
    recipe_epochs: int = opt(3, min=1, help="epochs of every recipe benchmark run (the fixed budget)")
    recipe_model: str = opt("efficientnet_lite0", help="pretrained architecture of the recipe benchmark")
    recipe_test_per_class: int | None = opt(
        None, help="Fashion-MNIST test images per class the recipe runs are scored on (default: the whole test split)"
    )
    recipe_seeds: int = opt(3, min=1, help="seeds averaged for recipe settings of up to 2,000 training images")
    use_gpu: bool = opt(False, help="train and label on the GPU (bf16, channels_last), baselines too")
    label_model: str = opt(
        "efficientnet_lite0",
        help="ImageNet classifier for the label benchmark (others than "
        "the bundled efficientnet_lite0 get random weights: throughput only)",
    )
    label_images: int = opt(5000, help="JPEGs (500x375, from real photos) for the label benchmark")
    label_batch_size: int = opt(64, help="images per forward pass in the label benchmark (distcls label's default)")
    label_storage: str = opt(
        "local",
        help="where the label benchmark's JPEGs live: local (a folder) or s3 (the "
        "embedded S3 server, which serves ~50 objects/s on 2 cores and then caps every labeler)",
        choices=("local", "s3"),
    )
    label_large_photos: int = opt(24, help="12-megapixel JPEGs the decode measurement of the label benchmark uses")
    ceiling_seconds: float = opt(10.0, help="seconds each model-only ceiling is timed for")
    label_concurrency: tuple[int, ...] = opt((1,), help="distcls label model replicas (N or MIN,MAX)")
    label_cpus_per_replica: float = opt(1.0, help="CPUs (runtime threads) per distcls label replica (distcls label's default)")
    loader_workers: int = opt(2, help="DataLoader worker processes of the label baseline")
    objects: int = opt(10_000, min=1, help="scale benchmark (not in `all`): 32x32 PNGs labeled by `distcls label`")
    plan_only: bool = opt(
        False,
        help="scale benchmark: listing, planning, a half-done output and the rerun's subtraction on --objects synthetic "
        "keys (generated listing pages, no files, no inference)",
    )
    store: str = opt(
        "local",
        help="scale benchmark: where the objects live, local (a folder) or s3 (the embedded S3 server)",
        choices=("local", "s3"),
    )
    scale_dir: str | None = opt(
        None,
        help="scale benchmark: folder for the objects, kept for the next run of the "
        "same --objects (default: a temporary folder, removed after)",
    )
    serve_images: int = opt(32, help="distinct JPEGs (500x375, from real photos) the serve clients send")
    serve_clients: tuple[int, ...] = opt((1, 4, 16), help="concurrent HTTP clients to measure, comma-separated")
    serve_seconds: float = opt(15.0, help="measured seconds per client count and server")
    serve_replicas: int = opt(2, help="distcls serve classifier replicas (fixed for the measurement)")
    serve_cpus_per_replica: float = opt(1.0, help="CPUs (torch threads) per distcls serve replica")
    serve_max_batch_size: int = opt(8, help="distcls serve --max-batch-size for the measurement")
    serve_batch_wait_timeout_s: float = opt(0.0, help="distcls serve --batch-wait-timeout-s for the measurement")
    serve_max_concurrent_batches: int = opt(2, help="distcls serve --max-concurrent-batches for the measurement")
    autoscale_clients: int = opt(16, help="HTTP clients of the autoscaling benchmark's load phase")
    autoscale_load_seconds: float = opt(40.0, help="longest load phase of the autoscaling benchmark")
    autoscale_idle_seconds: float = opt(60.0, help="longest wait for scale-down and for scale-to-zero")
    trust_parts: tuple[str, ...] = opt(
        (),
        help="trust benchmark (not in `all`): parts to run, comma-separated, of calibration, ood, label_issues, "
        "dedup, dedup_scale (default: all)",
    )
    imbalance_epochs: int = opt(5, help="imbalance benchmark (not in `all`): epochs of every run (the same budget)")
    modern_variants: tuple[str, ...] = opt(
        ("default flags", "ema", "ema + flip", "ema + trivialaugment"),
        help="modern benchmark (not in `all`): the recipes to compare, of: default flags, ema, ema + flip, ema + trivialaugment",
    )
    tune_per_class: int = opt(200, help="tune benchmark (not in `all`): Fashion-MNIST training images per class")
    tune_trials: int = opt(8, help="tune benchmark: trials of the search")
    tune_epochs: tuple[int, ...] = opt((3, 5), help="tune benchmark: epoch counts the search chooses from")
    ingest_images: int = opt(
        2000, min=10, help="ingest benchmark (not in `all`): JPEGs of 500x375 (crops of real photos) it trains on"
    )
    ingest_max_side: int | None = opt(
        256,
        min=8,
        help="ingest benchmark: distcls pack --max-side for its packed set (256: JPEG draft decoding for a 64 px "
        "input reads 250x188 of a 500x375 original anyway)",
    )
    resume_per_class: int = opt(
        200, min=4, help="resume benchmark (not in `all`): Fashion-MNIST training images per class (2 epochs, 1 worker)"
    )
    resume_every_steps: int = opt(10, min=1, help="resume benchmark: --checkpoint-every-steps of its step-checkpoint runs")
    ingest_epochs: int = opt(3, min=1, help="ingest benchmark: epochs of every training run (the first is warm-up)")
    ingest_shards: int = opt(16, min=1, help="ingest benchmark: about this many train shards in the packed set")
    ingest_loader_workers: tuple[int, ...] = opt(
        (1, 2, 4), help="ingest benchmark: DataLoader worker counts the plain script tries (its best is kept)"
    )
    ingest_million: int = opt(
        1_000_000, min=10, help="ingest benchmark: tiny images of the packed set the training driver is measured on"
    )
    ingest_dir: str | None = opt(
        None,
        help="ingest benchmark: folder for the tiny-image packed set, kept for the next run of the same "
        "--ingest-million (default: a temporary folder, removed after)",
    )
    ingest_parts: tuple[str, ...] = opt(
        INGEST_PARTS,
        help="ingest benchmark: parts to run, comma-separated, of " + ", ".join(INGEST_PARTS) + " (default: all)",
    )
    work_dir: str | None = opt(
        None, help="imbalance, modern and tune benchmarks: folder for their data and runs (default: a temporary folder)"
    )
    out: str = opt("bench.json", help="where to write every figure (JSON)")

    def validate(self, p: Problems) -> None:
        known = ("calibration", "ood", "label_issues", "dedup", "dedup_scale")
        p.check(set(self.trust_parts) <= set(known), "trust_parts", ",".join(self.trust_parts), f"must be of {', '.join(known)}")
        p.check(all(w >= 1 for w in self.workers), "workers", self.workers, "worker counts must be >= 1")
        p.check(
            bool(self.ingest_parts) and set(self.ingest_parts) <= set(INGEST_PARTS),
            "ingest_parts",
            ",".join(self.ingest_parts),
            f"must be of {', '.join(INGEST_PARTS)}",
        )
        p.check(
            bool(self.ingest_loader_workers) and min(self.ingest_loader_workers) >= 0,
            "ingest_loader_workers",
            self.ingest_loader_workers,
            "give DataLoader worker counts >= 0, e.g. 1,2,4",
        )
        p.check(
            bool(self.train_data) and set(self.train_data) <= {"streamed", "cached"},
            "train_data",
            self.train_data,
            "must be streamed, cached or streamed,cached",
        )
        bad = [
            s
            for s in self.recipe_settings
            if s not in ("digits", "faces")
            and not (s.startswith("fmnist") and s.removeprefix("fmnist").isdigit() and int(s.removeprefix("fmnist")) >= 2)
        ]
        p.check(
            bool(self.recipe_settings) and not bad,
            "recipe_settings",
            ",".join(self.recipe_settings),
            "use fmnistN (N >= 2 images per class), digits or faces",
        )
        for name in ("model", "label_model", "recipe_model"):
            check_model(p, name, getattr(self, name))

"""The inference-side configs: `export`, `compare`, `evaluate`, `calibrate`, `label`, `serve` and `checkpoint
from-pretrained`. The fields the commands that run a model share, with one meaning and one default, are declared
once, in a chain of bases: RuntimeFields (--runtime) < ReplicaFields (--num-gpus) < BatchFields (--batch-size) <
PoolFields (--checkpoint, --concurrency). Their fields are keyword-only, so each command's own required fields
keep their place."""

from __future__ import annotations

import math
from dataclasses import dataclass

from distcls.config.options import Config, Problems, check_required, max_object_mb, opt

RUNTIMES = ("auto", "torch", "onnx")
RUNTIME_HELP = (
    "inference runtime: auto (onnxruntime on CPU, torch bf16 on CUDA; an export runs on its own), "
    "torch or onnx (a checkpoint is compiled to ONNX once and cached)"
)
EXPORT_FORMATS = ("onnx", "torchscript")


def check_unknown(problems: Problems, value: str) -> None:
    """--unknown: off, auto, or a finite number (an energy score)."""
    if str(value).lower() in ("off", "auto"):
        return
    try:
        ok = math.isfinite(float(value))
    except ValueError:
        ok = False
    problems.check(ok, "unknown", value, "must be off, auto or a number (an energy score, e.g. -4.5)")


@dataclass(kw_only=True)
class RuntimeFields(Config):
    """What every command that runs a model has: compare, evaluate, calibrate, label, serve."""

    runtime: str = opt("auto", help=RUNTIME_HELP, choices=RUNTIMES)


@dataclass(kw_only=True)
class ReplicaFields(RuntimeFields):
    """What the commands whose model replicas are Ray actors or Serve replicas have: evaluate, calibrate, label, serve."""

    num_gpus: float = opt(0, min=0, help="GPUs per model replica")


@dataclass(kw_only=True)
class BatchFields(ReplicaFields):
    """What the commands that run a model over a whole dataset have: evaluate, calibrate, label."""

    batch_size: int = opt(64, min=1, help="images per forward pass")


@dataclass(kw_only=True)
class PoolFields(BatchFields):
    """What the commands that score one model directory on labeled data with a pool of actors have: evaluate, calibrate."""

    checkpoint: str = opt(help="checkpoint or export directory URI (holds distcls.json and the model file)")
    concurrency: int = opt(1, min=1, help="model replicas (Ray actors) running in parallel")

    def validate(self, p: Problems) -> None:
        check_required(p, self, "checkpoint")


@dataclass
class ExportConfig(Config):
    """`distcls export`: a checkpoint as ONNX or TorchScript (optionally int8) that label and serve can run."""

    command = "export"

    checkpoint: str = opt(help="checkpoint directory URI to export")
    out: str = opt(help="export directory URI to write (distcls.json + model.onnx or model.ts)")
    sample: str = opt(
        help="real images to check the export against the checkpoint (and calibrate int8): an "
        "ImageFolder prefix, a manifest, any prefix of images, or packed data (the first rows of its val split, else test, "
        "else train)"
    )
    format: str = opt("onnx", help="onnx (run by onnxruntime) or torchscript (run by torch)", choices=EXPORT_FORMATS)
    quantize: str = opt("none", help="none, or int8 weights and activations (ONNX only)", choices=("none", "int8"))
    calibration: str = opt(
        "static",
        help="int8: static (activation ranges calibrated on --sample images) or dynamic (weights only ahead of time)",
        choices=("static", "dynamic"),
    )
    sample_size: int = opt(200, min=1, help="images of --sample the top-1 agreement is checked on")
    calibration_size: int = opt(64, min=1, help="images of --sample used for int8 static calibration")
    min_agreement: float = opt(
        0.95,
        min=0,
        max=1,
        help="refuse the export when its top-1 agrees with the checkpoint's on fewer than this share of the sample images",
    )
    opset: int = opt(18, min=18, max=23, help="ONNX opset version (the torch.export-based exporter needs 18 or later)")

    def validate(self, p: Problems) -> None:
        check_required(p, self, "checkpoint", "out", "sample")
        p.check(
            not (self.quantize == "int8" and self.format == "torchscript"),
            "quantize",
            self.quantize,
            "int8 is supported for --format onnx only (torch.ao quantization is deprecated in torch 2.14)",
        )


@dataclass
class CompareConfig(RuntimeFields):
    """`distcls compare`: checkpoints and exports side by side on one test split (accuracy against speed)."""

    command = "compare"

    models: tuple[str, ...] = opt(help="checkpoint or export directory URIs")
    data: str = opt(help="labeled test data: an ImageFolder prefix, a manifest file or packed data (its test split, else val)")
    out: str = opt("compare", help="folder (or URI) for compare.json, compare.md and compare.png")
    names: tuple[str, ...] = opt((), help="display names, one per model, comma-separated (default: derived)")
    limit_per_class: int | None = opt(None, min=1, help="evaluate at most N images per class (default: all)")
    batch_size: int = opt(32, min=1, help="images per forward pass, the same for every model")
    threads: int = opt(1, min=1, help="torch / onnxruntime threads, the same for every model")
    speed_batches: int = opt(20, min=1, help="timed batches per model for images/s (after warm-up batches)")
    warmup_batches: int = opt(3, min=0, help="untimed batches per model before timing")

    def validate(self, p: Problems) -> None:
        p.check(len(self.models) >= 1, "models", ",".join(self.models), "give at least one checkpoint or export")
        p.check(bool(self.data), "data", self.data, "give a labeled test split")
        p.check(
            not self.names or len(self.names) == len(self.models),
            "names",
            ",".join(self.names),
            f"give one name per model ({len(self.models)})",
        )


@dataclass
class EvaluateConfig(PoolFields):
    """`distcls evaluate`: metrics of a checkpoint over a whole labeled split."""

    command = "evaluate"

    data: str = opt(
        help="labeled data: an ImageFolder prefix, a manifest file, or packed data (its test split, else val, else train)"
    )
    out: str = opt(help="folder (or URI) for report.json, report.md and confusion_matrix.png")
    max_object_mb: float = max_object_mb()
    class_names: tuple[str, ...] = opt(
        (),
        help="the names of a WebDataset's `cls` integers (comma-separated, in index order) when it has no classes.txt "
        "(default: the checkpoint's class names, in its order)",
    )

    def validate(self, p: Problems) -> None:
        super().validate(p)
        check_required(p, self, "data", "out")


@dataclass
class CalibrateConfig(PoolFields):
    """`distcls calibrate`: fit a temperature (and the "unknown" threshold) for an existing checkpoint."""

    command = "calibrate"

    data: str = opt(
        help="labeled data it was not trained on (its validation split): ImageFolder prefix, manifest or packed data "
        "(its val split, else test)"
    )
    out: str = opt(help="new model directory: the model file copied as it is, distcls.json with the calibration")
    keep: float = opt(0.95, min=0.5, lt=1, help="share of --data images the `unknown` threshold keeps")

    def validate(self, p: Problems) -> None:
        super().validate(p)
        check_required(p, self, "data", "out")
        p.check(
            not self.out or self.out.rstrip("/") != self.checkpoint.rstrip("/"),
            "out",
            self.out,
            "must be a new directory, not --checkpoint (the original keeps its record, so its run can still resume)",
        )


@dataclass
class LabelConfig(BatchFields):
    """`distcls label`: label every image object under a prefix (or in a manifest) into Parquet, one row each."""

    command = "label"

    output: str = opt(
        help="folder/prefix for the Parquet parts, the plan (_plan/) and _SUCCESS.json; reruns add only what is missing"
    )
    checkpoint: str = opt("", help="checkpoint directory URI (required unless --status)")
    input: str = opt(
        "",
        help="prefix to label, recursively (jpg, jpeg, png, webp, bmp, gif, tif, tiff); with "
        "--manifest, the prefix its `key` column is relative to; or packed data (a `distcls pack` folder, found by its "
        "_dataset.json, or one .parquet / .tar shard): every row of every split, read from the shards",
    )
    manifest: str | None = opt(
        None,
        help="label the keys of this list instead of listing --input: CSV, Parquet or "
        "JSONL with a `path` (full URI) or `key` (below --input) column, or an S3 Inventory "
        "manifest.json",
    )
    status: bool = opt(False, help="print what --output holds (planned, written, errors, complete) and exit")
    replan: bool = opt(False, help="list the input again instead of using the stored plan (new objects)")
    top_k: int = opt(5, min=1, help="labels and scores kept per image")
    concurrency: tuple[int, ...] = opt((1,), help="model replicas: N, or MIN,MAX to autoscale")
    cpus_per_replica: float = opt(1.0, gt=0, help="CPUs (and torch threads) per model replica")
    include: str | None = opt(
        None,
        help="glob on the path below --input (or the file name) instead of the extension filter, e.g. '*.jpg' or 'cams/*/*.png'",
    )
    part_rows: int = opt(2000, min=1, help="rows per Parquet part: the unit of progress a restart keeps")
    part_mb: float = opt(64.0, gt=0, help="largest Parquet part in MB (a bigger batch is split)")
    unknown: str = opt(
        "off",
        help="rows whose OOD (energy) score is past a threshold get label `unknown` (top-k kept): off, auto (the "
        "threshold a calibrated checkpoint records, keeping 95%% of its validation images) or a number",
    )
    embeddings: bool = opt(False, help="add an `embedding` column: the model's pooled features (float16; torch runtime)")
    pipeline: str = opt(
        "auto",
        help="fused: the model actors also read and decode (no decode tasks; the CPU "
        "default); split: decode in Ray Data tasks, predict in actors (the GPU default)",
        choices=("auto", "fused", "split"),
    )
    max_object_mb: float = max_object_mb()
    allow_any_path: bool = opt(
        False,
        help="read manifest or plan paths anywhere the credentials reach (by default every path must stay under "
        "--input, or under one prefix of the manifest's)",
    )

    def validate(self, p: Problems) -> None:
        p.check(bool(self.output), "output", self.output, "is required")
        if not self.status:
            p.check(bool(self.checkpoint), "checkpoint", self.checkpoint, "is required")
            p.check(bool(self.input or self.manifest), "input", self.input, "is required (or give --manifest)")
        c = self.concurrency
        p.check(
            len(c) in (1, 2) and min(c) >= 1 and c[0] <= c[-1],
            "concurrency",
            ",".join(map(str, c)),
            "give N or MIN,MAX with 1 <= MIN <= MAX",
        )
        check_unknown(p, self.unknown)
        p.check(
            not (self.embeddings and self.runtime == "onnx"),
            "embeddings",
            self.embeddings,
            "come from the torch runtime; drop --runtime onnx",
        )


@dataclass
class FromPretrainedConfig(Config):
    """`distcls checkpoint from-pretrained`: the pretrained ImageNet classifier as a checkpoint."""

    command = "checkpoint from-pretrained"

    out: str = opt(help="checkpoint directory URI to write")
    model: str = opt("efficientnet_lite0", help="architecture")
    weights: str = opt("bundled", help="bundled or a torchvision weights name")
    image_size: int | None = opt(None, help="input size (default: the model's own)")


@dataclass
class ServeConfig(ReplicaFields):
    """`distcls serve` / `serve-config`: the online endpoint on Ray Serve."""

    command = "serve"

    checkpoint: str = opt(help="checkpoint directory URI (change it on a running app to switch models)")
    host: str = opt("127.0.0.1", help="address the HTTP proxy binds; 0.0.0.0 exposes it to the network")
    port: int = opt(8000, help="HTTP port")
    min_replicas: int = opt(1, min=0, help="fewest classifier replicas (autoscaling lower bound)")
    max_replicas: int = opt(4, help="most classifier replicas (autoscaling upper bound)")
    target_ongoing_requests: float = opt(8.0, gt=0, help="autoscaling target: in-flight requests per replica")
    upscale_delay_s: float = opt(30.0, min=0, help="autoscaling: seconds of load above target before adding replicas")
    downscale_delay_s: float = opt(
        600.0,
        min=0,
        help="autoscaling: seconds of load below target before removing replicas "
        "(also the idle time before scaling to zero with --min-replicas 0)",
    )
    look_back_period_s: float = opt(
        30.0, help="autoscaling: seconds of request metrics each decision averages (more than Ray Serve's 10 s metrics interval)"
    )
    downscale_to_zero_delay_s: float | None = opt(
        None,
        min=0,
        help="autoscaling: seconds at 1 replica without requests "
        "before going to 0 with --min-replicas 0 (default: --downscale-delay-s)",
    )
    max_batch_size: int = opt(32, min=1, help="most images per forward pass (@serve.batch)")
    unknown: str = opt(
        "off",
        help="predictions whose OOD (energy) score is past a threshold get label `unknown` (top-k kept): off, auto "
        "(the calibrated checkpoint's threshold) or a number",
    )
    batch_wait_timeout_s: float = opt(0.01, min=0, help="longest wait for a batch to fill")
    cpus_per_replica: float = opt(1.0, gt=0, help="CPUs (and torch threads) per classifier replica")
    max_request_mb: float = opt(10.0, gt=0, help="largest request body in MB; bigger bodies get 413")
    max_images_per_request: int = opt(64, min=1, help="most images in one request")
    top_k: int = opt(5, min=1, help="default number of labels per prediction (requests may ask for another)")
    max_ongoing_requests: int = opt(64, min=1, help="requests one classifier replica works on at once")
    max_queued_requests: int = opt(256, help="requests queued per caller before answering 503")
    name: str = opt("distcls", help="Serve application name")
    detach: bool = opt(
        False,
        help="deploy on the cluster (RAY_ADDRESS) and return instead of serving until "
        "Ctrl-C; the application keeps running (for `ray job submit` and scripts)",
    )
    no_auth: bool = opt(
        False,
        help="serve without a token on a --host other than loopback (warned on stderr); "
        "without this flag such a host needs DISTCLS_API_TOKEN",
    )
    allowed_hosts: tuple[str, ...] = opt(
        (),
        help="Host header names accepted besides the bind address and localhost (comma-separated); checked on a "
        "loopback bind without a token (against DNS rebinding), and always when given",
    )

    def validate(self, p: Problems) -> None:
        p.check(bool(self.checkpoint), "checkpoint", self.checkpoint, "is required")
        p.check(0 < self.port < 65536, "port", self.port, "must be 1..65535")
        p.check(
            self.max_replicas >= max(1, self.min_replicas),
            "max_replicas",
            self.max_replicas,
            "must be at least 1 and at least --min-replicas",
        )
        p.check(
            self.look_back_period_s > 10,
            "look_back_period_s",
            self.look_back_period_s,
            "must be more than 10 (Ray Serve's metrics interval)",
        )
        check_unknown(p, self.unknown)
        p.check(
            self.max_queued_requests >= 1,
            "max_queued_requests",
            self.max_queued_requests,
            "must be at least 1 (overload answers 503 instead of queueing without bound)",
        )
        p.check(bool(self.name), "name", self.name, "must not be empty")

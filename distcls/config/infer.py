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
class FromPretrainedConfig(Config):
    """`distcls checkpoint from-pretrained`: the pretrained ImageNet classifier as a checkpoint."""

    command = "checkpoint from-pretrained"

    out: str = opt(help="checkpoint directory URI to write")
    model: str = opt("efficientnet_lite0", help="architecture")
    weights: str = opt("bundled", help="bundled or a torchvision weights name")
    image_size: int | None = opt(None, help="input size (default: the model's own)")

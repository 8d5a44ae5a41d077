"""Config dataclasses: one per job. Fields are the CLI flags; YAML files use the same names.

Each config validates itself on construction and reports every problem at once, naming the flag, the
value and the fix. `load_config` is the one loader used by the CLI, `jobs/*.py` and the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from distcls import DistclsError

C = TypeVar("C")

RUNTIMES = ("auto", "torch", "onnx")
RUNTIME_HELP = (
    "inference runtime: auto (onnxruntime on CPU, torch bf16 on CUDA; an export runs on its own), "
    "torch or onnx (a checkpoint is compiled to ONNX once and cached)"
)


class ConfigError(DistclsError):
    pass


def opt(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, **kw) -> Any:
    """A config field with its CLI help text (and choices)."""
    meta = {"help": help, "choices": choices}
    if default is dataclasses.MISSING:
        return field(metadata=meta, **kw)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Problems(list):
    """Collects validation problems; `raise_if_any` raises one ConfigError listing them all."""

    def check(self, ok: bool, name: str, value: Any, fix: str) -> None:
        if not ok:
            self.append(f"{flag(name)} {value!r}: {fix}")

    def raise_if_any(self, what: str) -> None:
        if self:
            raise ConfigError(f"{what}: invalid configuration: " + "; ".join(self))


def check_required(problems: Problems, cfg: Any, *names: str) -> None:
    for name in names:
        problems.check(bool(getattr(cfg, name)), name, getattr(cfg, name), "is required")


def check_unknown(problems: Problems, value: str) -> None:
    """--unknown: off, auto, or a finite number (an energy score)."""
    if str(value).lower() in ("off", "auto"):
        return
    try:
        ok = math.isfinite(float(value))
    except ValueError:
        ok = False
    problems.check(ok, "unknown", value, "must be off, auto or a number (an energy score, e.g. -4.5)")


NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def check_run_name(problems: Problems, value: str | None) -> None:
    """--name: one path segment of safe characters (letters, digits, . _ -), never `.` or `..`."""
    ok = value is None or (bool(value) and set(value) <= NAME_CHARS and value not in (".", "..") and len(value) <= 200)
    problems.check(ok, "name", value, "must be one path segment of letters, digits, '.', '_' or '-' (not '.' or '..')")


MAX_OBJECT_MB_HELP = (
    "largest image object read, in MB (bigger ones get a too_large error row; on S3 judged from the object's size "
    "before the GET); only regular files are read (no FIFOs, devices or sockets)"
)


def check_choice(problems: Problems, cfg: Any, name: str) -> None:
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(cfg)}[name]
    value = getattr(cfg, name)
    problems.check(value in choices, name, value, f"must be one of {', '.join(map(str, choices))}")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X`, `X | None`, `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_value(tp: Any, raw: Any, name: str) -> Any:
    """Coerce a YAML or command-line value to a field's type."""
    inner, optional = _base_type(tp)
    if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("none", "null", "")):
        return None
    try:
        if inner is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typing.get_origin(inner) in (tuple, list):
            item_type = typing.get_args(inner)[0]
            items = raw if isinstance(raw, (list, tuple)) else [x for x in str(raw).split(",") if x.strip()]
            return typing.get_origin(inner)(item_type(x) for x in items)
        if inner in (int, float, str):
            if inner is int and isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return inner(raw)
    except (TypeError, ValueError):
        expected = getattr(inner, "__name__", str(inner))
        raise ConfigError(f"config: {flag(name)} {raw!r}: expected {expected}") from None
    return raw


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field; defaults stay None so that YAML values are only overridden when given."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with these options (flags override it)")
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        inner, _ = _base_type(types_[f.name])
        help_text = f.metadata.get("help", "")
        default = None if f.default is dataclasses.MISSING else f.default
        if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if not required:
            help_text += f" (default: {default})"
        else:
            help_text += " (required)"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if inner is bool:  # --x/--no-x; a field named no_x is its own flag (--no-x), never --no-no-x
            kwargs["action"] = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        parser.add_argument(flag(f.name), **kwargs)


def read_yaml(path: str) -> dict:
    from distcls import storage

    text = storage.read_text(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"config: {path} is not valid YAML ({first}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_config(cls: type[C], config_path: str | None = None, overrides: dict | None = None) -> C:
    """YAML file (optional) + overrides (flags; None means 'not given') -> a validated config."""
    values: dict[str, Any] = {}
    source = "flags"
    if config_path:
        values.update(read_yaml(config_path))
        source = config_path
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    types_ = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"config: unknown option(s) {', '.join(unknown)} in {source}; valid ones: {', '.join(sorted(names))}")
    missing = [n for n in names if n not in values and _is_required(cls, n)]
    if missing:
        raise ConfigError(f"config: missing required option(s) {', '.join(flag(m) for m in sorted(missing))}")
    parsed = {k: parse_value(types_[k], v, k) for k, v in values.items()}
    return cls(**parsed)


def _is_required(cls: type, name: str) -> bool:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls) if f.init}
    return load_config(cls, getattr(args, "config", None), overrides)


def to_dict(cfg: Any) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


# --- job configs -------------------------------------------------------------------------------------

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass
class FashionMnistConfig:
    """`distcls data fashion-mnist`: the official IDX files -> PNGs in an ImageFolder layout."""

    out: str = opt(help="where to write: URI/train/<class>/<index>.png and URI/test/<class>/<index>.png")
    limit_per_class: int | None = opt(None, help="write at most N images per class and split")
    source: str | None = opt(
        None,
        help="folder with the IDX files (.gz or raw); else $DISTCLS_DATA_DIR, else "
        f"{FASHION_MNIST_DEFAULT_DIR}, else download (MD5-checked)",
    )
    splits: tuple[str, ...] = opt(("train", "test"), help="which splits to write, comma-separated")
    workers: int = opt(16, help="concurrent uploads")

    def __post_init__(self) -> None:
        p = Problems()
        p.check(bool(self.out), "out", self.out, "give an output URI, e.g. s3://bucket/fashion-mnist")
        p.check(
            self.limit_per_class is None or self.limit_per_class > 0,
            "limit_per_class",
            self.limit_per_class,
            "must be a positive number of images",
        )
        bad = [s for s in self.splits if s not in ("train", "test")]
        p.check(not bad and bool(self.splits), "splits", ",".join(self.splits), "use train, test or train,test")
        p.check(1 <= self.workers <= 256, "workers", self.workers, "must be between 1 and 256")
        p.raise_if_any("data fashion-mnist")

    def resolved_source(self) -> str | None:
        return self.source or os.environ.get("DISTCLS_DATA_DIR") or None


@dataclass
class S3ServerConfig:
    """`distcls s3-server`: an S3-compatible server on loopback until interrupted."""

    host: str = opt("127.0.0.1", help="address to listen on; keep loopback unless you mean to expose it")
    port: int = opt(9000, help="port to listen on (0 picks a free one)")

    def __post_init__(self) -> None:
        p = Problems()
        p.check(0 <= self.port <= 65535, "port", self.port, "must be between 0 and 65535")
        p.check(bool(self.host), "host", self.host, "give an address such as 127.0.0.1")
        p.raise_if_any("s3-server")


@dataclass
class DemoConfig:
    """`distcls demo`: the whole product end to end on real data."""

    train_per_class: int = opt(1000, help="Fashion-MNIST training images per class (of 6,000)")
    test_per_class: int | None = opt(None, help="test images per class (default: all 1,000, the full split)")
    full: bool = opt(False, help="use all 70,000 Fashion-MNIST images")
    image_size: int = opt(64, help="model input size in pixels")
    epochs: int = opt(3, help="fine-tuning epochs")
    label_images: int = opt(200, help="test images copied without their folders to the 'unlabeled' prefix")
    serve_requests: int = opt(20, help="HTTP requests (one test image each) sent to the endpoint")
    bucket: str | None = opt(None, help="use this storage URI instead of the embedded S3 server")
    s3_port: int = opt(0, help="port of the embedded S3 server (0 picks a free one)")
    out: str = opt("demo-out", help="local folder for reports and labels")

    def __post_init__(self) -> None:
        p = Problems()
        p.check(self.train_per_class >= 2, "train_per_class", self.train_per_class, "must be at least 2")
        p.check(self.test_per_class is None or self.test_per_class > 0, "test_per_class", self.test_per_class, "must be positive")
        p.check(16 <= self.image_size <= 512, "image_size", self.image_size, "must be between 16 and 512")
        p.check(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        p.check(self.label_images >= 1, "label_images", self.label_images, "must be at least 1")
        p.check(self.serve_requests >= 1, "serve_requests", self.serve_requests, "must be at least 1")
        p.raise_if_any("demo")


OPTIMIZERS = ("sgd", "adamw")
FREEZE = ("none", "backbone")
CLASS_WEIGHTS = ("none", "balanced")
PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
AUGMENT_POLICIES = ("none", "flip", "trivialaugment", "randaugment")
LOSSES = ("ce", "focal", "class-balanced")
SAMPLERS = ("uniform", "balanced")


@dataclass
class TrainConfig:
    """`distcls train`: fine-tune a pretrained classifier with Ray Train (DDP over num_workers)."""

    data: str = opt(help="training data: an ImageFolder prefix (URI/<class>/<image>) or a manifest file")
    val_data: str | None = opt(None, help="validation data (same forms); else a stratified split of --data")
    val_fraction: float = opt(0.1, help="share of --data held out for validation when --val-data is not given")
    model: str = opt("efficientnet_lite0", help="architecture (see `distcls models`)")
    weights: str = opt("bundled", help="bundled, none, a torchvision weights name, or a .safetensors/.pt URI")
    epochs: int = opt(3, help="passes over the training data")
    batch_size: int = opt(32, help="images per step per worker")
    lr: float | None = opt(None, help="peak learning rate of the head (default: 0.05 for sgd, 1e-3 for adamw)")
    backbone_lr_scale: float | None = opt(
        None, help="backbone learning rate = lr * this (pretrained weights only; default: auto, 1.0)"
    )
    optimizer: str = opt("adamw", help="optimizer", choices=OPTIMIZERS)
    momentum: float = opt(0.9, help="SGD momentum")
    weight_decay: float = opt(0.01, help="weight decay (never on norm layers or biases)")
    warmup_epochs: float | None = opt(
        None, help="linear warmup length in epochs, then cosine decay to 0 (default: auto, a tenth of the run)"
    )
    label_smoothing: float | None = opt(None, help="label smoothing of the cross-entropy loss (default: auto, 0.1)")
    freeze: str = opt("none", help="none, or backbone for a linear probe", choices=FREEZE)
    image_size: int | None = opt(None, help="model input size (default: the model's own, 224)")
    random_crops: bool | None = opt(
        None,
        help="random resized crops of training images (default: auto, by the "
        "run's number of steps; printed at start as the recipe)",
    )
    crop_scale_min: float | None = opt(
        None, help="smallest random crop as a share of the image area (default: auto: 0.35, or 0.08 for long runs)"
    )
    augment: str = opt(
        "none",
        help="augmentation policy on top of the crops: none; flip (random horizontal flips); trivialaugment or "
        "randaugment (flips plus torchvision's TrivialAugmentWide / RandAugment). Flips change the class of "
        "digits, text and other handed images",
        choices=AUGMENT_POLICIES,
    )
    mixup: float = opt(0.0, help="mixup alpha: blend pairs of images and their targets (0: off; timm uses 0.2-0.8)")
    cutmix: float = opt(0.0, help="cutmix alpha: paste a box of another image (0: off); with --mixup, one of the two per batch")
    ema: float | None = opt(
        None, help="keep an exponential moving average of the weights with this decay (e.g. 0.999); it is evaluated and saved"
    )
    cache_data: bool | None = opt(
        None,
        help="decode the training images once into Ray's object store instead of "
        "streaming them every epoch (default: auto, when they fit in 2 GB)",
    )
    loss: str = opt(
        "ce",
        help="ce (cross-entropy), focal (Lin et al. 2017, --focal-gamma) or class-balanced (cross-entropy weighted "
        "by the effective number of samples per class, Cui et al. 2019, --cb-beta)",
        choices=LOSSES,
    )
    focal_gamma: float = opt(2.0, help="focusing parameter of --loss focal")
    cb_beta: float = opt(0.999, help="beta of --loss class-balanced: weight (1 - beta) / (1 - beta^n) for a class of n images")
    class_weights: str = opt("none", help="loss weights per class for imbalanced data (inverse frequency)", choices=CLASS_WEIGHTS)
    sampler: str = opt(
        "uniform",
        help="uniform (every image once per epoch) or balanced (each class drawn equally often: rare classes "
        "repeat, common ones are subsampled to the same epoch size)",
        choices=SAMPLERS,
    )
    seed: int = opt(0, help="random seed (split, init, shuffling)")
    max_object_mb: float = opt(256.0, help=MAX_OBJECT_MB_HELP)
    ordered_ingest: bool = opt(
        True,
        help="training batches in a fixed order, so that a run restored from a "
        "checkpoint replays its lost epochs exactly (--no-ordered-ingest: Ray Data's "
        "unordered, sometimes faster, streaming)",
    )
    num_workers: int = opt(2, help="Ray Train workers (DDP processes)")
    use_gpu: bool = opt(False, help="one GPU per worker, bf16 autocast and channels_last")
    cpus_per_worker: float = opt(1.0, help="CPUs reserved per training worker")
    placement_strategy: str = opt("PACK", help="where workers go: PACK or SPREAD over nodes", choices=PLACEMENT)
    max_failures: int = opt(0, help="worker failures to recover from (from the latest checkpoint); -1 = unlimited")
    storage: str = opt("runs", help="run storage: a local folder or s3:// / gs:// URI")
    name: str | None = opt(None, help="run name: the run lives in <storage>/<name>/ (default: train-<timestamp>)")
    resume: bool = opt(False, help="continue the run <storage>/<name> from its latest checkpoint")
    keep: int = opt(2, help="checkpoints to keep, best by validation accuracy (the latest is also kept)")
    tracking_uri: str | None = opt(
        None,
        help="log params, per-epoch metrics, curves and the checkpoint to MLflow: a local folder (a file store) or a server URI",
    )
    experiment: str = opt("distcls", help="MLflow experiment name (with --tracking-uri)")

    def __post_init__(self) -> None:
        from distcls.models import REGISTRY

        p = Problems()
        p.check(bool(self.data), "data", self.data, "give a training data URI")
        p.check(self.model in REGISTRY, "model", self.model, f"must be one of {', '.join(REGISTRY)}")
        p.check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "must be between 0 and 1")
        p.check(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        p.check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        p.check(self.lr is None or self.lr > 0, "lr", self.lr, "must be positive")
        p.check(
            self.backbone_lr_scale is None or 0 <= self.backbone_lr_scale <= 1,
            "backbone_lr_scale",
            self.backbone_lr_scale,
            "must be in [0, 1]",
        )
        for name in ("optimizer", "freeze", "class_weights", "placement_strategy", "augment", "loss", "sampler"):
            check_choice(p, self, name)
        p.check(self.mixup >= 0, "mixup", self.mixup, "must be >= 0 (0 turns it off)")
        p.check(self.cutmix >= 0, "cutmix", self.cutmix, "must be >= 0 (0 turns it off)")
        p.check(self.ema is None or 0 < self.ema < 1, "ema", self.ema, "must be a decay in (0, 1), e.g. 0.999")
        p.check(self.focal_gamma >= 0, "focal_gamma", self.focal_gamma, "must be >= 0")
        p.check(0 < self.cb_beta < 1, "cb_beta", self.cb_beta, "must be in (0, 1), e.g. 0.999")
        p.check(
            not (self.loss == "class-balanced" and self.class_weights != "none"),
            "class_weights",
            self.class_weights,
            "--loss class-balanced brings its own class weights; drop --class-weights",
        )
        p.check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        p.check(self.warmup_epochs is None or self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "must be >= 0")
        p.check(
            self.label_smoothing is None or 0 <= self.label_smoothing < 1,
            "label_smoothing",
            self.label_smoothing,
            "must be in [0, 1)",
        )
        p.check(
            self.crop_scale_min is None or 0 < self.crop_scale_min <= 1,
            "crop_scale_min",
            self.crop_scale_min,
            "must be in (0, 1]",
        )
        p.check(
            self.image_size is None or 16 <= self.image_size <= 1024, "image_size", self.image_size, "must be between 16 and 1024"
        )
        p.check(self.num_workers >= 1, "num_workers", self.num_workers, "must be at least 1")
        p.check(self.max_failures >= -1, "max_failures", self.max_failures, "must be -1 (unlimited) or >= 0")
        p.check(self.keep >= 1, "keep", self.keep, "must be at least 1")
        p.check(
            not (self.freeze == "backbone" and self.weights == "none"),
            "freeze",
            self.freeze,
            "a linear probe needs pretrained --weights, not none",
        )
        check_run_name(p, self.name)
        p.check(self.max_object_mb > 0, "max_object_mb", self.max_object_mb, "must be positive")
        p.check(not (self.resume and self.name is None), "resume", self.resume, "needs --name of the run to resume")
        p.raise_if_any("train")
        if self.lr is None:
            self.lr = 0.05 if self.optimizer == "sgd" else 1e-3


@dataclass
class DistillConfig(TrainConfig):
    """`distcls distill`: train a small student on a teacher checkpoint's soft targets plus the labels.

    Everything `distcls train` has (DDP, checkpoints, fault tolerance, reports); --student replaces --model.
    Loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(labels).
    """

    teacher: str = opt(help="teacher checkpoint URI (verified; its own preprocessing is used)", kw_only=True)
    student: str = opt("mobilenet_v3_small", help="student architecture (see `distcls models`)", kw_only=True)
    temperature: float = opt(4.0, help="softening temperature T of both distributions", kw_only=True)
    alpha: float = opt(0.7, help="weight of the distillation term (1 - alpha goes to the labels' loss)", kw_only=True)

    def __post_init__(self) -> None:
        from distcls.models import REGISTRY

        p = Problems()
        p.check(bool(self.teacher), "teacher", self.teacher, "give the teacher's checkpoint URI")
        p.check(self.student in REGISTRY, "student", self.student, f"must be one of {', '.join(REGISTRY)}")
        p.check(
            self.model in (self.student, TrainConfig.model),
            "model",
            self.model,
            "distill takes the architecture from --student; drop --model",
        )
        p.check(0 < self.temperature <= 100, "temperature", self.temperature, "must be in (0, 100]")
        p.check(0 <= self.alpha <= 1, "alpha", self.alpha, "must be in [0, 1]")
        p.check(
            self.weights != "bundled" or self.student not in REGISTRY or REGISTRY[self.student].bundled,
            "weights",
            self.weights,
            f"{self.student} has no bundled weights; pass --weights none (random "
            "init), a torchvision weights name or a weights file",
        )
        p.raise_if_any("distill")
        self.model = self.student
        super().__post_init__()


SOUP_METHODS = ("greedy", "uniform")


@dataclass
class SoupConfig:
    """`distcls soup`: average the weights of fine-tuned checkpoints of one architecture (Wortsman et al. 2022)."""

    checkpoints: tuple[str, ...] = opt(help="checkpoint directory URIs (the ingredients), comma-separated or repeated")
    data: str = opt(help="labeled validation data the greedy soup is chosen on and every soup is scored on")
    out: str = opt(help="checkpoint directory URI to write the soup to")
    method: str = opt(
        "greedy",
        help="greedy (ingredients by validation accuracy, each kept only if the soup's accuracy rises) or uniform (all)",
        choices=SOUP_METHODS,
    )
    batch_size: int = opt(128, help="images per forward pass")
    use_gpu: bool = opt(False, help="score on a GPU")

    def __post_init__(self) -> None:
        p = Problems()
        check_required(p, self, "data", "out")
        p.check(len(self.checkpoints) >= 1, "checkpoints", ",".join(self.checkpoints), "give at least one checkpoint URI")
        p.check(
            len(set(self.checkpoints)) == len(self.checkpoints),
            "checkpoints",
            ",".join(self.checkpoints),
            "names a checkpoint twice; give each once",
        )
        check_choice(p, self, "method")
        p.check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        p.raise_if_any("soup")


@dataclass
class TuneConfig:
    """`distcls tune`: a Ray Tune search over `distcls train` runs, ASHA stopping the weak trials early."""

    data: str = opt(help="training data: an ImageFolder prefix or a manifest file (as for train)")
    val_data: str | None = opt(None, help="validation data; else a stratified split of --data (the same for every trial)")
    val_fraction: float = opt(0.1, help="share of --data held out for validation when --val-data is not given")
    model: str = opt("efficientnet_lite0", help="architecture (see `distcls models`)")
    weights: str = opt("bundled", help="pretrained weights, as for train")
    image_size: int | None = opt(None, help="model input size (default: the model's own)")
    batch_size: int = opt(32, help="images per step per worker")
    trials: int = opt(8, help="trials (configurations drawn from the search space)")
    max_concurrent: int = opt(1, help="trials running at once")
    num_workers: int = opt(1, help="Ray Train workers per trial")
    cpus_per_worker: float = opt(1.0, help="CPUs per training worker of a trial")
    use_gpu: bool = opt(False, help="one GPU per training worker")
    lr: tuple[float, ...] = opt((3e-4, 3e-3), help="learning rate range LOW,HIGH (log-uniform) or one value")
    weight_decay: tuple[float, ...] = opt((1e-3, 0.1), help="weight decay range LOW,HIGH (log-uniform) or one value")
    backbone_lr_scale: tuple[float, ...] = opt((0.3, 1.0), help="backbone lr scales to choose from")
    augment: tuple[str, ...] = opt(("none", "flip", "trivialaugment"), help="augmentation policies to choose from")
    mixup: tuple[float, ...] = opt((0.0, 0.2), help="mixup alphas to choose from")
    epochs: tuple[int, ...] = opt((3, 5), help="epoch counts to choose from; ASHA stops trials early in epochs")
    grace_period: int = opt(1, help="ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: int = opt(2, help="ASHA: keep the top 1/N of trials at each rung")
    seed: int = opt(0, help="seed of the search and of every trial")
    soup: bool = opt(False, help="soup the top trials' best checkpoints (greedy) into <run>/soup")
    soup_top: int = opt(4, help="trials the soup takes its ingredients from (best first)")
    storage: str = opt("runs", help="where the search lives: a local folder or s3:// / gs:// URI")
    name: str | None = opt(None, help="search name: <storage>/<name>/ (default: tune-<timestamp>)")
    resume: bool = opt(False, help="continue the search <storage>/<name> (finished trials are kept, the rest resume)")
    tracking_uri: str | None = opt(None, help="log every trial to MLflow (a local folder or a server URI)")
    experiment: str = opt("distcls-tune", help="MLflow experiment name (with --tracking-uri)")
    trust_tune_state: bool = opt(
        False,
        help="with --resume: the search folder is trusted (Ray Tune's tuner.pkl and trial state are pickles that "
        "run code when loaded; only you must be able to write <storage>/<name>)",
    )

    def __post_init__(self) -> None:
        from distcls.models import REGISTRY

        p = Problems()
        check_required(p, self, "data")
        p.check(self.model in REGISTRY, "model", self.model, f"must be one of {', '.join(REGISTRY)}")
        p.check(self.trials >= 1, "trials", self.trials, "must be at least 1")
        p.check(self.max_concurrent >= 1, "max_concurrent", self.max_concurrent, "must be at least 1")
        p.check(self.num_workers >= 1, "num_workers", self.num_workers, "must be at least 1")
        for name in ("lr", "weight_decay"):
            values = getattr(self, name)
            p.check(
                1 <= len(values) <= 2 and all(v > 0 for v in values) and values[0] <= values[-1],
                name,
                ",".join(map(str, values)),
                "give LOW,HIGH (0 < LOW <= HIGH) or one positive value",
            )
        p.check(
            bool(self.backbone_lr_scale) and all(0 <= v <= 1 for v in self.backbone_lr_scale),
            "backbone_lr_scale",
            ",".join(map(str, self.backbone_lr_scale)),
            "values must be in [0, 1]",
        )
        p.check(
            bool(self.augment) and set(self.augment) <= set(AUGMENT_POLICIES),
            "augment",
            ",".join(self.augment),
            f"must be of {', '.join(AUGMENT_POLICIES)}",
        )
        p.check(bool(self.mixup) and all(v >= 0 for v in self.mixup), "mixup", ",".join(map(str, self.mixup)), "must be >= 0")
        p.check(bool(self.epochs) and all(v >= 1 for v in self.epochs), "epochs", ",".join(map(str, self.epochs)), "must be >= 1")
        top = max(self.epochs or (1,))
        p.check(1 <= self.grace_period <= top, "grace_period", self.grace_period, "must be in [1, max epochs]")
        p.check(self.reduction_factor >= 2, "reduction_factor", self.reduction_factor, "must be at least 2")
        p.check(self.soup_top >= 2, "soup_top", self.soup_top, "a soup needs at least 2 ingredients")
        check_run_name(p, self.name)
        p.check(not (self.resume and self.name is None), "resume", self.resume, "needs --name of the search to resume")
        p.check(
            not (self.resume and not self.trust_tune_state),
            "resume",
            self.resume,
            "unpickles Ray Tune's search state (<storage>/<name>/tuner.pkl, which runs code as you): give "
            "--trust-tune-state if only you can write that folder",
        )
        p.raise_if_any("tune")


EXPORT_FORMATS = ("onnx", "torchscript")


@dataclass
class ExportConfig:
    """`distcls export`: a checkpoint as ONNX or TorchScript (optionally int8) that label and serve can run."""

    checkpoint: str = opt(help="checkpoint directory URI to export")
    out: str = opt(help="export directory URI to write (distcls.json + model.onnx or model.ts)")
    sample: str = opt(
        help="real images to check the export against the checkpoint (and calibrate int8): an "
        "ImageFolder prefix, a manifest, or any prefix of images"
    )
    format: str = opt("onnx", help="onnx (run by onnxruntime) or torchscript (run by torch)", choices=EXPORT_FORMATS)
    quantize: str = opt("none", help="none, or int8 weights and activations (ONNX only)", choices=("none", "int8"))
    calibration: str = opt(
        "static",
        help="int8: static (activation ranges calibrated on --sample images) or dynamic (weights only ahead of time)",
        choices=("static", "dynamic"),
    )
    sample_size: int = opt(200, help="images of --sample the top-1 agreement is checked on")
    calibration_size: int = opt(64, help="images of --sample used for int8 static calibration")
    min_agreement: float = opt(
        0.95, help="refuse the export when its top-1 agrees with the checkpoint's on fewer than this share of the sample images"
    )
    opset: int = opt(18, help="ONNX opset version (the torch.export-based exporter needs 18 or later)")

    def __post_init__(self) -> None:
        p = Problems()
        for name in ("checkpoint", "out", "sample"):
            p.check(bool(getattr(self, name)), name, getattr(self, name), "is required")
        for name in ("format", "quantize", "calibration"):
            check_choice(p, self, name)
        p.check(
            not (self.quantize == "int8" and self.format == "torchscript"),
            "quantize",
            self.quantize,
            "int8 is supported for --format onnx only (torch.ao quantization is deprecated in torch 2.14)",
        )
        p.check(self.sample_size >= 1, "sample_size", self.sample_size, "must be at least 1")
        p.check(self.calibration_size >= 1, "calibration_size", self.calibration_size, "must be at least 1")
        p.check(0 <= self.min_agreement <= 1, "min_agreement", self.min_agreement, "must be in [0, 1]")
        p.check(18 <= self.opset <= 23, "opset", self.opset, "must be between 18 and 23")
        p.raise_if_any("export")


@dataclass
class CompareConfig:
    """`distcls compare`: checkpoints and exports side by side on one test split (accuracy against speed)."""

    models: tuple[str, ...] = opt(help="checkpoint or export directory URIs")
    data: str = opt(help="labeled test data: an ImageFolder prefix or a manifest file")
    out: str = opt("compare", help="folder (or URI) for compare.json, compare.md and compare.png")
    names: tuple[str, ...] = opt((), help="display names, one per model, comma-separated (default: derived)")
    limit_per_class: int | None = opt(None, help="evaluate at most N images per class (default: all)")
    batch_size: int = opt(32, help="images per forward pass, the same for every model")
    threads: int = opt(1, help="torch / onnxruntime threads, the same for every model")
    speed_batches: int = opt(20, help="timed batches per model for images/s (after warm-up batches)")
    warmup_batches: int = opt(3, help="untimed batches per model before timing")
    runtime: str = opt("auto", help=RUNTIME_HELP, choices=RUNTIMES)

    def __post_init__(self) -> None:
        p = Problems()
        check_choice(p, self, "runtime")
        p.check(len(self.models) >= 1, "models", ",".join(self.models), "give at least one checkpoint or export")
        p.check(bool(self.data), "data", self.data, "give a labeled test split")
        p.check(
            not self.names or len(self.names) == len(self.models),
            "names",
            ",".join(self.names),
            f"give one name per model ({len(self.models)})",
        )
        p.check(
            self.limit_per_class is None or self.limit_per_class >= 1,
            "limit_per_class",
            self.limit_per_class,
            "must be at least 1",
        )
        p.check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        p.check(self.threads >= 1, "threads", self.threads, "must be at least 1")
        p.check(self.speed_batches >= 1, "speed_batches", self.speed_batches, "must be at least 1")
        p.check(self.warmup_batches >= 0, "warmup_batches", self.warmup_batches, "must be >= 0")
        p.raise_if_any("compare")


@dataclass
class EvaluateConfig:
    """`distcls evaluate`: metrics of a checkpoint over a whole labeled split."""

    checkpoint: str = opt(help="checkpoint directory URI (holds model.safetensors and distcls.json)")
    data: str = opt(help="labeled data: an ImageFolder prefix or a manifest file")
    out: str = opt(help="folder (or URI) for report.json, report.md and confusion_matrix.png")
    batch_size: int = opt(64, help="images per forward pass")
    concurrency: int = opt(1, help="model replicas (Ray actors) evaluating in parallel")
    num_gpus: float = opt(0, help="GPUs per replica")
    runtime: str = opt("auto", help=RUNTIME_HELP, choices=RUNTIMES)
    max_object_mb: float = opt(256.0, help=MAX_OBJECT_MB_HELP)

    def __post_init__(self) -> None:
        p = Problems()
        check_choice(p, self, "runtime")
        check_required(p, self, "checkpoint", "data", "out")
        p.check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        p.check(self.concurrency >= 1, "concurrency", self.concurrency, "must be at least 1")
        p.check(self.num_gpus >= 0, "num_gpus", self.num_gpus, "must be >= 0")
        p.check(self.max_object_mb > 0, "max_object_mb", self.max_object_mb, "must be positive")
        p.raise_if_any("evaluate")


@dataclass
class FromPretrainedConfig:
    """`distcls checkpoint from-pretrained`: the pretrained ImageNet classifier as a checkpoint."""

    out: str = opt(help="checkpoint directory URI to write")
    model: str = opt("efficientnet_lite0", help="architecture")
    weights: str = opt("bundled", help="bundled or a torchvision weights name")
    image_size: int | None = opt(None, help="input size (default: the model's own)")


@dataclass
class BenchConfig:
    """`distcls bench`: measured ratios against plain PyTorch, side by side in one run."""

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
            "all",
        ),
    )
    model: str = opt("efficientnet_lite0", help="architecture for the train benchmark")
    images_per_class: int = opt(20, help="Fashion-MNIST images per class for the train benchmark")
    image_size: int = opt(64, help="model input size")
    batch_size: int = opt(32, help="images per step per worker")
    epochs: int = opt(3, help="epochs of the train benchmark (the first is warm-up)")
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
    recipe_epochs: int = opt(3, help="epochs of every recipe benchmark run (the fixed budget)")
    recipe_model: str = opt("efficientnet_lite0", help="pretrained architecture of the recipe benchmark")
    recipe_test_per_class: int | None = opt(
        None, help="Fashion-MNIST test images per class the recipe runs are scored on (default: the whole test split)"
    )
    recipe_seeds: int = opt(3, help="seeds averaged for recipe settings of up to 2,000 training images")
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
    objects: int = opt(10_000, help="scale benchmark (not in `all`): 32x32 PNGs labeled by `distcls label`")
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
    work_dir: str | None = opt(
        None, help="imbalance, modern and tune benchmarks: folder for their data and runs (default: a temporary folder)"
    )
    out: str = opt("bench.json", help="where to write every figure (JSON)")

    def __post_init__(self) -> None:
        p = Problems()
        check_choice(p, self, "which")
        known = ("calibration", "ood", "label_issues", "dedup", "dedup_scale")
        p.check(set(self.trust_parts) <= set(known), "trust_parts", ",".join(self.trust_parts), f"must be of {', '.join(known)}")
        check_choice(p, self, "label_storage")
        check_choice(p, self, "store")
        p.check(self.objects >= 1, "objects", self.objects, "must be at least 1")
        p.check(self.images_per_class >= 4, "images_per_class", self.images_per_class, "must be at least 4")
        p.check(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        p.check(all(w >= 1 for w in self.workers), "workers", self.workers, "worker counts must be >= 1")
        from distcls.models import REGISTRY

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
        p.check(self.recipe_seeds >= 1, "recipe_seeds", self.recipe_seeds, "must be at least 1")
        p.check(self.recipe_epochs >= 1, "recipe_epochs", self.recipe_epochs, "must be at least 1")
        for name in ("model", "label_model", "recipe_model"):
            p.check(getattr(self, name) in REGISTRY, name, getattr(self, name), f"must be one of {', '.join(REGISTRY)}")
        p.raise_if_any("bench")


@dataclass
class LabelConfig:
    """`distcls label`: label every image object under a prefix (or in a manifest) into Parquet, one row each."""

    output: str = opt(
        help="folder/prefix for the Parquet parts, the plan (_plan/) and _SUCCESS.json; reruns add only what is missing"
    )
    checkpoint: str = opt("", help="checkpoint directory URI (required unless --status)")
    input: str = opt(
        "",
        help="prefix to label, recursively (jpg, jpeg, png, webp, bmp, gif, tif, tiff); with "
        "--manifest, the prefix its `key` column is relative to",
    )
    manifest: str | None = opt(
        None,
        help="label the keys of this list instead of listing --input: CSV, Parquet or "
        "JSONL with a `path` (full URI) or `key` (below --input) column, or an S3 Inventory "
        "manifest.json",
    )
    status: bool = opt(False, help="print what --output holds (planned, written, errors, complete) and exit")
    replan: bool = opt(False, help="list the input again instead of using the stored plan (new objects)")
    top_k: int = opt(5, help="labels and scores kept per image")
    batch_size: int = opt(64, help="images per forward pass")
    concurrency: tuple[int, ...] = opt((1,), help="model replicas: N, or MIN,MAX to autoscale")
    num_gpus: float = opt(0, help="GPUs per model replica")
    cpus_per_replica: float = opt(1.0, help="CPUs (and torch threads) per model replica")
    include: str | None = opt(
        None,
        help="glob on the path below --input (or the file name) instead of the extension filter, e.g. '*.jpg' or 'cams/*/*.png'",
    )
    part_rows: int = opt(2000, help="rows per Parquet part: the unit of progress a restart keeps")
    part_mb: float = opt(64.0, help="largest Parquet part in MB (a bigger batch is split)")
    runtime: str = opt("auto", help=RUNTIME_HELP, choices=RUNTIMES)
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
    max_object_mb: float = opt(256.0, help=MAX_OBJECT_MB_HELP)
    allow_any_path: bool = opt(
        False,
        help="read manifest or plan paths anywhere the credentials reach (by default every path must stay under "
        "--input, or under one prefix of the manifest's)",
    )

    def __post_init__(self) -> None:
        p = Problems()
        check_choice(p, self, "runtime")
        check_choice(p, self, "pipeline")
        p.check(bool(self.output), "output", self.output, "is required")
        if not self.status:
            p.check(bool(self.checkpoint), "checkpoint", self.checkpoint, "is required")
            p.check(bool(self.input or self.manifest), "input", self.input, "is required (or give --manifest)")
        p.check(self.top_k >= 1, "top_k", self.top_k, "must be at least 1")
        p.check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        c = self.concurrency
        p.check(
            len(c) in (1, 2) and min(c) >= 1 and c[0] <= c[-1],
            "concurrency",
            ",".join(map(str, c)),
            "give N or MIN,MAX with 1 <= MIN <= MAX",
        )
        p.check(self.num_gpus >= 0, "num_gpus", self.num_gpus, "must be >= 0")
        p.check(self.part_rows >= 1, "part_rows", self.part_rows, "must be at least 1")
        p.check(self.part_mb > 0, "part_mb", self.part_mb, "must be positive")
        p.check(self.cpus_per_replica > 0, "cpus_per_replica", self.cpus_per_replica, "must be positive")
        p.check(self.max_object_mb > 0, "max_object_mb", self.max_object_mb, "must be positive")
        check_unknown(p, self.unknown)
        p.check(
            not (self.embeddings and self.runtime == "onnx"),
            "embeddings",
            self.embeddings,
            "come from the torch runtime; drop --runtime onnx",
        )
        p.raise_if_any("label")


@dataclass
class ServeConfig:
    """`distcls serve` / `serve-config`: the online endpoint on Ray Serve."""

    checkpoint: str = opt(help="checkpoint directory URI (change it on a running app to switch models)")
    host: str = opt("127.0.0.1", help="address the HTTP proxy binds; 0.0.0.0 exposes it to the network")
    port: int = opt(8000, help="HTTP port")
    min_replicas: int = opt(1, help="fewest classifier replicas (autoscaling lower bound)")
    max_replicas: int = opt(4, help="most classifier replicas (autoscaling upper bound)")
    target_ongoing_requests: float = opt(8.0, help="autoscaling target: in-flight requests per replica")
    upscale_delay_s: float = opt(30.0, help="autoscaling: seconds of load above target before adding replicas")
    downscale_delay_s: float = opt(
        600.0,
        help="autoscaling: seconds of load below target before removing replicas "
        "(also the idle time before scaling to zero with --min-replicas 0)",
    )
    look_back_period_s: float = opt(
        30.0, help="autoscaling: seconds of request metrics each decision averages (more than Ray Serve's 10 s metrics interval)"
    )
    downscale_to_zero_delay_s: float | None = opt(
        None,
        help="autoscaling: seconds at 1 replica without requests "
        "before going to 0 with --min-replicas 0 (default: --downscale-delay-s)",
    )
    max_batch_size: int = opt(32, help="most images per forward pass (@serve.batch)")
    unknown: str = opt(
        "off",
        help="predictions whose OOD (energy) score is past a threshold get label `unknown` (top-k kept): off, auto "
        "(the calibrated checkpoint's threshold) or a number",
    )
    runtime: str = opt("auto", help=RUNTIME_HELP, choices=RUNTIMES)
    batch_wait_timeout_s: float = opt(0.01, help="longest wait for a batch to fill")
    num_gpus: float = opt(0, help="GPUs per classifier replica")
    cpus_per_replica: float = opt(1.0, help="CPUs (and torch threads) per classifier replica")
    max_request_mb: float = opt(10.0, help="largest request body in MB; bigger bodies get 413")
    max_images_per_request: int = opt(64, help="most images in one request")
    top_k: int = opt(5, help="default number of labels per prediction (requests may ask for another)")
    max_ongoing_requests: int = opt(64, help="requests one classifier replica works on at once")
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

    def __post_init__(self) -> None:
        p = Problems()
        p.check(bool(self.checkpoint), "checkpoint", self.checkpoint, "is required")
        p.check(0 < self.port < 65536, "port", self.port, "must be 1..65535")
        p.check(self.min_replicas >= 0, "min_replicas", self.min_replicas, "must be >= 0")
        p.check(
            self.max_replicas >= max(1, self.min_replicas),
            "max_replicas",
            self.max_replicas,
            "must be at least 1 and at least --min-replicas",
        )
        p.check(self.target_ongoing_requests > 0, "target_ongoing_requests", self.target_ongoing_requests, "must be positive")
        p.check(self.upscale_delay_s >= 0, "upscale_delay_s", self.upscale_delay_s, "must be >= 0")
        p.check(self.downscale_delay_s >= 0, "downscale_delay_s", self.downscale_delay_s, "must be >= 0")
        p.check(
            self.look_back_period_s > 10,
            "look_back_period_s",
            self.look_back_period_s,
            "must be more than 10 (Ray Serve's metrics interval)",
        )
        p.check(
            self.downscale_to_zero_delay_s is None or self.downscale_to_zero_delay_s >= 0,
            "downscale_to_zero_delay_s",
            self.downscale_to_zero_delay_s,
            "must be >= 0",
        )
        check_choice(p, self, "runtime")
        p.check(self.max_batch_size >= 1, "max_batch_size", self.max_batch_size, "must be at least 1")
        check_unknown(p, self.unknown)
        p.check(self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s", self.batch_wait_timeout_s, "must be >= 0")
        p.check(self.num_gpus >= 0, "num_gpus", self.num_gpus, "must be >= 0")
        p.check(self.cpus_per_replica > 0, "cpus_per_replica", self.cpus_per_replica, "must be positive")
        p.check(self.max_request_mb > 0, "max_request_mb", self.max_request_mb, "must be positive")
        p.check(self.max_images_per_request >= 1, "max_images_per_request", self.max_images_per_request, "must be at least 1")
        p.check(self.top_k >= 1, "top_k", self.top_k, "must be at least 1")
        p.check(self.max_ongoing_requests >= 1, "max_ongoing_requests", self.max_ongoing_requests, "must be at least 1")
        p.check(
            self.max_queued_requests >= 1,
            "max_queued_requests",
            self.max_queued_requests,
            "must be at least 1 (overload answers 503 instead of queueing without bound)",
        )
        p.check(bool(self.name), "name", self.name, "must not be empty")
        p.raise_if_any("serve")


@dataclass
class CalibrateConfig:
    """`distcls calibrate`: fit a temperature (and the "unknown" threshold) for an existing checkpoint."""

    checkpoint: str = opt(help="checkpoint or export directory URI to calibrate")
    data: str = opt(help="labeled data it was not trained on (its validation split): ImageFolder prefix or manifest")
    out: str = opt(help="new model directory: the model file copied as it is, distcls.json with the calibration")
    keep: float = opt(0.95, help="share of --data images the `unknown` threshold keeps")
    batch_size: int = opt(64, help="images per forward pass")
    concurrency: int = opt(1, help="model replicas (Ray actors)")
    num_gpus: float = opt(0, help="GPUs per replica")
    runtime: str = opt("auto", help=RUNTIME_HELP, choices=RUNTIMES)

    def __post_init__(self) -> None:
        p = Problems()
        check_choice(p, self, "runtime")
        check_required(p, self, "checkpoint", "data", "out")
        p.check(0.5 <= self.keep < 1, "keep", self.keep, "must be in [0.5, 1)")
        p.check(
            not self.out or self.out.rstrip("/") != self.checkpoint.rstrip("/"),
            "out",
            self.out,
            "must be a new directory, not --checkpoint (the original keeps its record, so its run can still resume)",
        )
        p.check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        p.check(self.concurrency >= 1, "concurrency", self.concurrency, "must be at least 1")
        p.check(self.num_gpus >= 0, "num_gpus", self.num_gpus, "must be >= 0")
        p.raise_if_any("calibrate")


@dataclass
class ReviewConfig:
    """`distcls review`: the labeled rows most worth a person's look."""

    labels: str = opt(help="a `distcls label` --output folder")
    out: str = opt(help="folder for review.parquet, contact_sheet.png and index.html")
    by: str = opt(
        "margin",
        help="rank by: margin (smallest first), entropy, ood (highest first) or score (lowest first)",
        choices=("margin", "entropy", "ood", "score"),
    )
    n: int = opt(100, help="rows to review (per class with --per-class)")
    per_class: bool = opt(False, help="the N most doubtful rows of each predicted label")
    root: str | None = opt(
        None,
        help="read thumbnails only under this prefix (default: the source the labels' _plan.json names); rows "
        "outside it show 'not read'",
    )
    max_object_mb: float = opt(256.0, help=MAX_OBJECT_MB_HELP)

    def __post_init__(self) -> None:
        p = Problems()
        check_choice(p, self, "by")
        check_required(p, self, "labels", "out")
        p.check(self.n >= 1, "n", self.n, "must be at least 1")
        p.check(self.max_object_mb > 0, "max_object_mb", self.max_object_mb, "must be positive")
        p.raise_if_any("review")


@dataclass
class DedupConfig:
    """`distcls dedup`: near-duplicate groups in labeled embeddings, or leakage between two sets."""

    embeddings: str = opt(help="a `distcls label --embeddings` output folder")
    out: str = opt(help="folder for pairs.parquet, groups.parquet, dedup.json and contact_sheet.png")
    against: str | None = opt(None, help="a second such folder: report only pairs across the two (train/test leakage)")
    threshold: float = opt(0.6, help="cosine similarity of embeddings at or above which a nearest neighbour is a candidate")
    pixel_corr: float | None = opt(
        0.997, help="thumbnail correlation at or above which a candidate is a near-duplicate (labels with thumbnails)"
    )
    method: str = opt(
        "auto",
        help="exact (blocked), ivf (faiss inverted file, approximate) or auto (exact up to 200,000)",
        choices=("auto", "exact", "ivf"),
    )

    def __post_init__(self) -> None:
        p = Problems()
        check_choice(p, self, "method")
        check_required(p, self, "embeddings", "out")
        p.check(-1 <= self.threshold <= 1, "threshold", self.threshold, "must be a cosine similarity in [-1, 1]")
        p.check(self.pixel_corr is None or -1 <= self.pixel_corr <= 1, "pixel_corr", self.pixel_corr, "must be in [-1, 1]")
        p.raise_if_any("dedup")


@dataclass
class FindLabelIssuesConfig:
    """`distcls find-label-issues`: likely mislabeled training images (K-fold fine-tuning + cleanlab)."""

    data: str = opt(help="labeled data: an ImageFolder prefix or a manifest file")
    out: str = opt(help="folder for label_issues.parquet, pred_probs.parquet, summary.json, contact_sheet.png, folds/")
    folds: int = opt(5, help="K: each image is predicted by a model fine-tuned on the other K-1 folds")
    max_concurrent: int | None = opt(None, help="folds trained at once (default: as many as the cluster's CPUs allow)")
    model: str = opt("efficientnet_lite0", help="architecture (see `distcls models`)")
    weights: str = opt("bundled", help="bundled, none, a torchvision weights name, or a weights file URI")
    epochs: int = opt(3, help="fine-tuning epochs per fold")
    image_size: int | None = opt(None, help="model input size (default: the model's own)")
    batch_size: int = opt(32, help="images per step per worker")
    num_workers: int = opt(1, help="Ray Train workers per fold")
    lr: float | None = opt(None, help="learning rate (default: the recipe's)")
    seed: int = opt(0, help="seed of the folds and the training runs")

    def __post_init__(self) -> None:
        p = Problems()
        check_required(p, self, "data", "out")
        p.check(self.folds >= 2, "folds", self.folds, "must be at least 2")
        p.check(
            self.max_concurrent is None or self.max_concurrent >= 1, "max_concurrent", self.max_concurrent, "must be at least 1"
        )
        p.check(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        p.check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        p.check(self.num_workers >= 1, "num_workers", self.num_workers, "must be at least 1")
        p.raise_if_any("find-label-issues")

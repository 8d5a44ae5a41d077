"""The train-side configs: `train`, `distill`, `tune` and `soup`. The fields a training run and a search share
(data, model, workers, where the run lives) are declared once, in `TrainingFields`."""

from __future__ import annotations

from dataclasses import dataclass

from distcls.config.options import Config, Problems, check_required, max_object_mb, opt

OPTIMIZERS = ("sgd", "adamw")
FREEZE = ("none", "backbone")
CLASS_WEIGHTS = ("none", "balanced")
PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
AUGMENT_POLICIES = ("none", "flip", "trivialaugment", "randaugment")
LOSSES = ("ce", "focal", "class-balanced")
SAMPLERS = ("uniform", "balanced")
SOUP_METHODS = ("greedy", "uniform")
ELASTIC_MAX_FAILURES = 3  # the default --max-failures of an elastic run (--num-workers MIN,MAX)
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def check_run_name(problems: Problems, value: str | None) -> None:
    """--name: one path segment of safe characters (letters, digits, . _ -), never `.` or `..`."""
    ok = value is None or (bool(value) and set(value) <= NAME_CHARS and value not in (".", "..") and len(value) <= 200)
    problems.check(ok, "name", value, "must be one path segment of letters, digits, '.', '_' or '-' (not '.' or '..')")


def check_model(problems: Problems, name: str, value: str) -> None:
    from distcls.models import REGISTRY

    problems.check(value in REGISTRY, name, value, f"must be one of {', '.join(REGISTRY)}")


@dataclass
class TrainingFields(Config):
    """The fields `train` (and `distill`) and `tune` share: the data, the model, the workers, the run's folder."""

    data: str = opt(
        help="training data: an ImageFolder prefix (URI/<class>/<image>), a manifest file, or packed data (a `distcls "
        "pack` output, found by its _dataset.json; Parquet written by Hugging Face `datasets`; WebDataset tars), whose "
        "train split it reads"
    )
    val_data: str | None = opt(
        None,
        help="validation data (same forms; of packed data its val split); else a stratified split of --data, or "
        "packed --data's own val split",
    )
    val_fraction: float = opt(0.1, help="share of per-object --data held out for validation when --val-data is not given")
    class_names: tuple[str, ...] = opt(
        (),
        help="class names in label-index order (comma-separated): the names of a WebDataset's `cls` integers when it "
        "has no classes.txt; for other data, the order of the classes",
    )
    model: str = opt("efficientnet_lite0", help="architecture (see `distcls models`)")
    weights: str = opt("bundled", help="bundled, none, a torchvision weights name, or a .safetensors/.pt URI")
    image_size: int | None = opt(None, min=16, max=1024, help="model input size (default: the model's own, 224)")
    batch_size: int = opt(32, min=1, help="images per step per worker")
    cpus_per_worker: float = opt(1.0, help="CPUs reserved per training worker")
    use_gpu: bool = opt(False, help="one GPU per training worker, bf16 autocast and channels_last")
    seed: int = opt(0, help="random seed (split, init, shuffling)")
    storage: str = opt("runs", help="run storage: a local folder or s3:// / gs:// URI")
    name: str | None = opt(None, help="run name: the run lives in <storage>/<name>/ (default: <command>-<timestamp>)")
    resume: bool = opt(
        False,
        help="continue the run <storage>/<name> where it stopped (from its latest checkpoint; a search keeps its "
        "finished trials and resumes the rest)",
    )
    tracking_uri: str | None = opt(
        None,
        help="log params, per-epoch metrics, curves and the checkpoint (of every trial of a search) to MLflow: a local "
        "folder (an SQLite database FOLDER/mlflow.db) or a server URI",
    )

    def validate(self, p: Problems) -> None:
        p.check(bool(self.data), "data", self.data, "give a training data URI")
        check_model(p, "model", self.model)
        p.check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "must be between 0 and 1")
        check_run_name(p, self.name)
        p.check(not (self.resume and self.name is None), "resume", self.resume, "needs --name of the run to resume")


@dataclass
class TrainConfig(TrainingFields):
    """`distcls train`: fine-tune a pretrained classifier with Ray Train (DDP over num_workers)."""

    command = "train"

    epochs: int = opt(3, min=1, help="passes over the training data")
    lr: float | None = opt(None, gt=0, help="peak learning rate of the head (default: 0.05 for sgd, 1e-3 for adamw)")
    backbone_lr_scale: float | None = opt(
        None, min=0, max=1, help="backbone learning rate = lr * this (pretrained weights only; default: auto, 1.0)"
    )
    optimizer: str = opt("adamw", help="optimizer", choices=OPTIMIZERS)
    momentum: float = opt(0.9, help="SGD momentum")
    weight_decay: float = opt(0.01, min=0, help="weight decay (never on norm layers or biases)")
    warmup_epochs: float | None = opt(
        None, min=0, help="linear warmup length in epochs, then cosine decay to 0 (default: auto, a tenth of the run)"
    )
    label_smoothing: float | None = opt(None, min=0, lt=1, help="label smoothing of the cross-entropy loss (default: auto, 0.1)")
    freeze: str = opt("none", help="none, or backbone for a linear probe", choices=FREEZE)
    random_crops: bool | None = opt(
        None,
        help="random resized crops of training images (default: auto, by the "
        "run's number of steps; printed at start as the recipe)",
    )
    crop_scale_min: float | None = opt(
        None,
        gt=0,
        max=1,
        help="smallest random crop as a share of the image area (default: auto: 0.35, or 0.08 for long runs)",
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
    focal_gamma: float = opt(2.0, min=0, help="focusing parameter of --loss focal")
    cb_beta: float = opt(0.999, help="beta of --loss class-balanced: weight (1 - beta) / (1 - beta^n) for a class of n images")
    class_weights: str = opt("none", help="loss weights per class for imbalanced data (inverse frequency)", choices=CLASS_WEIGHTS)
    sampler: str = opt(
        "uniform",
        help="uniform (every image once per epoch) or balanced (each class drawn equally often: rare classes "
        "repeat, common ones are subsampled to the same epoch size)",
        choices=SAMPLERS,
    )
    max_object_mb: float = max_object_mb()
    ordered_ingest: bool = opt(
        True,
        help="training batches in a fixed order, so that a run restored from a "
        "checkpoint replays its lost epochs exactly (--no-ordered-ingest: Ray Data's "
        "unordered, sometimes faster, streaming)",
    )
    num_workers: tuple[int, ...] = opt(
        (2,),
        help="Ray Train workers (DDP processes): N, or MIN,MAX for an elastic run that starts with what the cluster "
        "has (at least MIN), goes on with fewer when a node is lost and grows again when it returns",
    )
    placement_strategy: str = opt("PACK", help="where workers go: PACK or SPREAD over nodes", choices=PLACEMENT)
    max_failures: int | None = opt(
        None,
        help="worker failures (and lost nodes) to recover from, from the latest checkpoint; -1 = unlimited "
        f"(default: 0, or {ELASTIC_MAX_FAILURES} with --num-workers MIN,MAX, so that losing a node shrinks the run "
        "instead of failing it)",
    )
    keep: int = opt(2, min=1, help="checkpoints to keep, best by validation accuracy (the latest is also kept)")
    checkpoint_every_steps: int | None = opt(
        None,
        min=1,
        help="also checkpoint every N optimizer steps, mid-epoch: a restore (after a failure, a preemption or "
        "--resume) continues at the next unseen sample of the epoch",
    )
    checkpoint_every_minutes: float = opt(
        15.0,
        min=0,
        help="also checkpoint mid-epoch when this many minutes have passed since the last checkpoint (0: off); a "
        "lost node or a preemption then costs at most this much training",
    )
    keep_step_checkpoints: int = opt(
        2, min=1, help="mid-epoch checkpoints to keep, the newest (besides --keep; never counted as the best)"
    )
    no_calibrate: bool = opt(
        False, help="skip the temperature calibration after training (by default a failed calibration fails the run)"
    )
    experiment: str = opt("distcls", help="MLflow experiment name (with --tracking-uri)")

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, int):  # TrainConfig(num_workers=2) in code, as YAML's `num_workers: 2`
            self.num_workers = (self.num_workers,)
        if self.max_failures is None:
            self.max_failures = ELASTIC_MAX_FAILURES if self.elastic else 0
        super().__post_init__()
        if self.lr is None:
            self.lr = 0.05 if self.optimizer == "sgd" else 1e-3

    @property
    def min_workers(self) -> int:
        return self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """The most workers the run has: its data is dealt, its CPUs reserved and its recipe chosen for this many."""
        return self.num_workers[-1]

    @property
    def elastic(self) -> bool:
        return len(self.num_workers) == 2 and self.num_workers[0] != self.num_workers[1]

    @property
    def scaling_workers(self) -> int | tuple[int, int]:
        """ScalingConfig(num_workers=...): N, or (MIN, MAX) for Ray Train V2's elastic training."""
        return (self.min_workers, self.max_workers) if self.elastic else self.max_workers

    def validate(self, p: Problems) -> None:
        super().validate(p)
        p.check(self.mixup >= 0, "mixup", self.mixup, "must be >= 0 (0 turns it off)")
        p.check(self.cutmix >= 0, "cutmix", self.cutmix, "must be >= 0 (0 turns it off)")
        p.check(self.ema is None or 0 < self.ema < 1, "ema", self.ema, "must be a decay in (0, 1), e.g. 0.999")
        p.check(0 < self.cb_beta < 1, "cb_beta", self.cb_beta, "must be in (0, 1), e.g. 0.999")
        p.check(
            not (self.loss == "class-balanced" and self.class_weights != "none"),
            "class_weights",
            self.class_weights,
            "--loss class-balanced brings its own class weights; drop --class-weights",
        )
        p.check(self.max_failures >= -1, "max_failures", self.max_failures, "must be -1 (unlimited) or >= 0")
        w = self.num_workers
        p.check(
            len(w) in (1, 2) and min(w, default=0) >= 1 and w[0] <= w[-1],
            "num_workers",
            ",".join(map(str, w)),
            "give N or MIN,MAX with 1 <= MIN <= MAX",
        )
        p.check(
            not (self.freeze == "backbone" and self.weights == "none"),
            "freeze",
            self.freeze,
            "a linear probe needs pretrained --weights, not none",
        )


@dataclass
class DistillConfig(TrainConfig):
    """`distcls distill`: train a small student on a teacher checkpoint's soft targets plus the labels.

    Everything `distcls train` has (DDP, checkpoints, fault tolerance, reports); --student replaces --model.
    Loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(labels).
    """

    command = "distill"

    teacher: str = opt(help="teacher checkpoint URI (verified; its own preprocessing is used)", kw_only=True)
    student: str = opt("mobilenet_v3_small", help="student architecture (see `distcls models`)", kw_only=True)
    temperature: float = opt(4.0, gt=0, max=100, help="softening temperature T of both distributions", kw_only=True)
    alpha: float = opt(
        0.7, min=0, max=1, help="weight of the distillation term (1 - alpha goes to the labels' loss)", kw_only=True
    )

    def validate(self, p: Problems) -> None:
        from distcls.models import REGISTRY

        p.check(bool(self.teacher), "teacher", self.teacher, "give the teacher's checkpoint URI")
        check_model(p, "student", self.student)
        p.check(
            self.model in (self.student, TrainConfig.model),
            "model",
            self.model,
            "distill takes the architecture from --student; drop --model",
        )
        p.check(
            self.weights != "bundled" or self.student not in REGISTRY or REGISTRY[self.student].bundled,
            "weights",
            self.weights,
            f"{self.student} has no bundled weights; pass --weights none (random "
            "init), a torchvision weights name or a weights file",
        )
        if self.student in REGISTRY:  # the training rules, on the student's architecture
            self.model = self.student
            super().validate(p)


@dataclass
class SoupConfig(Config):
    """`distcls soup`: average the weights of fine-tuned checkpoints of one architecture (Wortsman et al. 2022)."""

    command = "soup"

    checkpoints: tuple[str, ...] = opt(help="checkpoint directory URIs (the ingredients), comma-separated or repeated")
    data: str = opt(
        help="labeled validation data the greedy soup is chosen on and every soup is scored on (packed data: its val "
        "split, else test, else train)"
    )
    out: str = opt(help="checkpoint directory URI to write the soup to")
    method: str = opt(
        "greedy",
        help="greedy (ingredients by validation accuracy, each kept only if the soup's accuracy rises) or uniform (all)",
        choices=SOUP_METHODS,
    )
    batch_size: int = opt(128, min=1, help="images per forward pass")
    use_gpu: bool = opt(False, help="score on a GPU")

    def validate(self, p: Problems) -> None:
        check_required(p, self, "data", "out")
        p.check(len(self.checkpoints) >= 1, "checkpoints", ",".join(self.checkpoints), "give at least one checkpoint URI")
        p.check(
            len(set(self.checkpoints)) == len(self.checkpoints),
            "checkpoints",
            ",".join(self.checkpoints),
            "names a checkpoint twice; give each once",
        )


@dataclass
class TuneConfig(TrainingFields):
    """`distcls tune`: a Ray Tune search over `distcls train` runs, ASHA stopping the weak trials early. The
    search space fields (--lr, --weight-decay, --backbone-lr-scale, --augment, --mixup, --epochs) take ranges or
    lists of the values `train` takes one of."""

    command = "tune"

    trials: int = opt(8, min=1, help="trials (configurations drawn from the search space)")
    max_concurrent: int = opt(1, min=1, help="trials running at once")
    num_workers: int = opt(1, min=1, help="Ray Train workers per trial (a fixed count, no MIN,MAX range)")
    lr: tuple[float, ...] = opt((3e-4, 3e-3), help="learning rate range LOW,HIGH (log-uniform) or one value")
    weight_decay: tuple[float, ...] = opt((1e-3, 0.1), help="weight decay range LOW,HIGH (log-uniform) or one value")
    backbone_lr_scale: tuple[float, ...] = opt((0.3, 1.0), help="backbone lr scales to choose from")
    augment: tuple[str, ...] = opt(("none", "flip", "trivialaugment"), help="augmentation policies to choose from")
    mixup: tuple[float, ...] = opt((0.0, 0.2), help="mixup alphas to choose from")
    epochs: tuple[int, ...] = opt((3, 5), help="epoch counts to choose from; ASHA stops trials early in epochs")
    grace_period: int = opt(1, help="ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: int = opt(2, min=2, help="ASHA: keep the top 1/N of trials at each rung")
    soup: bool = opt(False, help="soup the top trials' best checkpoints (greedy) into <run>/soup")
    soup_top: int = opt(4, help="trials the soup takes its ingredients from (best first)")
    experiment: str = opt("distcls-tune", help="MLflow experiment name (with --tracking-uri)")
    trust_tune_state: bool = opt(
        False,
        help="with --resume: the search folder is trusted (Ray Tune's tuner.pkl and trial state are pickles that "
        "run code when loaded; only you must be able to write <storage>/<name>)",
    )

    def validate(self, p: Problems) -> None:
        super().validate(p)
        for name in ("lr", "weight_decay"):
            values = getattr(self, name)
            p.check(
                1 <= len(values) <= 2 and all(v > 0 for v in values) and values[0] <= values[-1],
                name,
                ",".join(map(str, values)),
                "give LOW,HIGH (0 < LOW <= HIGH) or one positive value",
            )
        self.validate_search_space(p)
        top = max(self.epochs or (1,))
        p.check(1 <= self.grace_period <= top, "grace_period", self.grace_period, "must be in [1, max epochs]")
        p.check(self.soup_top >= 2, "soup_top", self.soup_top, "a soup needs at least 2 ingredients")
        p.check(
            not (self.resume and not self.trust_tune_state),
            "resume",
            self.resume,
            "unpickles Ray Tune's search state (<storage>/<name>/tuner.pkl, which runs code as you): give "
            "--trust-tune-state if only you can write that folder",
        )

    def validate_search_space(self, p: Problems) -> None:
        """The lists a trial draws its value from: none empty, each value one that `train` takes."""
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

"""Training objectives behind one signature: `loss_fn(logits, labels, mask[, teacher_logits])` for
`train_one_epoch`. The worker picks one by config (`build_objective`): cross-entropy on the labels, or
knowledge distillation from a teacher checkpoint that every worker loads once, in eval mode.

Distillation, per usable image:

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, label)

(T^2 keeps the soft term's gradients on the scale of the hard term's, Hinton et al. 2015.) The teacher sees
each training batch (augmentation included) resized to its own input size and normalised with its own spec
(inside its `Classifier`), so teacher and student may differ in architecture and preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from distcls import DistclsError
from distcls.checkpoint import load_checkpoint, read_meta
from distcls.config import DistillConfig, TrainConfig
from distcls.device import DevicePolicy
from distcls.infer.modelfile import is_export
from distcls.train.loop import masked_loss
from distcls.transforms import PreprocessSpec, interpolation_mode


def build_objective(
    cfg: TrainConfig | DistillConfig,
    class_names: list[str],
    spec: PreprocessSpec,
    device: torch.device,
    class_weights: torch.Tensor | None,
) -> tuple[Teacher | None, Callable]:
    """(teacher or None, loss_fn) for this run's config: distillation for a DistillConfig, else cross-entropy."""
    if isinstance(cfg, DistillConfig):
        return build_teacher_loss(cfg, class_names, spec, device, class_weights)
    gamma = focal_gamma(cfg)

    def loss_fn(logits, labels, mask):
        return masked_loss(logits, labels, mask, class_weights, cfg.label_smoothing, gamma)

    return None, loss_fn


def focal_gamma(cfg: TrainConfig) -> float:
    """--loss focal: its gamma; 0 (plain cross-entropy) for ce and class-balanced (whose weights are the
    run's class weights, computed on the driver from the class counts)."""
    return cfg.focal_gamma if cfg.loss == "focal" else 0.0


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(teacher/T || student/T), averaged over rows with mask 1."""
    log_student = nn.functional.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = nn.functional.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
    return temperature**2 * (kl * mask).sum() / mask.float().sum().clamp_min(1e-12)


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """alpha * soft-target loss + (1 - alpha) * the training loss on the labels (`masked_loss`)."""
    hard = masked_loss(student_logits, labels, mask, class_weights, label_smoothing, focal_gamma)
    if alpha == 0:
        return hard
    return alpha * soft_target_loss(student_logits, teacher_logits, mask, temperature) + (1 - alpha) * hard


class Teacher:
    """A verified teacher checkpoint in eval mode: uint8 student-sized batch -> teacher logits (no grad)."""

    def __init__(self, uri: str, class_names: list[str], student_spec: PreprocessSpec, device: torch.device):
        self.model, self.meta = load_teacher(uri, device)
        check_classes(self.meta, class_names, uri)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.spec = self.model.spec
        self.resize = self.spec.image_size != student_spec.image_size
        self.policy = DevicePolicy.of(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        if self.resize:  # the teacher's own input size, with its own interpolation
            size = [self.spec.image_size, self.spec.image_size]
            images = TF.resize(images, size, interpolation=interpolation_mode(self.spec.interpolation), antialias=True)
        with self.policy.autocast():
            return self.model(images).float()


def load_teacher(uri: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model, metadata) of a verified PyTorch checkpoint: weights only, no code. Never an export, so never
    TorchScript, whatever --trust-torchscript or DISTCLS_TRUSTED_MODELS say."""
    meta = read_meta(uri)
    if is_export(meta):
        export = meta["export"] if isinstance(meta.get("export"), dict) else {}
        fmt, source = export.get("format"), export.get("source_checkpoint")
        raise DistclsError(
            f"distill: teacher {uri} is a {fmt} export, and a teacher is never run from an export; "
            f"pass the PyTorch checkpoint it was exported from{f' ({source})' if source else ''}"
        )
    return load_checkpoint(uri, device)  # refuses weights whose sha256 differs


def check_classes(teacher_meta: dict, class_names: list[str], uri: str) -> None:
    if list(teacher_meta["class_names"]) != list(class_names):
        raise DistclsError(
            f"distill: teacher {uri} has classes {teacher_meta['class_names'][:5]}... "
            f"({len(teacher_meta['class_names'])}), the data has {class_names[:5]}... ({len(class_names)}); "
            "distill on data with the teacher's classes, in the same order"
        )


def build_teacher_loss(
    cfg: DistillConfig, class_names: list[str], spec: PreprocessSpec, device: torch.device, class_weights: torch.Tensor | None
) -> tuple[Teacher, Callable]:
    """The worker's (teacher, loss_fn(logits, labels, mask, teacher_logits)) for `train_one_epoch`."""
    teacher = Teacher(cfg.teacher, class_names, spec, device)

    def loss_fn(logits, labels, mask, teacher_logits):
        return distillation_loss(
            logits,
            labels,
            mask,
            teacher_logits,
            temperature=cfg.temperature,
            alpha=cfg.alpha,
            class_weights=class_weights,
            label_smoothing=cfg.label_smoothing,
            focal_gamma=focal_gamma(cfg),
        )

    return teacher, loss_fn

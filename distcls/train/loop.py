"""Plain PyTorch training pieces: optimizer, schedule, one epoch, evaluation. No Ray imports.

Batches are dicts with `image` (uint8 NCHW tensor) and `label` (int64 tensor); error rows have already
been dropped. The model (`models.Classifier`) normalises on its own device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distcls import DistclsError
from distcls.device import DevicePolicy
from distcls.metrics import confusion_matrix, topk_correct


class NonFiniteLossError(DistclsError):
    pass


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float, head_names: set[str], backbone_lr_scale: float
) -> torch.optim.Optimizer:
    """Param groups: (backbone | head) x (decay | no decay); norm weights and biases get no weight decay."""
    groups: dict[tuple[bool, bool], list] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = pname.removeprefix("module.").removeprefix("net.") in head_names
        no_decay = p.ndim <= 1
        groups.setdefault((is_head, no_decay), []).append(p)
    param_groups = [
        {"params": ps, "lr": lr * (1.0 if is_head else backbone_lr_scale), "weight_decay": 0.0 if no_decay else weight_decay}
        for (is_head, no_decay), ps in sorted(groups.items())
    ]
    for g in param_groups:
        g["initial_lr"] = g["lr"]
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr)
    raise DistclsError(f"train: unknown optimizer {name!r}; only sgd and adamw are supported")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup from ~0 to 1, then cosine decay to 0 at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * multiplier


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    samples: int = 0
    steps: int = 0
    data_seconds: float = 0.0  # time spent waiting for the next batch (the input pipeline's share)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.samples)


def masked_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, class_weights: torch.Tensor | None, label_smoothing: float
) -> torch.Tensor:
    """Cross-entropy averaged as PyTorch's weighted mean (sum w[y] * l / sum w[y]), over rows with mask 1.

    Masked rows (undecodable images kept as placeholders) contribute nothing, but still take part in the
    step, so every DDP worker runs the same number of steps even when a whole batch was bad.
    """
    per_sample = nn.functional.cross_entropy(
        logits.float(), labels, weight=class_weights, label_smoothing=label_smoothing, reduction="none"
    )
    w = mask.float() if class_weights is None else mask.float() * class_weights[labels]
    return (per_sample * mask).sum() / w.sum().clamp_min(1e-12)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    device: torch.device,
    *,
    schedule: Callable[[int], float],
    start_step: int,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EpochStats:
    """One pass: forward, loss, backward, step. `schedule(global_step)` gives the LR multiplier. The device
    policy (distcls.device: bf16 autocast and channels_last on CUDA) follows from `device`.

    `loss_fn(logits, labels, mask)`; batches carry `mask` (1 = usable image). With a `teacher`
    (distillation) it is `loss_fn(logits, labels, mask, teacher(images))`: the teacher sees the very
    images (augmentation included) the student sees.
    """
    policy = DevicePolicy.of(device)
    stats = EpochStats()
    step = start_step
    waiting_since = time.perf_counter()
    for batch in batches:
        stats.data_seconds += time.perf_counter() - waiting_since
        images = torch.as_tensor(batch["image"]).to(device, non_blocking=True)
        labels = torch.as_tensor(batch["label"]).to(device, non_blocking=True)
        if augment is not None:
            images = augment(images)
        images = policy.layout(images)
        mask = torch.as_tensor(batch["mask"]).to(device)
        if on_step is not None:
            on_step(step)
        set_lr(optimizer, schedule(step))
        with policy.autocast():
            logits = model(images)
        if teacher is None:
            loss = loss_fn(logits, labels, mask)
        else:
            loss = loss_fn(logits, labels, mask, teacher(images))
        # .item() is a host-device sync; it also lets us stop on a non-finite loss at the exact step.
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"train: loss became {loss_value} at step {step}; "
                "lower --lr or check the data (stopping instead of training on garbage)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = int(batch["mask"].sum())
        stats.loss_sum += loss_value * n
        stats.samples += n
        stats.steps += 1
        step += 1
        waiting_since = time.perf_counter()
    return stats


@torch.inference_mode()
def evaluate(
    model: nn.Module, batches: Iterable[dict], num_classes: int, device: torch.device, loss_fn: nn.Module | None = None
) -> dict:
    """Confusion matrix, summed loss and top-5 hits over `batches` (to be summed across workers)."""
    model.eval()
    policy = DevicePolicy.of(device)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum, top5 = 0.0, 0
    for batch in batches:
        images = policy.images(batch["image"])
        labels = torch.as_tensor(batch["label"]).to(device, non_blocking=True)
        if len(labels) == 0:
            continue
        with policy.autocast():
            logits = model(images).float()
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits, labels)) * len(labels)
        logits_np, labels_np = logits.cpu().numpy(), labels.cpu().numpy()
        cm += confusion_matrix(labels_np, logits_np.argmax(1), num_classes)
        top5 += topk_correct(logits_np, labels_np, 5)
    return {"confusion_matrix": cm, "loss_sum": loss_sum, "top5": top5}

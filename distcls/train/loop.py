"""Plain PyTorch training pieces: optimizer, schedule, one epoch, evaluation. No Ray imports.

Batches are dicts with `image` (uint8 NCHW tensor) and `label` (int64 tensor); error rows have already
been dropped. The model (`models.Classifier`) normalises on its own device.
"""

from __future__ import annotations

import copy
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
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    class_weights: torch.Tensor | None,
    label_smoothing: float,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy averaged as PyTorch's weighted mean (sum w[y] * l / sum w[y]), over rows with mask 1.

    With `focal_gamma` > 0 it is the focal loss (Lin et al. 2017): each row's (smoothed) cross-entropy times
    (1 - p_y)^gamma, so that images the model already gets right count less.

    Masked rows (undecodable images kept as placeholders) contribute nothing, but still take part in the
    step, so every DDP worker runs the same number of steps even when a whole batch was bad.
    """
    w = mask.float() if class_weights is None else mask.float() * class_weights[labels]
    if focal_gamma == 0:
        per_sample = nn.functional.cross_entropy(
            logits.float(), labels, weight=class_weights, label_smoothing=label_smoothing, reduction="none"
        )
        return (per_sample * mask).sum() / w.sum().clamp_min(1e-12)
    log_p = nn.functional.log_softmax(logits.float(), dim=1)
    nll = -log_p.gather(1, labels[:, None]).squeeze(1)
    ce = (1 - label_smoothing) * nll - label_smoothing * log_p.mean(dim=1)
    per_sample = (1 - torch.exp(-nll)).clamp_min(0).pow(focal_gamma) * ce
    return (per_sample * w).sum() / w.sum().clamp_min(1e-12)


@dataclass
class Mix:
    """A mixed batch: image i is lam * image i + (1 - lam) * its partner (mixup), or has a box of the partner
    pasted in covering 1 - lam of its area (cutmix); the partner of row i is row N-1-i. Its target is
    lam * onehot(labels) + (1 - lam) * onehot(partners), so the loss is the same mix of the two losses."""

    images: torch.Tensor
    labels: torch.Tensor
    partners: torch.Tensor
    lam: float

    def targets(self, num_classes: int) -> torch.Tensor:
        one_hot = nn.functional.one_hot
        return self.lam * one_hot(self.labels, num_classes).float() + (1 - self.lam) * one_hot(self.partners, num_classes).float()

    def loss(self, loss_fn: Callable, logits: torch.Tensor, mask: torch.Tensor, *extra) -> torch.Tensor:
        if self.lam == 1.0:
            return loss_fn(logits, self.labels, mask, *extra)
        first = loss_fn(logits, self.labels, mask, *extra)
        return self.lam * first + (1 - self.lam) * loss_fn(logits, self.partners, mask, *extra)


class Mixer:
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) per batch, as timm's Mixup in batch mode: lam
    ~ Beta(alpha, alpha); with both on, each batch is one or the other with probability 1/2. Draws come from
    `rng` (seeded per epoch by the worker)."""

    def __init__(self, mixup: float, cutmix: float, rng: np.random.Generator):
        self.mixup, self.cutmix, self.rng = mixup, cutmix, rng

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Mix:
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or self.rng.random() < 0.5)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(self.rng.beta(alpha, alpha))
        partners = labels.flip(0)
        if use_cutmix:
            images, lam = self.paste_box(images, lam)
        else:
            images = lam * images.float() + (1 - lam) * images.flip(0).float()
        return Mix(images, labels, partners, lam)

    def paste_box(self, images: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
        """A box of 1 - lam of the area (clipped at the borders), from the partner; lam recomputed from the
        box actually pasted."""
        height, width = images.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(self.rng.integers(height)), int(self.rng.integers(width))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        out = images.clone()
        out[..., y0:y1, x0:x1] = images.flip(0)[..., y0:y1, x0:x1]
        return out, 1 - (y1 - y0) * (x1 - x0) / (height * width)


class WeightEma:
    """An exponential moving average of a model's weights and buffers (timm's ModelEmaV3 rule): after each
    optimizer step, ema = d * ema + (1 - d) * live with d = min(decay, (1 + n) / (10 + n)) after n updates,
    so that a short run is not dominated by its random first steps. Integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float, updates: int = 0):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, updates
        self._pairs: tuple[list, list, list] | None = None  # (average floats, live floats, (average, live) others)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._pairs is None:  # built once: optimizer steps and BatchNorm update the tensors in place
            live = model.state_dict()
            pairs = [(value, live[name].detach()) for name, value in self.module.state_dict().items()]
            floats = [p for p in pairs if p[0].is_floating_point()]
            self._pairs = ([e for e, _ in floats], [v for _, v in floats], [p for p in pairs if not p[0].is_floating_point()])
        ema_floats, live_floats, others = self._pairs
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(ema_floats, live_floats, 1 - d)
        for ema_value, live_value in others:
            ema_value.copy_(live_value)


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
    mixer: Mixer | None = None,
    after_step: Callable[[], None] | None = None,
    stats: EpochStats | None = None,
    on_step_end: Callable[[EpochStats, dict], None] | None = None,
) -> EpochStats:
    """One pass: forward, loss, backward, step. `schedule(global_step)` gives the LR multiplier. The device
    policy (distcls.device: bf16 autocast and channels_last on CUDA) follows from `device`.

    `loss_fn(logits, labels, mask)`; batches carry `mask` (1 = usable image). With a `teacher`
    (distillation) it is `loss_fn(logits, labels, mask, teacher(images))`: the teacher sees the very
    images (augmentation included) the student sees. A `mixer` mixes each batch after augmentation (the loss
    is the mixed targets'); `after_step()` runs after each optimizer step (the weight average).

    `stats`: the sums of the epoch so far (a run resumed mid-epoch continues them; `start_step` is the step the
    epoch began at). `on_step_end(stats, batch)` runs after each step's sums are added (mid-epoch checkpoints).
    """
    policy = DevicePolicy.of(device)
    stats = stats if stats is not None else EpochStats()
    step = start_step + stats.steps
    waiting_since = time.perf_counter()
    for batch in batches:
        stats.data_seconds += time.perf_counter() - waiting_since
        images = torch.as_tensor(batch["image"]).to(device, non_blocking=True)
        labels = torch.as_tensor(batch["label"]).to(device, non_blocking=True)
        if augment is not None:
            images = augment(images)
        mix = mixer(images, labels) if mixer is not None else Mix(images, labels, labels, 1.0)
        images = policy.layout(mix.images)
        mask = torch.as_tensor(batch["mask"]).to(device)
        if on_step is not None:
            on_step(step)
        set_lr(optimizer, schedule(step))
        with policy.autocast():
            logits = model(images)
        extra = () if teacher is None else (teacher(images),)
        loss = mix.loss(loss_fn, logits, mask, *extra)
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
        if after_step is not None:
            after_step()
        n = int(batch["mask"].sum())
        stats.loss_sum += loss_value * n
        stats.samples += n
        stats.steps += 1
        step += 1
        if on_step_end is not None:
            on_step_end(stats, batch)
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

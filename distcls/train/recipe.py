"""The fine-tuning recipe: defaults that adapt to the data and the budget. Pure functions, no Ray.

Every recipe flag of `distcls train` left unset (None) is chosen here from what is known before training
starts: how many optimizer steps the run has, whether the weights are pretrained, and how large the
images are compared with the model input. The choice and its reasons are printed in one line at start
and recorded in `distcls.json` and `result.json`.

The rules come from `distcls bench recipe` (Fashion-MNIST at 20, 100 and 1,000 images per class, the
handwritten digits, face crops; 3 epochs each) against a plain PyTorch loop, see the README:

- Pretrained backbones train at the head's learning rate. A backbone held at a tenth of it could not
  move far enough in a short run from ImageNet features to e.g. 8x8 digits (0.35 vs 0.95 accuracy).
- Warmup is a tenth of the steps: half an epoch of warmup is a sixth of a 3-epoch run.
- Random resized crops are a regulariser that pays off only over many steps; in a short run they cost
  accuracy (and crops of an image upscaled from far below the model input are mostly blur). Below
  LIGHT_AUGMENT_STEPS no crops, then light crops, and ImageNet's 8%-100% only for long runs.
- Horizontal flips change the class of digits and text, so they are never on unless asked for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

LIGHT_AUGMENT_STEPS = 1000  # fewer optimizer steps in all: no random crops
FULL_AUGMENT_STEPS = 10000  # at least this many: ImageNet-style crops (8%-100% of the image)
LIGHT_CROP_MIN = 0.35
FULL_CROP_MIN = 0.08
SMALL_NATIVE_RATIO = 0.5  # images this much smaller than the model input get no crops below LIGHT_CROP_MIN
WARMUP_FRACTION = 0.1
LABEL_SMOOTHING = 0.1
CACHE_BUDGET_BYTES = 2 * 1024**3  # decoded training bases up to this size are cached in Ray's object store


@dataclass(frozen=True)
class Recipe:
    """The resolved values of the adaptive flags, and why."""

    steps: int
    backbone_lr_scale: float
    warmup_epochs: float
    label_smoothing: float
    random_crops: bool
    crop_scale_min: float
    cache_data: bool
    reasons: tuple[str, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d

    def line(self) -> str:
        crops = f"random crops {self.crop_scale_min:g}-1" if self.random_crops else "no random crops"
        return (
            f"recipe: {self.steps} steps in all -> {crops}, warmup {self.warmup_epochs:.2g} epochs, "
            f"backbone lr x{self.backbone_lr_scale:g}, label smoothing {self.label_smoothing:g}, "
            f"{'cached' if self.cache_data else 'streamed'} data ({'; '.join(self.reasons)})"
        )


def total_steps(num_train: int, epochs: int, batch_size: int, num_workers: int) -> int:
    """Optimizer steps of a run: every worker steps once per local batch of its shard."""
    return max(1, math.ceil(num_train / num_workers / batch_size)) * epochs


def base_bytes(num_train: int, resize_size: int) -> int:
    """Memory of the decoded uint8 training bases (3 x resize x resize each)."""
    return num_train * 3 * resize_size * resize_size


def choose_recipe(
    *,
    num_train: int,
    epochs: int,
    batch_size: int,
    num_workers: int,
    image_size: int,
    resize_size: int,
    native_size: int | None,
    pretrained: bool,
    given: dict | None = None,
) -> Recipe:
    """Fill every flag that is None in `given` (the user's values win) from the run's shape."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    steps = total_steps(num_train, epochs, batch_size, num_workers)
    reasons = []
    crop_min = FULL_CROP_MIN if steps >= FULL_AUGMENT_STEPS else LIGHT_CROP_MIN
    random_crops = steps >= LIGHT_AUGMENT_STEPS
    if not random_crops:
        reasons.append(f"under {LIGHT_AUGMENT_STEPS} steps crops cost more than they add")
    elif native_size is not None and native_size < SMALL_NATIVE_RATIO * image_size:
        crop_min = max(crop_min, LIGHT_CROP_MIN)
        reasons.append(f"images ~{native_size}px upscaled to {image_size}px: crops {crop_min:g}-1")
    elif crop_min == FULL_CROP_MIN:
        reasons.append(f"{FULL_AUGMENT_STEPS}+ steps: ImageNet-style crops")
    else:
        reasons.append("light crops for a medium budget")
    cache = base_bytes(num_train, resize_size) <= CACHE_BUDGET_BYTES
    reasons.append(
        f"decoded set {base_bytes(num_train, resize_size) / 2**20:.0f} MB "
        f"{'fits' if cache else 'exceeds'} the {CACHE_BUDGET_BYTES // 2**30} GB cache budget"
    )
    resolved = Recipe(
        steps=steps,
        backbone_lr_scale=given.get("backbone_lr_scale", 1.0),
        warmup_epochs=given.get("warmup_epochs", round(WARMUP_FRACTION * epochs, 4)),
        label_smoothing=given.get("label_smoothing", LABEL_SMOOTHING),
        random_crops=given.get("random_crops", random_crops),
        crop_scale_min=given.get("crop_scale_min", crop_min),
        cache_data=given.get("cache_data", cache),
        reasons=tuple(reasons) if pretrained else tuple(reasons) + ("random init",),
    )
    return resolved

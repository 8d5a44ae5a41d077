"""The preprocessing spec and the one path from bytes to model input. Pure functions, no Ray.

CPU side (data tasks): bytes -> decode -> resize + center crop -> uint8 CHW: the eval input
(image_size) or, for training, a base square (resize_size) that stays fixed across epochs and can be
cached. Device side (the model's process): random resized crop + flip of the base square
(`augment_batch`), then uint8 -> float with mean/std (`normalize`).
Every job (training-time validation, evaluate, label, serve) calls `preprocess_bytes` with the spec
stored in the checkpoint, so there is exactly one way an image becomes a model input.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from distcls import DistclsError
from distcls.images import DEFAULT_MAX_PIXELS, decode_image, out_of_memory

if TYPE_CHECKING:  # torch and torchvision load where images are transformed, not where this module is imported
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
PIL_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
FILTER_SUPPORT = {"nearest": 0.5, "bilinear": 1.0, "bicubic": 2.0}  # source pixels each side, at scale 1
# Resize-then-crop never builds a resized image over this many pixels (16 MB as Pillow's RGBX): past it
# (an extreme aspect ratio: 100000x1 would become 25600000x256, ~26 GB) only the crop's region is resampled.
RESIZE_BUDGET_PIXELS = 4_000_000


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes a model input; stored in every checkpoint (distcls.json)."""

    image_size: int = 224
    resize_size: int | None = None  # shorter side before the center crop; default image_size / 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Train-time augmentation (random resized crop + horizontal flip; flips come with --augment other than none).
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.resize_size is None:
            object.__setattr__(self, "resize_size", int(math.floor(self.image_size / 0.875)))
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        object.__setattr__(self, "crop_scale", tuple(float(x) for x in self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(float(x) for x in self.crop_ratio))
        errors = []
        if not 8 <= self.image_size <= 4096:
            errors.append(f"image_size must be between 8 and 4096, got {self.image_size}")
        if self.resize_size < self.image_size:
            errors.append(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size})")
        if self.interpolation not in INTERPOLATIONS:
            errors.append(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            errors.append(f"mean and std need 3 values each and std > 0, got mean={self.mean} std={self.std}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            errors.append(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if errors:
            raise DistclsError("preprocessing: " + "; ".join(errors))

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})


def eval_transform(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize the shorter side to resize_size, center-crop image_size -> uint8 CHW."""
    return to_chw(resize_center_crop(img, spec.resize_size, spec.image_size, spec.interpolation))


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) once the shorter side is resized to `short`, computed as torchvision does."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def resize_center_crop(img: Image.Image, resize_size: int, crop_size: int, interpolation: str) -> Image.Image:
    """torchvision's Resize(resize_size) then CenterCrop(crop_size), in bounded memory.

    Exactly those two steps while the resized image fits max(source size, RESIZE_BUDGET_PIXELS): every
    ordinary photo. Past that (extreme aspect ratios) the crop is resampled straight from the source region
    under it, with the same filter at the same source positions, never building the huge image: within one
    level of the two-step result for bilinear and bicubic (nearest may pick the neighbour at a tie).
    """
    width, height = img.size
    new_w, new_h = resized_size(width, height, resize_size)
    if new_w * new_h <= max(width * height, RESIZE_BUDGET_PIXELS):
        from torchvision.transforms import functional as TF

        img = TF.resize(img, resize_size, interpolation=interpolation_mode(interpolation))
        return TF.center_crop(img, [crop_size, crop_size])
    sx, sy = width / new_w, height / new_h
    top, left = int(round((new_h - crop_size) / 2.0)), int(round((new_w - crop_size) / 2.0))
    x0, x1 = source_span(left, crop_size, sx, width, FILTER_SUPPORT[interpolation])
    y0, y1 = source_span(top, crop_size, sy, height, FILTER_SUPPORT[interpolation])
    # Pillow takes the box in single precision: relative to the small region it stays exact enough.
    box = (left * sx - x0, top * sy - y0, min(x1 - x0, (left + crop_size) * sx - x0), min(y1 - y0, (top + crop_size) * sy - y0))
    region = img.crop((x0, y0, x1, y1))
    return region.resize((crop_size, crop_size), PIL_RESAMPLE[interpolation], box=box)


def source_span(start: int, size: int, scale: float, limit: int, support: float) -> tuple[int, int]:
    """The source pixels [first, last) that resized pixels start..start+size read, filter reach included."""
    reach = support * max(scale, 1.0) + 1
    return max(0, math.floor(start * scale - reach)), min(limit, math.ceil((start + size) * scale + reach))


def random_resized_crop_box(width: int, height: int, spec: PreprocessSpec, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params, but from a numpy Generator."""
    area = width * height
    log_ratio = (math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(spec.crop_scale[0], spec.crop_scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # Fallback: a center crop clamped to the ratio range.
    in_ratio = width / height
    if in_ratio < spec.crop_ratio[0]:
        w, h = width, int(round(width / spec.crop_ratio[0]))
    elif in_ratio > spec.crop_ratio[1]:
        h, w = height, int(round(height * spec.crop_ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def base_transform(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Training base: resize the shorter side to resize_size, center-crop a resize_size square -> uint8 CHW.

    The random crop and flip are applied per batch in the training process (`augment_batch`), so decoded
    images are the same every epoch and can be cached.
    """
    return to_chw(resize_center_crop(img, spec.resize_size, spec.resize_size, spec.interpolation))


def augment_batch(images: torch.Tensor, spec: PreprocessSpec, rng: np.random.Generator) -> torch.Tensor:
    """Random resized crop to image_size and a random horizontal flip, per image, on the batch's device.

    uint8 [N,3,R,R] -> uint8 [N,3,S,S]. Antialiased bilinear (or the spec's mode) as torchvision's
    RandomResizedCrop on tensors.
    """
    import torch
    from torchvision.transforms import functional as TF

    n, _, height, width = images.shape
    size = [spec.image_size, spec.image_size]
    interp = interpolation_mode(spec.interpolation)
    out = torch.empty((n, 3, spec.image_size, spec.image_size), dtype=images.dtype, device=images.device)
    for i in range(n):
        top, left, h, w = random_resized_crop_box(width, height, spec, rng)
        crop = TF.resized_crop(images[i], top, left, h, w, size, interpolation=interp, antialias=True)
        out[i] = crop.flip(-1) if spec.hflip and rng.random() < 0.5 else crop
    return out


def flip_batch(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A random horizontal flip per image (probability 1/2), for runs without random crops."""
    flips = rng.random(len(images)) < 0.5
    if not flips.any():
        return images
    out = images.clone()
    out[flips] = images[flips].flip(-1)
    return out


POLICIES = ("trivialaugment", "randaugment")


def build_policy(name: str):
    """torchvision.transforms.v2's TrivialAugmentWide or RandAugment (2 ops, magnitude 9), on uint8 CHW.

    They draw from torch's global generator, which the training worker seeds per (seed, rank, epoch)."""
    from torchvision.transforms import v2

    if name == "trivialaugment":
        return v2.TrivialAugmentWide()
    if name == "randaugment":
        return v2.RandAugment(num_ops=2, magnitude=9)
    raise DistclsError(f"augment: unknown policy {name!r}; use one of none, flip, {', '.join(POLICIES)}")


def policy_batch(images: torch.Tensor, policy) -> torch.Tensor:
    """The policy applied to each image on its own (one op and magnitude drawn per image, as in torchvision's
    references, where it runs per sample in the data loader)."""
    import torch

    return torch.stack([policy(image) for image in images])


def train_augment(spec: PreprocessSpec, random_crops: bool, policy: str, rng: np.random.Generator):
    """The training batch transform, uint8 -> uint8 on the batch's device, or None for none at all:
    random resized crops (and the spec's flips) of the base square, else flips alone when the spec has them;
    then the policy (trivialaugment, randaugment) per image."""
    steps = []
    if random_crops:
        steps.append(lambda x: augment_batch(x, spec, rng))
    elif spec.hflip:
        steps.append(lambda x: flip_batch(x, rng))
    if policy in POLICIES:
        transform = build_policy(policy)
        steps.append(lambda x: policy_batch(x, transform))
    if not steps:
        return None

    def apply(images: torch.Tensor) -> torch.Tensor:
        for step in steps:
            images = step(images)
        return images

    return apply


def interpolation_mode(name: str):
    from torchvision.transforms import InterpolationMode

    return {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[
        name
    ]


def to_chw(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def preprocess_bytes(data: bytes, spec: PreprocessSpec, train: bool = False) -> np.ndarray:
    """The one function that turns stored bytes into a model input (uint8 CHW).

    Eval: the image_size square every job feeds the model. Train: the resize_size base square that
    `augment_batch` crops from. Raises images.ImageDecodeError for objects that are not usable images.
    """
    try:
        # JPEG DCT-domain downscaling to no less than twice the resize target (Pillow's reducing_gap=2 rule):
        # a 12 MP photo decodes ~5x faster. Measured against a full decode on 96 photos of 12 MP, 224 px:
        # pixels within 3 levels (at 1x the target: 9 levels).
        draft = 2 * spec.resize_size
        img = decode_image(data, spec.max_pixels, draft_size=(draft, draft))
        return base_transform(img, spec) if train else eval_transform(img, spec)
    except MemoryError:
        raise out_of_memory() from None


def normalize(images: torch.Tensor, spec: PreprocessSpec, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 NCHW (any device) -> float NCHW normalised with the spec's mean/std (float32 unless `dtype`).
    Runs on the model's device."""
    import torch

    dtype = dtype or torch.float32
    mean = torch.tensor(spec.mean, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(spec.std, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255.0)
    return (images.to(dtype) - mean) * inv_std

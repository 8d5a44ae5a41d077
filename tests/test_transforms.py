"""The preprocessing spec and transforms, checked against torchvision's own pipeline. No Ray."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from distcls import DistclsError
from distcls.transforms import (
    PreprocessSpec,
    augment_batch,
    base_transform,
    eval_transform,
    normalize,
    preprocess_bytes,
    random_resized_crop_box,
)
from tests.conftest import encode


def test_eval_transform_matches_torchvision(photo):
    spec = PreprocessSpec(image_size=96, resize_size=110, interpolation="bicubic")
    ours = eval_transform(Image.fromarray(photo), spec)
    reference = T.Compose([T.Resize(110, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(96), T.PILToTensor()])(
        Image.fromarray(photo)
    ).numpy()
    assert ours.dtype == np.uint8 and ours.shape == (3, 96, 96)
    np.testing.assert_array_equal(ours, reference)


def test_default_resize_ratio():
    assert PreprocessSpec(image_size=224).resize_size == 256


def test_normalize_matches_torchvision(photo):
    spec = PreprocessSpec(image_size=32)
    chw = torch.from_numpy(eval_transform(Image.fromarray(photo), spec))[None]
    ours = normalize(chw, spec)
    reference = T.Normalize(spec.mean, spec.std)(chw.float() / 255.0)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_augment_batch_is_seeded_and_random(photo):
    spec = PreprocessSpec(image_size=48)
    base = torch.from_numpy(base_transform(Image.fromarray(photo), spec))[None].repeat(4, 1, 1, 1)
    assert base.shape == (4, 3, spec.resize_size, spec.resize_size)
    a = augment_batch(base, spec, np.random.default_rng(1))
    b = augment_batch(base, spec, np.random.default_rng(1))
    c = augment_batch(base, spec, np.random.default_rng(2))
    assert a.shape == (4, 3, 48, 48) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # each image gets its own crop


def test_crop_box_stays_inside_and_respects_scale():
    spec = PreprocessSpec(image_size=32, crop_scale=(0.25, 0.5))
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(300, 200, spec, rng)
        assert top >= 0 and top + h <= 200 and left >= 0 and left + w <= 300
        assert 0.2 <= (h * w) / (300 * 200) <= 0.55


def test_full_crop_without_flip_is_a_plain_resize(photo):
    spec = PreprocessSpec(image_size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False)
    base = torch.from_numpy(base_transform(Image.fromarray(photo), spec))[None]
    out = augment_batch(base, spec, np.random.default_rng(0))
    reference = T.Resize([32, 32], antialias=True)(base)
    assert torch.equal(out, reference)


def test_preprocess_bytes_is_the_one_path(photo):
    spec = PreprocessSpec(image_size=64)
    data = encode(Image.fromarray(photo), "PNG")
    np.testing.assert_array_equal(preprocess_bytes(data, spec), eval_transform(Image.fromarray(photo), spec))


def test_spec_round_trips_through_json_dict():
    spec = PreprocessSpec(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bicubic")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


def test_spec_validation_lists_every_problem():
    with pytest.raises(DistclsError) as info:
        PreprocessSpec(image_size=4, interpolation="lanczos9", std=(0, 1, 1))
    text = str(info.value)
    assert "image_size must be between 8 and 4096, got 4" in text
    assert "interpolation must be one of ['bicubic', 'bilinear', 'nearest'], got 'lanczos9'" in text
    assert "std > 0" in text

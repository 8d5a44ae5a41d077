"""The adaptive fine-tuning recipe: a pure function of the run's shape (no Ray)."""

from __future__ import annotations

import pytest

from distcls.config import ConfigError, TrainConfig
from distcls.train.recipe import (
    CACHE_BUDGET_BYTES,
    FULL_AUGMENT_STEPS,
    FULL_CROP_MIN,
    LIGHT_AUGMENT_STEPS,
    LIGHT_CROP_MIN,
    choose_recipe,
    total_steps,
)


def recipe(num_train=1300, epochs=3, batch_size=32, num_workers=2, image_size=64, native_size=None, **given):
    return choose_recipe(
        num_train=num_train,
        epochs=epochs,
        batch_size=batch_size,
        num_workers=num_workers,
        image_size=image_size,
        resize_size=int(image_size / 0.875),
        native_size=native_size,
        pretrained=True,
        given=given,
    )


def test_total_steps_counts_per_worker_batches():
    assert total_steps(1300, 3, 32, 2) == 21 * 3  # ceil(650 / 32) = 21 steps per epoch on every worker
    assert total_steps(1, 5, 32, 4) == 5  # never zero steps


def test_short_run_gets_no_crops_full_backbone_lr_and_a_tenth_of_warmup():
    r = recipe()  # the digits quick start: 63 steps in all
    assert r.steps == 63
    assert r.random_crops is False
    assert r.backbone_lr_scale == 1.0
    assert r.warmup_epochs == pytest.approx(0.3)  # a tenth of 3 epochs
    assert r.label_smoothing == 0.1
    assert "63 steps in all -> no random crops" in r.line()


def test_medium_run_gets_light_crops_and_long_run_imagenet_crops():
    medium = recipe(num_train=LIGHT_AUGMENT_STEPS * 64 // 3 + 64)
    assert medium.random_crops and medium.crop_scale_min == LIGHT_CROP_MIN
    long = recipe(num_train=60000, epochs=12)
    assert long.steps >= FULL_AUGMENT_STEPS
    assert long.random_crops and long.crop_scale_min == FULL_CROP_MIN


def test_images_far_below_the_input_size_never_get_small_crops():
    r = recipe(num_train=60000, epochs=12, native_size=8)  # 8x8 digits upscaled to 64
    assert r.random_crops and r.crop_scale_min == LIGHT_CROP_MIN
    assert "upscaled" in r.line()
    assert recipe(num_train=60000, epochs=12, native_size=500).crop_scale_min == FULL_CROP_MIN


def test_cache_when_the_decoded_set_fits_the_budget():
    assert recipe(num_train=60000, image_size=64).cache_data is True  # 60k x 3 x 73^2 = 0.96 GB
    big = recipe(num_train=60000, image_size=224)  # 60k x 3 x 256^2 = 11.8 GB
    assert big.cache_data is False
    assert CACHE_BUDGET_BYTES < 60000 * 3 * 256 * 256
    assert "exceeds" in big.line()


def test_given_values_win_over_the_adaptive_choice():
    r = recipe(
        backbone_lr_scale=0.1, random_crops=True, crop_scale_min=0.08, warmup_epochs=0.5, label_smoothing=0.0, cache_data=False
    )
    assert (r.backbone_lr_scale, r.random_crops, r.crop_scale_min, r.warmup_epochs, r.label_smoothing, r.cache_data) == (
        0.1,
        True,
        0.08,
        0.5,
        0.0,
        False,
    )


def test_recipe_flags_default_to_auto_and_validate():
    cfg = TrainConfig(data="x")
    assert (
        cfg.backbone_lr_scale,
        cfg.warmup_epochs,
        cfg.label_smoothing,
        cfg.random_crops,
        cfg.crop_scale_min,
        cfg.cache_data,
        cfg.augment,
    ) == (None, None, None, None, None, None, "none")
    with pytest.raises(ConfigError, match="--crop-scale-min 0.0"):
        TrainConfig(data="x", crop_scale_min=0.0)

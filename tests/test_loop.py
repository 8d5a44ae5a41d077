"""The plain PyTorch loop: a non-finite loss stops training at the step it happens. No Ray."""

import numpy as np
import pytest
import torch
from torch import nn

from distcls.train.loop import NonFiniteLossError, build_optimizer, masked_loss, train_one_epoch


class Explodes(nn.Module):
    """A linear model whose output becomes NaN from its 3rd call on."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3 * 4 * 4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.net(x.float().flatten(1))
        return out * float("nan") if self.calls >= 3 else out


def batches(n):
    for _ in range(n):
        yield {"image": np.zeros((4, 3, 4, 4), np.uint8), "label": np.array([0, 1, 0, 1]), "mask": np.ones(4, np.float32)}


def test_non_finite_loss_names_the_step():
    model = Explodes()
    opt = build_optimizer(model, "sgd", 0.1, 0.0, 0.9, set(), 1.0)
    loss_fn = lambda logits, labels, mask: masked_loss(logits, labels, mask, None, 0.0)  # noqa: E731
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 12; lower --lr"):
        train_one_epoch(model, batches(5), opt, loss_fn, torch.device("cpu"), schedule=lambda s: 1.0, start_step=10)


def test_no_weight_decay_on_norm_and_bias_and_smaller_backbone_lr():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    opt = build_optimizer(model, "adamw", 1e-3, 0.05, 0.9, head_names={"3.weight", "3.bias"}, backbone_lr_scale=0.1)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["0.weight"])]["weight_decay"] == 0.05
    assert by_param[id(named["0.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["1.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["0.weight"])]["lr"] == pytest.approx(1e-4)
    assert by_param[id(named["3.weight"])]["lr"] == pytest.approx(1e-3)
    with pytest.raises(Exception, match="only sgd and adamw are supported"):
        build_optimizer(model, "rmsprop", 1e-3, 0.0, 0.9, set(), 1.0)


def test_a_one_image_batch_trains_with_a_masked_copy():
    """At 32 px EfficientNet-Lite0's last feature maps are 1x1: a single image gives BatchNorm one value
    per channel, which training mode refuses. The worker pads such a batch with a masked copy."""
    from distcls.models import create_model
    from distcls.train.worker import pad_single

    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 255, (1, 3, 32, 32), dtype=np.uint8),
        "label": np.array([2]),
        "mask": np.ones(1, np.float32),
    }
    model = create_model("efficientnet_lite0", 3, "none", image_size=32).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(torch.from_numpy(batch["image"]))
    padded = pad_single(batch)
    assert padded["image"].shape == (2, 3, 32, 32) and padded["label"].tolist() == [2, 2]
    assert padded["mask"].tolist() == [1.0, 0.0] and pad_single(padded) is padded
    opt = build_optimizer(model, "sgd", 0.01, 0.0, 0.9, set(), 1.0)

    def loss_fn(logits, labels, mask):
        return masked_loss(logits, labels, mask, None, 0.0)

    stats = train_one_epoch(model, [padded], opt, loss_fn, torch.device("cpu"), schedule=lambda s: 1.0, start_step=0)
    assert stats.steps == 1 and stats.samples == 1  # the copy counts for nothing

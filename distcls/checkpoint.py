"""The checkpoint contract: a directory with model.safetensors (weights only) and distcls.json.

distcls.json: format, distcls version, architecture, class names in index order, preprocessing spec,
metrics, the resolved training config, and the sha256 of model.safetensors. Loading verifies the hash
and never unpickles. distcls.json is written last, so a directory without it is incomplete.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from distcls import DistclsError, __version__, storage
from distcls.models import Classifier, create_model, for_inference
from distcls.transforms import PreprocessSpec

WEIGHTS = "model.safetensors"
META = "distcls.json"
FORMAT = "distcls-checkpoint/1"


def weights_bytes(model: Classifier) -> bytes:
    state = {k: v.detach().contiguous().cpu() for k, v in model.net.state_dict().items()}
    return save_safetensors(state, metadata={"format": "pt"})


def build_meta(model: Classifier, class_names: list[str], weights_sha256: str, metrics: dict | None = None,
               config: dict | None = None, extra: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "distcls_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "architecture": model.architecture,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "preprocessing": model.spec.to_dict(),
        "metrics": metrics or {},
        "config": config or {},
        "weights_sha256": weights_sha256,
        **(extra or {}),
    }


def save_checkpoint(uri: str, model: Classifier, class_names: list[str], metrics: dict | None = None,
                    config: dict | None = None, extra: dict | None = None) -> dict:
    """Write the checkpoint directory at `uri` (local or object storage); returns its metadata."""
    data = weights_bytes(model)
    meta = build_meta(model, class_names, hashlib.sha256(data).hexdigest(), metrics, config, extra)
    storage.write_bytes(storage.join_uri(uri, WEIGHTS), data)
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
    missing = [k for k in ("architecture", "class_names", "preprocessing", "weights_sha256") if k not in meta]
    if missing:
        raise DistclsError(f"checkpoint: {meta_uri} lacks {', '.join(missing)}")
    return meta


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
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["weights_sha256"]:
        raise DistclsError(
            f"checkpoint: {weights_uri} has sha256 {digest[:12]}..., but {META} records "
            f"{meta['weights_sha256'][:12]}...; the weights were changed or damaged, refusing to load"
        )
    return data, meta


def verify_checkpoint(uri: str) -> dict:
    """The metadata of a complete, untampered checkpoint (see read_verified_weights), else DistclsError.

    Jobs call this on the driver before they start Ray, so a bad checkpoint fails in seconds, in one line.
    """
    return read_verified_weights(uri)[1]


def load_checkpoint(uri: str, device: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """(model in eval mode on `device`, metadata). Refuses weights whose sha256 differs from the record."""
    data, meta = read_verified_weights(uri)
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    model = create_model(meta["architecture"], len(meta["class_names"]), weights="none", spec=spec)
    model.net.load_state_dict(load_safetensors(data), strict=True)
    return for_inference(model, device), meta


def checkpoint_id(meta: dict) -> str:
    """A checkpoint's identity: the sha256 of its weights."""
    return meta["weights_sha256"]

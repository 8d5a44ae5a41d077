"""`load_model`: a verified checkpoint or export as a `Predictor` on the runtime that suits the device.

Runtime policy (`--runtime`):
- auto: a checkpoint runs on onnxruntime on CPU (compiled once, cached; 3-6x PyTorch's speed there) and on
  torch with bf16 autocast and channels_last on CUDA. If compiling or the agreement check fails, auto falls
  back to torch and says why. An export runs on its own runtime.
- torch / onnx: that runtime or a one-line error (an ONNX export cannot run on torch, a TorchScript one
  cannot run on onnxruntime).

Device policy: torch on CPU runs batches in slices of CPU_FORWARD_CHUNK images, onnxruntime in slices of
ONNX_CHUNK (the same logits, less cache pressure); threads are the caller's CPU share.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from distcls import DistclsError
from distcls.checkpoint import checkpoint_id, load_checkpoint, read_meta, verify_checkpoint
from distcls.device import DevicePolicy
from distcls.infer import onnxrt
from distcls.infer.modelfile import check_safe_to_load, is_export, read_export_file
from distcls.models import get_model_info
from distcls.transforms import PreprocessSpec

RUNTIMES = ("auto", "torch", "onnx")


@dataclass
class Predictor:
    """A loaded model: `predict(uint8 NCHW) -> float32 logits`, with what it is and how it runs."""

    meta: dict
    runtime: str  # "onnx" or "torch": what actually runs
    device: torch.device
    run: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    note: str = ""  # how the runtime was chosen (a fallback's reason, a cache hit, a compile)
    parameters: int | None = None
    run_features: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False)
    spec: PreprocessSpec = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.spec = PreprocessSpec.from_dict(self.meta["preprocessing"])

    @property
    def id(self) -> str:
        return checkpoint_id(self.meta)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, classes) float32 for uint8 NCHW images of the model's own preprocessing."""
        if len(images) == 0:
            return np.zeros((0, len(self.meta["class_names"])), dtype=np.float32)
        return np.asarray(self.run(images), dtype=np.float32)

    def predict_with_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, pooled features) for a PyTorch checkpoint on torch; DistclsError for anything else."""
        if self.run_features is None:
            raise DistclsError(
                f"infer: pooled features need a PyTorch checkpoint on the torch runtime (this is {self.runtime}"
                f"{', an export' if is_export(self.meta) else ''}); load it with runtime torch"
            )
        logits, features = self.run_features(images)
        return np.asarray(logits, dtype=np.float32), np.asarray(features, dtype=np.float32)

    def describe(self) -> dict:
        return {"runtime": self.runtime, "device": str(self.device), "note": self.note}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_runtime(uri: str, meta: dict, runtime: str, device: torch.device) -> str:
    """ "onnx" or "torch" for this model on this device under --runtime (before any compiling)."""
    if runtime not in RUNTIMES:
        raise DistclsError(f"infer: unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if is_export(meta):
        fmt = meta.get("export", {}).get("format")
        own = "onnx" if fmt == "onnx" else "torch"
        if runtime not in ("auto", own):
            raise DistclsError(
                f"infer: {uri} is a {fmt} export, which runs only on {own}; pass --runtime auto "
                f"or {own}, or give the PyTorch checkpoint"
            )
        return own
    if runtime == "auto":
        return "torch" if device.type == "cuda" else "onnx"
    return runtime


def torch_runner(model: torch.nn.Module, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    policy = DevicePolicy.of(device)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
            return policy.infer(model, x).cpu().numpy()

    return run


def load_torch(uri: str, meta: dict, device: torch.device, note: str) -> Predictor:
    if is_export(meta):  # TorchScript
        data = read_export_file(uri, meta)
        check_safe_to_load(uri, meta, data)
        model = torch.jit.load(io.BytesIO(data), map_location=device).eval()
        parameters = int(meta["export"].get("parameters") or 0) or None
        features = None
    else:
        model, meta = load_checkpoint(uri, device)
        parameters = sum(p.numel() for p in model.parameters())
        features = features_runner(model, device)
    return Predictor(meta, "torch", device, torch_runner(model, device), note, parameters, features)


def features_runner(model, device: torch.device) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(logits, the classifier head's input: the pooled features) in one forward pass, via a hook."""
    from distcls.models import get_head

    policy = DevicePolicy.of(device)
    head = get_head(model.net, get_model_info(model.architecture))
    captured: list[torch.Tensor] = []
    head.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0].detach().float()))

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        captured.clear()
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
            logits = policy.infer(model, x)
        return logits.cpu().numpy(), torch.cat(captured).flatten(1).cpu().numpy()

    return run


def compiled_onnx(uri: str, meta: dict, sample: np.ndarray | None) -> tuple[bytes, str]:
    """(ONNX bytes, note) for a checkpoint: from the cache, else compiled (and cached) now."""
    key = onnxrt.cache_key(meta)
    if (hit := onnxrt.read_cached(key)) is not None:
        verify_checkpoint(uri)  # the entry is these weights' graph only if the files still are these weights
        return hit[0], "compiled ONNX from the cache"
    with onnxrt.compile_lock(key):
        if (hit := onnxrt.read_cached(key)) is not None:  # another process compiled it while we waited
            return hit[0], "compiled ONNX from the cache"
        model, meta = load_checkpoint(uri, "cpu")  # verifies the weights against meta's sha256
        data, record = onnxrt.compile_checkpoint(model, meta, sample)
        problem = onnxrt.write_cached(key, data, record)
    note = f"compiled to ONNX in {record['compile_seconds']:.1f} s"
    return data, note + (f" (not cached: {problem})" if problem else ", cached")


def checkpoint_parameters(meta: dict) -> int:
    """The parameter count of a checkpoint's network, without materialising it."""
    with torch.device("meta"):
        return sum(p.numel() for p in get_model_info(meta["architecture"]).build(len(meta["class_names"])).parameters())


def checkpoint_onnx(uri: str, meta: dict, runtime: str, sample: np.ndarray | None) -> tuple[bytes | None, str]:
    """(ONNX bytes, note) for a checkpoint, or (None, why) when compiling fails and `auto` falls back to torch."""
    try:
        return compiled_onnx(uri, meta, sample)
    except onnxrt.CompileError as exc:
        if runtime == "onnx":
            raise DistclsError(f"infer: {uri}: {exc}; use --runtime torch (or auto, which falls back to it)") from None
        print(f"distcls: {uri}: {exc}; running on torch instead", flush=True)
        return None, f"fell back to torch: {exc}"


def load_onnx(uri: str, meta: dict, data: bytes, device: torch.device, threads: int | None, note: str) -> Predictor:
    session = onnxrt.OnnxSession(data, device, threads)
    parameters = int(meta["export"].get("parameters") or 0) if is_export(meta) else checkpoint_parameters(meta)
    return Predictor(meta, "onnx", device, session.run, f"{note} on {session.provider}", parameters)


def load_model(
    uri: str,
    runtime: str = "auto",
    device: str | torch.device | None = None,
    threads: int | None = None,
    sample: np.ndarray | None = None,
) -> Predictor:
    """A checkpoint or export directory as a Predictor (verified; see the module doc for the policy).
    `sample`: real uint8 NCHW images of the task for the compile check (generated ones otherwise)."""
    device = torch.device(device) if device is not None else default_device()
    if threads:
        torch.set_num_threads(threads)
    meta = read_meta(uri)
    chosen = choose_runtime(uri, meta, runtime, device)
    if chosen == "torch":
        return load_torch(uri, meta, device, f"--runtime {runtime}: torch on {device.type}")
    if is_export(meta):
        data = read_export_file(uri, meta)
        check_safe_to_load(uri, meta, data)
        return load_onnx(uri, meta, data, device, threads, "ONNX export")
    data, note = checkpoint_onnx(uri, meta, runtime, sample)
    if data is None:
        return load_torch(uri, meta, device, note)
    return load_onnx(uri, meta, data, device, threads, note)


def prepare_runtime(uri: str, runtime: str, use_gpu: bool, sample: np.ndarray | None = None) -> tuple[str, str]:
    """What a job's actors should run, decided once in the driver: ("onnx" | "torch", note). For a checkpoint
    on onnxruntime this compiles it into the cache now (with the job's own images as the check), so the
    actors only read it; a failure under auto is reported here, once, and the actors get "torch"."""
    device = torch.device("cuda" if use_gpu else "cpu")
    meta = read_meta(uri)
    chosen = choose_runtime(uri, meta, runtime, device)
    if chosen == "torch" or is_export(meta):
        return chosen, f"{chosen} on {device.type}"
    data, note = checkpoint_onnx(uri, meta, runtime, sample)
    return ("onnx" if data is not None else "torch"), note

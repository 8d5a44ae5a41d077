"""`distcls export`: a checkpoint as ONNX (run by onnxruntime, optionally int8) or TorchScript, and
`load_predictor`, the one loader that label, serve, evaluate and compare use for checkpoints and exports.

An export is a directory like a checkpoint: `distcls.json` (the checkpoint's record: architecture, class
names, preprocessing, metrics, config; plus `export`: format, runtime, quantization, the source
checkpoint and its id, the top-1 agreement measured on real images) and `model.onnx` or `model.ts`.
Its `weights_sha256` is the sha256 of that model file: the export's identity (the `model` column of
labels, the endpoint's model id), verified on every load. The exported graph is the whole `Classifier`:
uint8 NCHW images in (dynamic batch), logits out, normalisation inside, so every consumer keeps using
`transforms.preprocess_bytes` with the spec in distcls.json and nothing can skew.

Whoever can write the model bucket can also write the sha256 in distcls.json: the hash proves integrity, not
authorship. So loading also refuses what would run code or read other files: TorchScript (its methods run
as it loads) unless the operator trusts it (`--trust-torchscript`, i.e. DISTCLS_TRUST_TORCHSCRIPT=1, or its
sha256 in DISTCLS_TRUSTED_MODELS), ONNX tensors kept in external files, and an `export.file` other than the
format's own file name.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import tempfile

import numpy as np
import torch

from distcls import DistclsError, __version__, storage
from distcls.checkpoint import META, checkpoint_id, load_checkpoint, read_meta, verify_checkpoint
from distcls.config import ExportConfig
from distcls.images import IMAGE_EXTENSIONS
from distcls.transforms import PreprocessSpec

FORMAT = "distcls-export/1"
FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
TRUST_ENV = "DISTCLS_TRUST_TORCHSCRIPT"  # "1": run any TorchScript export (what --trust-torchscript sets)
TRUSTED_MODELS_ENV = "DISTCLS_TRUSTED_MODELS"  # comma-separated sha256s of TorchScript exports to run


def is_export(meta: dict) -> bool:
    return str(meta.get("format", "")).startswith("distcls-export")


# --- running an export ----------------------------------------------------------------------------------

class OnnxPredictor:
    """onnxruntime session with the `Classifier`'s interface: uint8 NCHW tensor -> logits tensor."""

    def __init__(self, data: bytes, device: torch.device, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise DistclsError("export: this model is ONNX and needs onnxruntime; pip install "
                               "'distcls[export]' (or onnxruntime)") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(data, options, providers=providers)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(images.detach().cpu().numpy().astype(np.uint8, copy=False))
        return torch.from_numpy(self.session.run(None, {self.input: arr})[0])

    def eval(self) -> "OnnxPredictor":
        return self


def export_file_name(uri: str, meta: dict) -> str:
    """`export.file`, which must be exactly the format's own file in the export directory (never a path)."""
    export = meta.get("export")
    fmt = export.get("format") if isinstance(export, dict) else None
    if fmt not in FILES:
        raise DistclsError(f"export: {uri} has unknown export format {fmt!r} in {META}; expected onnx or torchscript")
    if export.get("file") != FILES[fmt]:
        raise DistclsError(f"export: {uri}'s {META} names export.file {export.get('file')!r}; the model of this "
                           f"{fmt} export can only be {FILES[fmt]!r} in its directory, refusing to read any other path")
    return FILES[fmt]


def read_export_file(uri: str, meta: dict) -> bytes:
    """The export's model file, once its sha256 matches distcls.json (as for checkpoints' weights)."""
    file_uri = storage.join_uri(uri, export_file_name(uri, meta))
    if not storage.exists(file_uri):
        raise DistclsError(f"export: {uri} has no model file {meta['export']['file']!r}; export the checkpoint again")
    data = storage.read_bytes(file_uri)
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["weights_sha256"]:
        raise DistclsError(f"export: {file_uri} has sha256 {digest[:12]}..., but {META} records "
                           f"{meta['weights_sha256'][:12]}...; the file was changed or damaged, refusing to load")
    return data


# --- what a model file may do when loaded -------------------------------------------------------------

def trust_torchscript() -> None:
    """--trust-torchscript: run TorchScript exports in this process and in every Ray worker it starts
    (runtime.FORWARDED_ENV carries TRUST_ENV). Inside `ray job submit` only the job's runtime env reaches
    the workers, so there the variable must already be set."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and os.environ.get(TRUST_ENV) != "1":
        raise DistclsError(f"export: --trust-torchscript inside `ray job submit` does not reach the job's workers; "
                           f"add {TRUST_ENV}=1 to --runtime-env-json's env_vars instead")
    os.environ[TRUST_ENV] = "1"


def trust_env() -> dict[str, str]:
    """The trust variables set in this process (what a Serve config must carry to its replicas)."""
    return {k: os.environ[k] for k in (TRUST_ENV, TRUSTED_MODELS_ENV) if os.environ.get(k)}


def trusted_models() -> set[str]:
    """The sha256s listed in DISTCLS_TRUSTED_MODELS (a malformed entry is an error, not a silent miss)."""
    entries = {e.strip().lower() for e in os.environ.get(TRUSTED_MODELS_ENV, "").split(",") if e.strip()}
    bad = sorted(e for e in entries if not re.fullmatch(r"[0-9a-f]{64}", e))
    if bad:
        raise DistclsError(f"export: {TRUSTED_MODELS_ENV} entry {bad[0][:70]!r} is not a sha256; list the full "
                           "64-hex-digit sha256 of each trusted model, comma-separated")
    return entries


def check_torchscript_trusted(uri: str, sha256: str) -> None:
    """TorchScript runs the file's own code as it loads (`__setstate__`) and runs: only when trusted."""
    if os.environ.get(TRUST_ENV) == "1" or sha256 in trusted_models():
        return
    raise DistclsError(f"export: {uri} is TorchScript, which runs code from the model file, and it is not trusted; "
                       f"refusing to load (if you trust whoever can write it: --trust-torchscript, or add its "
                       f"sha256 {sha256} to {TRUSTED_MODELS_ENV})")


def graph_tensors(graph, where: str):
    """(place, TensorProto) for every tensor an ONNX graph holds, its subgraphs' included."""
    for t in graph.initializer:
        yield where, t
    for sparse in graph.sparse_initializer:
        yield where, sparse.values
        yield where, sparse.indices
    for node in graph.node:
        yield from node_tensors(node, f"{where}/{node.op_type} {node.name!r}")


def node_tensors(node, where: str):
    """Tensors in a node's attributes (Constant values, sparse tensors) and in its subgraphs (If/Loop/Scan)."""
    for a in node.attribute:
        tensors = ([a.t] if a.HasField("t") else []) + list(a.tensors)
        for sparse in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
            tensors += [sparse.values, sparse.indices]
        for t in tensors:
            yield where, t
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            yield from graph_tensors(g, f"{where}.{a.name}")


def model_tensors(model):
    yield from graph_tensors(model.graph, "graph")
    for f in model.functions:
        for node in f.node:
            yield from node_tensors(node, f"function {f.name}")
    for info in model.training_info:
        yield from graph_tensors(info.initialization, "training_info")
        yield from graph_tensors(info.algorithm, "training_info")


def refuse_external_data(data: bytes, file_uri: str) -> None:
    """ONNX tensors may name a file to read their bytes from (external data, relative paths like
    `../../etc/x` included); parse the model without loading any and refuse such a tensor, before
    onnxruntime sees the model. `distcls export` never writes external data."""
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise DistclsError("export: checking an ONNX model needs the onnx package; pip install "
                           "'distcls[export]' (or onnx)") from None
    try:
        model = onnx.load_model_from_string(data)
    except DecodeError as exc:
        raise DistclsError(f"export: {file_uri} is not an ONNX model ({exc}); export the checkpoint again") from None
    for where, t in model_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            location = {e.key: e.value for e in t.external_data}.get("location", "")
            raise DistclsError(f"export: {file_uri} keeps tensor {t.name!r} ({where}) in the external file "
                               f"{location!r}; refusing to read files outside the model (`distcls export` never "
                               "writes external data): export the checkpoint again")


def check_safe_to_load(uri: str, meta: dict, data: bytes) -> None:
    """Refuse an export whose loading would run its code (untrusted TorchScript) or read other files."""
    if meta["export"]["format"] == "torchscript":
        check_torchscript_trusted(uri, meta["weights_sha256"])  # == sha256(data), read_export_file checked
    else:
        refuse_external_data(data, storage.join_uri(uri, FILES["onnx"]))


def verify_model(uri: str) -> dict:
    """The metadata of a complete, untampered checkpoint or export, else one-line DistclsError (drivers
    call this before they start Ray)."""
    meta = read_meta(uri)
    if not is_export(meta):
        return verify_checkpoint(uri)
    check_safe_to_load(uri, meta, read_export_file(uri, meta))
    return meta


def load_predictor(uri: str, device: str | torch.device = "cpu", threads: int | None = None):
    """(callable uint8 NCHW -> logits, metadata) for a checkpoint or an export directory (verified)."""
    device = torch.device(device)
    meta = read_meta(uri)
    if not is_export(meta):
        return load_checkpoint(uri, device)
    data = read_export_file(uri, meta)
    check_safe_to_load(uri, meta, data)
    if meta["export"]["format"] == "onnx":
        return OnnxPredictor(data, device, threads), meta
    return torch.jit.load(io.BytesIO(data), map_location=device).eval(), meta


def model_file_uri(uri: str) -> str:
    """The file whose bytes a checkpoint or export is (its size on disk)."""
    meta = read_meta(uri)
    return storage.join_uri(uri, export_file_name(uri, meta) if is_export(meta) else "model.safetensors")


# --- writing an export ----------------------------------------------------------------------------------

def sample_paths(uri: str, n: int, seed: int = 0) -> list[str]:
    """Up to `n` image paths from a labeled split, a manifest or any prefix, spread over the listing."""
    from distcls.datasets import MANIFEST_EXTENSIONS, read_manifest

    if uri.lower().endswith(MANIFEST_EXTENSIONS):
        paths = read_manifest(uri).paths
    else:
        paths = sorted(storage.iter_files(uri.rstrip("/"), IMAGE_EXTENSIONS))
    if not paths:
        raise DistclsError(f"export: no images under --sample {uri}; give real images of the model's domain")
    order = np.random.default_rng(seed).permutation(len(paths))
    return [paths[i] for i in order[:n]]


def read_sample(paths: list[str], spec: PreprocessSpec) -> np.ndarray:
    """Decoded uint8 NCHW images (through the one preprocessing path); undecodable ones are left out."""
    from distcls.datasets import load_images

    batch = load_images({"path": np.asarray(paths, dtype=object)}, spec)
    ok = np.array([not e for e in batch["error"]], dtype=bool)
    if not ok.any():
        raise DistclsError(f"export: none of the {len(paths)} sample images could be decoded "
                           f"(e.g. {batch['error'][0]})")
    return batch["image"][ok]


def export_onnx(model, path: str, image_size: int, opset: int) -> None:
    """The whole Classifier (uint8 in, normalisation inside) with a dynamic batch axis (torch.export based)."""
    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(model, (example,), input_names=["image"], output_names=["logits"],
                                    opset_version=opset, dynamo=True,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
        program.save(path)


def export_torchscript(model, path: str, image_size: int) -> None:
    import warnings

    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)
    with warnings.catch_warnings():
        # Shapes are fixed by the preprocessing spec; only the batch size varies, which tracing keeps.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(path)


def quantize_int8(src: str, dst: str, calibration: np.ndarray, mode: str) -> None:
    """onnxruntime quantization: static QDQ (per-channel int8 weights, uint8 activations calibrated on
    real images) or dynamic (weights only ahead of time)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = src + ".pre.onnx"
    quant_pre_process(src, prepared, skip_symbolic_shape=True)
    if mode == "dynamic":
        quantize_dynamic(prepared, dst, weight_type=QuantType.QInt8)
        return

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calibration[i:i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(prepared, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def agreement(reference, candidate, images: np.ndarray, batch_size: int = 32) -> dict:
    """Top-1 agreement and the largest logit difference between two predictors on the same images."""
    agree, max_diff = 0, 0.0
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i:i + batch_size])
            a, b = reference(x).float(), candidate(x).float()
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            max_diff = max(max_diff, float((a - b).abs().max()))
    return {"images": int(len(images)), "agree": agree, "rate": agree / max(1, len(images)),
            "max_abs_logit_diff": max_diff}


def build_export_meta(source_meta: dict, cfg: ExportConfig, file: str, data: bytes, parameters: int,
                      check: dict) -> dict:
    meta = {k: v for k, v in source_meta.items() if k not in ("history",)}
    meta.update({
        "format": FORMAT,
        "distcls_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "export": {
            "format": cfg.format, "runtime": "onnxruntime" if cfg.format == "onnx" else "torch",
            "quantization": None if cfg.quantize == "none" else f"int8-{cfg.calibration}",
            "file": file, "file_bytes": len(data), "parameters": parameters,
            "opset": cfg.opset if cfg.format == "onnx" else None,
            "source_checkpoint": cfg.checkpoint, "source_id": checkpoint_id(source_meta),
            "sample": cfg.sample, "agreement": check, "torch_version": torch.__version__, "out": cfg.out,
        },
    })
    return meta


def run_export(cfg: ExportConfig) -> dict:
    """Export, check top-1 agreement on real images, then write (model file first, distcls.json last)."""
    model, source_meta = load_checkpoint(cfg.checkpoint)
    if is_export(source_meta):
        raise DistclsError(f"export: {cfg.checkpoint} is already an export; pass the PyTorch checkpoint")
    spec = PreprocessSpec.from_dict(source_meta["preprocessing"])
    calibrate = cfg.quantize == "int8" and cfg.calibration == "static"
    paths = sample_paths(cfg.sample, cfg.sample_size + (cfg.calibration_size if calibrate else 0))
    images = read_sample(paths, spec)
    check_images = images[:cfg.sample_size]
    # Calibrate on images the check does not use, when the sample has enough of them.
    calibration = images[cfg.sample_size:] if len(images) > cfg.sample_size else images[:cfg.calibration_size]
    file = FILES[cfg.format]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, file)
        if cfg.format == "onnx":
            export_onnx(model, path if cfg.quantize == "none" else path + ".fp32.onnx", spec.image_size, cfg.opset)
            if cfg.quantize == "int8":
                quantize_int8(path + ".fp32.onnx", path, calibration, cfg.calibration)
        else:
            export_torchscript(model, path, spec.image_size)
        with open(path, "rb") as f:
            data = f.read()
    # Bytes this process has just traced from a verified safetensors checkpoint: loading them runs no one
    # else's code, so no trust is needed here.
    candidate = OnnxPredictor(data, torch.device("cpu")) if cfg.format == "onnx" else \
        torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    check = agreement(model, candidate, check_images)
    if check["rate"] < cfg.min_agreement:
        hint = {"none": "this is a bug in the exporter: please report it",
                "static": "calibrate on more representative images (--sample, --calibration-size), export without "
                          "--quantize, or accept it knowingly with a lower --min-agreement",
                "dynamic": "try --calibration static (much better for CNNs), or export without --quantize"}
        raise DistclsError(
            f"export: the {cfg.format}{' int8' if cfg.quantize == 'int8' else ''} model agrees with the checkpoint's "
            f"top-1 on only {check['agree']}/{check['images']} sample images ({check['rate']:.1%} < --min-agreement "
            f"{cfg.min_agreement:.0%}); nothing written. "
            + hint["none" if cfg.quantize == "none" else cfg.calibration])
    parameters = sum(p.numel() for p in model.parameters())
    meta = build_export_meta(source_meta, cfg, file, data, parameters, check)
    storage.write_bytes(storage.join_uri(cfg.out, file), data)
    storage.write_text(storage.join_uri(cfg.out, META), json.dumps(meta, indent=2, default=str))
    return meta

"""`distcls export`: a checkpoint as ONNX (run by onnxruntime, optionally int8) or TorchScript.

An export is a directory like a checkpoint: `distcls.json` (the checkpoint's record: architecture, class
names, preprocessing, metrics, config; plus `export`: format, runtime, quantization, the source
checkpoint and its id, the top-1 agreement measured on real images) and `model.onnx` or `model.ts`.
Its `weights_sha256` is the sha256 of that model file: the export's identity (the `model` column of
labels, the endpoint's model id), verified on every load. The exported graph is the whole `Classifier`:
uint8 NCHW images in (dynamic batch), logits out, normalisation inside, so every consumer keeps using
`transforms.preprocess_bytes` with the spec in distcls.json and nothing can skew. Reading and running
exports (and the checks on files someone else wrote) is `distcls.infer`'s.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import tempfile

import numpy as np
import torch

from distcls import DistclsError, __version__, storage
from distcls.checkpoint import META, checkpoint_id, load_checkpoint
from distcls.config import ExportConfig
from distcls.images import IMAGE_EXTENSIONS
from distcls.infer.modelfile import FILES, FORMAT, is_export
from distcls.infer.onnxrt import OnnxSession, agreement, export_onnx
from distcls.transforms import PreprocessSpec

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


def sample_images(uri: str, n: int, spec: PreprocessSpec) -> np.ndarray:
    """Up to `n` decoded sample images of --sample: packed data's first rows (of its val split, else test, else
    train), or images spread over a listing (sample_paths)."""
    from distcls.splits import HELD_OUT_SPLITS, open_packed_split

    packed = open_packed_split(uri, HELD_OUT_SPLITS)
    if packed is None:
        return read_sample(sample_paths(uri, n), spec)
    images = packed.sample_images(spec, n)
    if images is None:
        raise DistclsError(f"export: none of the first {n} images of {packed.source} could be decoded; give other --sample data")
    return images


def read_sample(paths: list[str], spec: PreprocessSpec) -> np.ndarray:
    """Decoded uint8 NCHW images (through the one preprocessing path); undecodable ones are left out."""
    from distcls.datasets import load_images

    batch = load_images({"path": np.asarray(paths, dtype=object)}, spec)
    ok = np.array([not e for e in batch["error"]], dtype=bool)
    if not ok.any():
        raise DistclsError(f"export: none of the {len(paths)} sample images could be decoded (e.g. {batch['error'][0]})")
    return batch["image"][ok]


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
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = src + ".pre.onnx"
    quant_pre_process(src, prepared, skip_symbolic_shape=True)
    if mode == "dynamic":
        quantize_dynamic(prepared, dst, weight_type=QuantType.QInt8)
        return

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calibration[i : i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        prepared,
        dst,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def numpy_runner(model):
    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images)).float().numpy()

    return run


def build_export_meta(source_meta: dict, cfg: ExportConfig, file: str, data: bytes, parameters: int, check: dict) -> dict:
    meta = {k: v for k, v in source_meta.items() if k not in ("history",)}
    meta.update(
        {
            "format": FORMAT,
            "distcls_version": __version__,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "weights_sha256": hashlib.sha256(data).hexdigest(),
            "export": {
                "format": cfg.format,
                "runtime": "onnxruntime" if cfg.format == "onnx" else "torch",
                "quantization": None if cfg.quantize == "none" else f"int8-{cfg.calibration}",
                "file": file,
                "file_bytes": len(data),
                "parameters": parameters,
                "opset": cfg.opset if cfg.format == "onnx" else None,
                "source_checkpoint": cfg.checkpoint,
                "source_id": checkpoint_id(source_meta),
                "sample": cfg.sample,
                "agreement": check,
                "torch_version": torch.__version__,
                "out": cfg.out,
            },
        }
    )
    return meta


def run_export(cfg: ExportConfig) -> dict:
    """Export, check top-1 agreement on real images, then write (model file first, distcls.json last)."""
    model, source_meta = load_checkpoint(cfg.checkpoint)
    if is_export(source_meta):
        raise DistclsError(f"export: {cfg.checkpoint} is already an export; pass the PyTorch checkpoint")
    spec = PreprocessSpec.from_dict(source_meta["preprocessing"])
    calibrate = cfg.quantize == "int8" and cfg.calibration == "static"
    images = sample_images(cfg.sample, cfg.sample_size + (cfg.calibration_size if calibrate else 0), spec)
    check_images = images[: cfg.sample_size]
    # Calibrate on images the check does not use, when the sample has enough of them.
    calibration = images[cfg.sample_size :] if len(images) > cfg.sample_size else images[: cfg.calibration_size]
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
    check = agreement(
        numpy_runner(model),
        OnnxSession(data, torch.device("cpu")).run
        if cfg.format == "onnx"
        else numpy_runner(torch.jit.load(io.BytesIO(data), map_location="cpu").eval()),
        check_images,
    )
    if check["rate"] < cfg.min_agreement:
        hint = {
            "none": "this is a bug in the exporter: please report it",
            "static": "calibrate on more representative images (--sample, --calibration-size), export without "
            "--quantize, or accept it knowingly with a lower --min-agreement",
            "dynamic": "try --calibration static (much better for CNNs), or export without --quantize",
        }
        raise DistclsError(
            f"export: the {cfg.format}{' int8' if cfg.quantize == 'int8' else ''} model agrees with the checkpoint's "
            f"top-1 on only {check['agree']}/{check['images']} sample images ({check['rate']:.1%} < --min-agreement "
            f"{cfg.min_agreement:.0%}); nothing written. " + hint["none" if cfg.quantize == "none" else cfg.calibration]
        )
    parameters = sum(p.numel() for p in model.parameters())
    meta = build_export_meta(source_meta, cfg, file, data, parameters, check)
    storage.write_bytes(storage.join_uri(cfg.out, file), data)
    storage.write_text(storage.join_uri(cfg.out, META), json.dumps(meta, indent=2, default=str))
    return meta

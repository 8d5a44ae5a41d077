"""onnxruntime for distcls models: the session, compiling a checkpoint to ONNX once, and the compile cache.

A checkpoint runs on onnxruntime by compiling its whole `Classifier` (uint8 NCHW in, normalisation inside,
logits out, dynamic batch) with torch.export-based `torch.onnx.export`, then checking that the compiled
graph agrees with torch on sample images before anything uses it. The result is cached on local disk,
keyed by the checkpoint's weights sha256 and everything else the graph depends on (architecture,
preprocessing, number of classes, torch version, opset), so that every actor and replica on a machine
after the first loads it in milliseconds. The cache lives in $DISTCLS_CACHE_DIR, else
$XDG_CACHE_HOME/distcls, else ~/.cache/distcls; each entry's model file is verified against its recorded
sha256 when read, and a damaged entry is compiled again. The cache decides which model runs, so a cache
folder (or file) that another user owns or can write is refused, and so is a cached model that would read
other files (ONNX external data), before onnxruntime sees it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import tempfile
import time

import numpy as np
import torch

from distcls import DistclsError, __version__
from distcls.infer.modelfile import refuse_external_data

CACHE_ENV = "DISTCLS_CACHE_DIR"
OPSET = 18
COMPILE_FORMAT = 1  # bump when the compiled graph changes for the same inputs
# Images per onnxruntime call: EfficientNet-Lite0 at 224 px, 2 threads, on the 2-core development machine
# does 146-162 img/s at batches 1-8 and 127-147 at 32 (activations of big batches leave the caches).
ONNX_CHUNK = 8
# A compiled graph must give the same top-1 as torch on all but 1% of the check images, and logits within
# this tolerance (relative to the logits' own scale): float32 reordering differs by ~1e-5.
MAX_DISAGREEMENT = 0.01
LOGIT_TOLERANCE = 1e-3


class CompileError(DistclsError):
    """The checkpoint could not be compiled to ONNX, or the result disagreed with torch."""


class OnnxSession:
    """An onnxruntime session for a distcls graph: uint8 NCHW numpy -> float32 logits numpy."""

    def __init__(self, data: bytes, device: torch.device, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(data, options, providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.provider = self.session.get_providers()[0]

    def run(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if len(images) <= ONNX_CHUNK:
            return self.session.run(None, {self.input: images})[0]
        return np.concatenate(
            [self.session.run(None, {self.input: images[i : i + ONNX_CHUNK]})[0] for i in range(0, len(images), ONNX_CHUNK)]
        )


def export_onnx(model: torch.nn.Module, path: str, image_size: int, opset: int = OPSET) -> None:
    """The whole Classifier (uint8 in, normalisation inside) with a dynamic batch axis (torch.export based)."""
    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["image"],
            output_names=["logits"],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
        program.save(path)


def agreement(reference, candidate, images: np.ndarray, batch_size: int = 32) -> dict:
    """Top-1 agreement and the largest logit difference of two numpy predictors on the same images."""
    agree, max_diff, scale = 0, 0.0, 0.0
    for i in range(0, len(images), batch_size):
        a = np.asarray(reference(images[i : i + batch_size]), dtype=np.float32)
        b = np.asarray(candidate(images[i : i + batch_size]), dtype=np.float32)
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        max_diff = max(max_diff, float(np.abs(a - b).max()))
        scale = max(scale, float(np.abs(a).max()))
    return {
        "images": int(len(images)),
        "agree": agree,
        "rate": agree / max(1, len(images)),
        "max_abs_logit_diff": max_diff,
        "max_abs_logit": scale,
    }


def check_images(image_size: int, n: int = 8, seed: int = 0) -> np.ndarray:
    """Images for the compile check when the caller has none of its own: smooth random fields at several
    scales (photo-like spectra, not white noise), deterministic."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    for i in range(n):
        coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 2 + 3 * i, 2 + 3 * i)).astype(np.float32))
        field = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bicubic")
        field += torch.from_numpy(rng.normal(0, 12, (1, 3, image_size, image_size)).astype(np.float32))
        out[i] = field.clamp(0, 255).to(torch.uint8)[0].numpy()
    return out


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get(CACHE_ENV) or os.path.join(base, "distcls")


def cache_key(meta: dict) -> str:
    """Everything the compiled graph depends on: the weights (by sha256) and how they are wired."""
    ident = {
        "weights_sha256": meta["weights_sha256"],
        "architecture": meta["architecture"],
        "preprocessing": meta["preprocessing"],
        "classes": len(meta["class_names"]),
        "torch": torch.__version__,
        "opset": OPSET,
        "format": COMPILE_FORMAT,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def check_private(path: str, st: os.stat_result) -> None:
    """A cache folder or file only this user can write: anyone else who could would choose the model that
    every distcls process of this user on the machine runs (the sha256 in compiled.json is written by the
    same hand as the model, so it proves nothing about who wrote it)."""
    if st.st_uid != os.geteuid():
        raise DistclsError(
            f"infer: the ONNX compile cache {path} is owned by user id {st.st_uid}, not by this user "
            f"({os.geteuid()}), refusing to use it; set {CACHE_ENV} to a folder of your own"
        )
    if st.st_mode & 0o022:
        raise DistclsError(
            f"infer: the ONNX compile cache {path} can be written by other users (mode {st.st_mode & 0o777:o}), "
            f"refusing to use it; chmod go-w {path}, or set {CACHE_ENV} to a folder of your own"
        )


def cache_dir(*parts: str, create: bool = False) -> str:
    """The cache root joined with `parts`, each folder on the way checked (and made, private, with `create`)."""
    path = cache_root()
    if create:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for level in range(len(parts) + 1):
        folder = os.path.join(path, *parts[:level])
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o700)
        try:
            check_private(folder, os.stat(folder))
        except FileNotFoundError:
            break  # nothing there yet, so nothing anyone planted
    return os.path.join(path, *parts)


def read_cached(key: str) -> tuple[bytes, dict] | None:
    """(model bytes, record) of a complete, undamaged cache entry, else None. The cache is checked to be this
    user's alone, and an entry whose model would read other files (ONNX external data, which distcls never
    writes) is refused whatever its record says: the record is written by the same hand as the model."""
    entry = cache_dir("onnx", key)
    try:
        with open(os.path.join(entry, "compiled.json")) as f:
            record = json.load(f)
        with open(os.path.join(entry, "model.onnx"), "rb") as f:
            check_private(f.name, os.fstat(f.fileno()))
            data = f.read()
    except (OSError, ValueError):
        return None
    if hashlib.sha256(data).hexdigest() != record.get("onnx_sha256"):
        return None
    fix = f"delete {entry} (distcls never caches such a model; find out who wrote it)"
    refuse_external_data(data, os.path.join(entry, "model.onnx"), origin="infer: compile cache", fix=fix)
    return data, record


def write_cached(key: str, data: bytes, record: dict) -> str | None:
    """Store an entry (model first, record last, each atomically); returns why not when the cache is unwritable."""
    entry = os.path.join(cache_root(), "onnx", key)
    try:
        entry = cache_dir("onnx", key, create=True)
        for name, payload in (("model.onnx", data), ("compiled.json", json.dumps(record, indent=2).encode())):
            fd, tmp = tempfile.mkstemp(dir=entry, prefix=f".{name}.")  # mode 0600
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.replace(tmp, os.path.join(entry, name))
    except OSError as exc:
        return f"could not write the compile cache {entry} ({exc.strerror or exc}); set {CACHE_ENV} to a writable folder"
    return None


@contextlib.contextmanager
def compile_lock(key: str):
    """One compile per cache entry per machine at a time (actors starting together wait for the first)."""
    try:
        fd = os.open(os.path.join(cache_dir("onnx", create=True), f".{key}.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError:
        yield  # an unwritable cache: compile without it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def compile_checkpoint(model: torch.nn.Module, meta: dict, sample: np.ndarray | None) -> tuple[bytes, dict]:
    """Compile a loaded checkpoint to ONNX and check it against torch; CompileError says why it can't be used."""
    started = time.perf_counter()
    size = int(meta["preprocessing"]["image_size"])
    images = sample[:16] if sample is not None and len(sample) else check_images(size)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(model.cpu().eval(), os.path.join(tmp, "model.onnx"), size)
            with open(os.path.join(tmp, "model.onnx"), "rb") as f:
                data = f.read()
        # a graph too big for one file keeps its weights beside it, which the bytes alone would look for in
        # the working directory: never load such a graph
        refuse_external_data(data, "the compiled graph", origin="infer", fix="run it on --runtime torch")
        session = OnnxSession(data, torch.device("cpu"))
    except Exception as exc:
        raise CompileError(
            f"compiling {meta['architecture']} to ONNX failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from None

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    check = agreement(reference, session.run, images)
    bad = (
        1 - check["rate"] > MAX_DISAGREEMENT
        or not np.isfinite(check["max_abs_logit_diff"])
        or check["max_abs_logit_diff"] > LOGIT_TOLERANCE * (1 + check["max_abs_logit"])
    )
    if bad:
        raise CompileError(
            f"the ONNX graph of {meta['architecture']} disagrees with torch on the check images "
            f"(top-1 {check['agree']}/{check['images']}, largest logit difference "
            f"{check['max_abs_logit_diff']:.3g})"
        )
    record = {
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "weights_sha256": meta["weights_sha256"],
        "architecture": meta["architecture"],
        "opset": OPSET,
        "torch": torch.__version__,
        "distcls": __version__,
        "check": check,
        "check_images": "sample" if sample is not None else "generated",
        "compile_seconds": round(time.perf_counter() - started, 2),
    }
    return data, record

"""`distcls.load_model(uri).classify(images)`: the inference engine for Python code.

    model = distcls.load_model("s3://bucket/runs/pets/best")     # a checkpoint or an export
    model.classify("photo.jpg")                                  # -> {"label", "score", "topk", ...}
    model.classify([jpeg_bytes, pil_image, hwc_array], top_k=3)  # -> a list of those

Nothing here is a copy of the endpoint: a model is the engine's `Predictor` (`distcls.infer.load_model`,
the runtime policy included), bytes and paths become model inputs through `transforms.preprocess_bytes`
(PIL images and arrays through the same RGB conversion and `eval_transform` after it), and each
prediction is `top_prediction` with the model's own calibration and "unknown" threshold: the fields and
the numbers of POST /v1/classify, `info` those of GET /v1/model.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps

from distcls import DistclsError, objects
from distcls.images import ImageDecodeError, _to_rgb, out_of_memory
from distcls.infer.batch import top_prediction
from distcls.scores import Calibration, resolve_unknown
from distcls.transforms import PreprocessSpec, eval_transform, preprocess_bytes

ERRORS = ("raise", "return")
MAX_TOP_K = 1000  # the endpoint's limit
DECODE_THREADS = 8  # images of one batch read and decoded at a time (decoding releases the GIL)
ENCODED = (bytes, bytearray, memoryview, str, os.PathLike)  # read (paths) and decoded in threads
ARRAY_FORMS = "a uint8 array HxWx3 (RGB), HxWx4 (RGBA) or HxW (grey)"


class ClassifyError(DistclsError):
    """An image that could not be classified (unreadable, not an image, too large): `image` is its index
    in the list (0 for a single image), `kind` one of ImageDecodeError.KINDS, or for a path "read_error",
    "not_a_file" (a folder, FIFO, device) or "too_large" (over max_object_mb)."""

    def __init__(self, image: int, kind: str, message: str):
        super().__init__(message)
        self.image, self.kind = image, kind


class Model:
    """A loaded checkpoint or export: `classify(images)`, `class_names`, `info`; `predictor` is the engine's."""

    def __init__(self, predictor, unknown_above: float | None = None, max_object_bytes: int | None = None):
        self.predictor = predictor
        self.calibration = Calibration.of(predictor.meta)
        self.unknown_above = unknown_above
        self.max_object_bytes = objects.DEFAULT_MAX_OBJECT_BYTES if max_object_bytes is None else max_object_bytes

    @property
    def class_names(self) -> list[str]:
        return self.predictor.class_names

    @property
    def id(self) -> str:
        return self.predictor.id

    @property
    def info(self) -> dict:
        """What GET /v1/model answers: id, architecture, classes, preprocessing, calibration, runtime..."""
        return model_info(self.predictor, self.unknown_above)

    def __repr__(self) -> str:
        p = self.predictor
        classes = len(self.class_names)
        return f"<distcls model {p.meta['architecture']}, {classes} classes, {p.runtime} on {p.device}, id {self.id[:12]}>"

    def classify(self, images, top_k: int = 5, errors: str = "raise", batch_size: int = 32):
        """The endpoint's prediction for one image (a dict) or for each of a list of them (a list of dicts):
        {"label", "score", "topk": [{"label", "score"}, ...], "margin", "entropy", "ood_score", "calibrated"}.

        An image is encoded bytes (any format `distcls` decodes), a local path or storage URI (str or
        os.PathLike: s3://, gs://, file://), a PIL image (any mode; converted to RGB as decoding does:
        EXIF orientation, transparency onto white, 16-bit and float grey scaled), or a numpy uint8 array
        HxWx3 in RGB order (convert OpenCV's BGR first), HxWx4 RGBA or HxW grey; CHW arrays are refused
        (transpose them with `a.transpose(1, 2, 0)`). Every image is resized and cropped with the model's
        own preprocessing. (A large JPEG's bytes decode at a reduced scale, as in every job; the same JPEG
        passed as an already decoded PIL image can differ from that by a few pixel levels.)

        An image that cannot be classified (unreadable, not an image, over the pixel limit) raises
        ClassifyError naming its index, as the endpoint answers 422 for the request; with
        errors="return" its item is {"error": {"kind", "message"}} instead (the label job's way).
        Anything that is not an image at all (an int, a float array) is refused before any work.
        `batch_size` images are decoded and run together (memory stays bounded on long lists).
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        check_arguments(items, single, top_k, errors, batch_size)
        results: list[dict] = []
        for start in range(0, len(items), batch_size):
            results += self.classify_batch(items[start : start + batch_size], start, top_k, errors, single)
        return results[0] if single else results

    def classify_batch(self, items: list, start: int, top_k: int, errors: str, single: bool) -> list[dict]:
        prepared = prepare_all(items, self.predictor.spec, self.max_object_bytes)
        failed = [(i, e) for i, (_, e) in enumerate(prepared) if e is not None]
        if failed and errors == "raise":
            i, (kind, message) = failed[0]
            where = "the image" if single else f"images[{start + i}]"
            raise ClassifyError(
                start + i, kind, f"classify: {where}: {kind}: {message} (errors='return' gives each bad image an error field)"
            )
        ok = [i for i, (x, _) in enumerate(prepared) if x is not None]
        logits = self.predictor.predict(np.stack([prepared[i][0] for i in ok])) if ok else None
        if logits is not None and not np.isfinite(logits).all():  # the endpoint's non_finite_output (a 500)
            row = int(np.flatnonzero(~np.isfinite(logits).all(axis=1))[0])
            where = "the image" if single else f"images[{start + ok[row]}]"
            raise DistclsError(
                f"classify: model {self.id[:12]}... ({self.predictor.meta['architecture']}) gave non-finite logits "
                f"(NaN or infinity) for {where}; its checkpoint is broken: load another"
            )
        out: list[dict] = [{"error": {"kind": e[0], "message": e[1]}} if e else {} for _, e in prepared]
        for row, i in enumerate(ok):
            out[i] = top_prediction(logits[row], self.class_names, top_k, self.calibration, self.unknown_above)
        return out


def load_model(
    uri: str,
    runtime: str = "auto",
    *,
    device: str | None = None,
    threads: int | None = None,
    unknown: str | float = "off",
    max_object_mb: float | None = None,
) -> Model:
    """A checkpoint or export directory (local or in object storage), verified and loaded by the inference
    engine: `runtime` auto (onnxruntime on CPU, torch on CUDA), torch or onnx; `device` "cpu", "cuda" (the
    default when there is one); `threads` the CPU threads; `unknown` as `serve --unknown`: off, auto (the
    calibrated threshold) or an energy score above which the label is "unknown"; `max_object_mb` the largest
    image file or object `classify` reads from a path or URI (default 256)."""
    from distcls.infer.engine import load_model as load_predictor

    predictor = load_predictor(os.fspath(uri), runtime, device, threads)
    threshold = resolve_unknown(unknown, Calibration.of(predictor.meta), "load_model")
    return Model(predictor, threshold, objects.max_object_bytes(max_object_mb))


def model_info(predictor, unknown_above: float | None) -> dict:
    """A loaded model as GET /v1/model describes it (the endpoint's classifier answers with this)."""
    return {
        "id": predictor.id,
        "architecture": predictor.meta["architecture"],
        "class_names": predictor.class_names,
        "num_classes": len(predictor.class_names),
        "preprocessing": predictor.meta["preprocessing"],
        "created": predictor.meta.get("created_at"),
        "calibration": calibration_numbers(predictor.meta),
        "unknown_above": unknown_above,
        **predictor.describe(),
    }


def calibration_numbers(meta: dict) -> dict | None:
    """The calibration record's finite numbers (temperature, threshold, ECE...), never its strings (the
    data URI it was fitted on names buckets)."""
    record = meta.get("calibration")
    if not isinstance(record, dict):
        return None
    return {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def non_finite(value) -> bool:
    """Whether a prediction or model description holds a NaN or an infinity anywhere (JSON has neither)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(non_finite(v) for v in value)
    return False


# --- inputs -> model inputs -------------------------------------------------------------------------------


def check_arguments(items: list, single: bool, top_k, errors: str, batch_size: int) -> None:
    """Refuse, before any image is read, what no image could fix: bad options, inputs that are not images."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= MAX_TOP_K:
        raise DistclsError(f"classify: top_k {top_k!r} must be an integer from 1 to {MAX_TOP_K}")
    if errors not in ERRORS:
        raise DistclsError(f"classify: errors={errors!r}; use 'raise' or 'return'")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DistclsError(f"classify: batch_size {batch_size!r} must be a positive integer")
    for i, item in enumerate(items):
        if (problem := input_problem(item)) is not None:
            where = "the image" if single else f"images[{i}]"
            raise DistclsError(f"classify: {where} is {problem}")


def input_problem(item) -> str | None:
    """Why `item` is not an image input, or None when it is one."""
    if isinstance(item, (bytes, bytearray, memoryview, str, os.PathLike, Image.Image)):
        return None
    if not isinstance(item, np.ndarray):
        return (
            f"of type {type(item).__name__}; pass encoded bytes, a path or URI, a PIL image or {ARRAY_FORMS} "
            "(a single image, or a list of them)"
        )
    if item.dtype != np.uint8:
        return f"a {item.dtype} array; pass {ARRAY_FORMS} (scale floats to 0..255 and convert)"
    if item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3, 4)):
        return None
    chw = item.ndim == 3 and item.shape[0] in (1, 3, 4)
    hint = "; this looks like CHW: pass a.transpose(1, 2, 0)" if chw else ""
    return f"an array of shape {item.shape}; pass {ARRAY_FORMS}{hint}"


def prepare_all(items: list, spec: PreprocessSpec, max_bytes: int) -> list[tuple[np.ndarray | None, tuple[str, str] | None]]:
    """Each item as (uint8 CHW model input, None) or (None, (kind, message)). Bytes and paths are read and
    decoded in threads; the caller's PIL images and arrays here (a lazily opened image loads on first use,
    and the same object may be in the list twice)."""
    encoded = [i for i, item in enumerate(items) if isinstance(item, ENCODED)]
    out = [prepare(item, spec, max_bytes) if not isinstance(item, ENCODED) else None for item in items]
    if len(encoded) == 1:
        out[encoded[0]] = prepare(items[encoded[0]], spec, max_bytes)
    elif encoded:
        with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, len(encoded))) as pool:
            for i, result in zip(encoded, pool.map(lambda i: prepare(items[i], spec, max_bytes), encoded)):
                out[i] = result
    return out


def prepare(item, spec: PreprocessSpec, max_bytes: int) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    try:
        if isinstance(item, (str, os.PathLike)):
            item = objects.read_object(os.fspath(item), max_bytes)  # regular files only, within max_bytes
        if isinstance(item, (bytes, bytearray, memoryview)):
            return preprocess_bytes(bytes(item), spec), None
        if isinstance(item, np.ndarray):
            item = array_image(item)
        return pil_input(item, spec), None
    except ImageDecodeError as exc:
        return None, (exc.kind, exc.message)
    except objects.ObjectReadError as exc:  # not_a_file, too_large
        return None, (exc.kind, str(exc))
    except DistclsError as exc:  # storage: missing, unreachable, denied
        return None, ("read_error", str(exc))
    except MemoryError:
        exc = out_of_memory()
        return None, (exc.kind, exc.message)


def array_image(array: np.ndarray) -> Image.Image:
    """A uint8 HxW, HxWx1, HxWx3 or HxWx4 array (input_problem checked it) as a PIL image: L, RGB or RGBA."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array))


def pil_input(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """A PIL image as the model's input: the decoder's checks and RGB conversion, then `eval_transform`."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("corrupt", f"image has size {width}x{height}")
    if width * height > spec.max_pixels:
        raise ImageDecodeError("too_large", f"{width}x{height} = {width * height} pixels exceeds the limit of {spec.max_pixels}")
    try:
        img.load()  # a lazily opened file decodes here
        rgb = _to_rgb(ImageOps.exif_transpose(img) or img)
    except MemoryError:
        raise out_of_memory() from None
    except Exception as exc:
        raise ImageDecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None
    return eval_transform(rgb, spec)

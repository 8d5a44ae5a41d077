"""The Open Inference Protocol (KServe V2 REST) on the wire: infer requests in, infer responses out. No Ray.

One input, `images`: BYTES of shape [N] (or [N, 1]), each element one encoded image. In JSON an element is
base64 (JSON has no bytes); with the binary tensor data extension (the `Inference-Header-Content-Length`
header, the input's `parameters.binary_data_size`), the raw bytes follow the JSON header, each element
prefixed by its length (uint32, little-endian), which is what tritonclient sends. Outputs, all by default:
`labels` BYTES [N], `scores` FP32 [N], `topk_labels` BYTES [N, k], `topk_scores` FP32 [N, k]; in binary when the
request says so (`binary_data_output`, or an output's `binary_data`). Errors are `{"error": "message"}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field

import numpy as np

from distcls.serving.http import RequestError, parse_top_k, too_many_images

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT = "images"
OUTPUTS = {"labels": "BYTES", "scores": "FP32", "topk_labels": "BYTES", "topk_scores": "FP32"}


@dataclass
class InferRequest:
    """What an infer request asks: its images, top_k, the outputs (name -> in binary) and its id."""

    images: list[bytes]
    top_k: int
    outputs: dict[str, bool] = field(default_factory=dict)
    id: str | None = None


def bad(message: str) -> RequestError:
    return RequestError(400, "bad_request", message)


def model_metadata(name: str, info: dict, default_top_k: int) -> dict:
    """GET /v2/models/{name}: the model's name, versions (its id), platform, inputs and outputs."""
    outputs = [{"name": n, "datatype": t, "shape": [-1] if n in ("labels", "scores") else [-1, -1]} for n, t in OUTPUTS.items()]
    return {
        "name": name,
        "versions": [info["id"][:12]],
        "platform": f"distcls-{info.get('runtime', 'unknown')}",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": outputs,
        "parameters": {"architecture": info["architecture"], "num_classes": info["num_classes"], "top_k": default_top_k},
    }


def parse_infer(body: bytes, header_length: str | None, max_images: int, default_top_k: int) -> InferRequest:
    """POST /v2/models/{name}/infer's body (JSON, or a JSON header then binary tensor data) -> InferRequest."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise bad(
                f"{HEADER_LENGTH} {header_length[:20]!r} must be the JSON header's length, at most the body's ({len(body)})"
            )
        head, binary = body[: int(header_length)], body[int(header_length) :]
    else:
        head, binary = body, b""
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad(f'the inference header is not valid JSON; send {{"inputs": [{{"name": "{INPUT}", ...}}]}}') from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or len(doc["inputs"]) != 1:
        raise bad(f'the request must have "inputs": exactly one input, "{INPUT}" (BYTES, one encoded image per element)')
    images = read_input(doc["inputs"][0], binary, max_images)
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad('"parameters" must be an object')
    return InferRequest(
        images=images,
        top_k=parse_top_k(params.get("top_k"), default_top_k),
        outputs=requested_outputs(doc.get("outputs"), bool(params.get("binary_data_output", False))),
        id=str(doc["id"]) if doc.get("id") is not None else None,
    )


def read_input(tensor, binary: bytes, max_images: int) -> list[bytes]:
    """The `images` input's elements, from its JSON `data` (base64 strings) or from the binary data after the header."""
    if not isinstance(tensor, dict) or tensor.get("name") != INPUT:
        name = tensor.get("name") if isinstance(tensor, dict) else tensor
        raise bad(f"unexpected input {str(name)[:64]!r}; this model has one input, {INPUT!r}")
    if tensor.get("datatype") != "BYTES":
        raise bad(
            f"input {INPUT!r} has datatype {str(tensor.get('datatype'))[:16]!r}; send BYTES (one encoded image per element)"
        )
    shape = tensor.get("shape")
    if not isinstance(shape, list) or len(shape) not in (1, 2) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad(f"input {INPUT!r} shape {shape!r} must be [N] or [N, 1]")
    if len(shape) == 2 and shape[1] != 1:
        raise bad(f"input {INPUT!r} shape {shape} must be [N] or [N, 1]: one image per element")
    if shape[0] > max_images:
        raise too_many_images(shape[0], max_images)
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    images = split_bytes(binary, size) if size is not None else json_bytes(tensor.get("data"))
    if len(images) != shape[0]:
        raise bad(f"input {INPUT!r} has {len(images)} elements, its shape says {shape[0]}")
    if not images:
        raise bad("no image in the request")
    return images


def split_bytes(binary: bytes, size) -> list[bytes]:
    """BYTES tensor data in the binary extension: each element a uint32 little-endian length, then the bytes."""
    if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
        raise bad(f"binary_data_size {size!r} does not match the {len(binary)} bytes after the inference header")
    out, at = [], 0
    while at < len(binary):
        if at + 4 > len(binary):
            raise bad("binary BYTES data ends inside an element's length prefix")
        (n,) = struct.unpack_from("<I", binary, at)
        if at + 4 + n > len(binary):
            raise bad(f"binary BYTES element {len(out)} says {n} bytes, past the end of the data")
        out.append(binary[at + 4 : at + 4 + n])
        at += 4 + n
    return out


def json_bytes(data) -> list[bytes]:
    """BYTES tensor data in JSON: a (flat or [N, 1]) list of base64 strings."""
    if not isinstance(data, list):
        raise bad(f'input {INPUT!r} needs "data" (base64 strings) or parameters.binary_data_size (binary data extension)')
    flat = [d[0] if isinstance(d, list) and len(d) == 1 else d for d in data]
    out = []
    for i, item in enumerate(flat):
        if not isinstance(item, str):
            raise bad(f"{INPUT}[{i}] must be a base64 string of the encoded image")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise bad(f"{INPUT}[{i}] is not valid base64 (JSON carries images base64-encoded; or use binary data)") from None
    return out


def requested_outputs(outputs, binary_default: bool) -> dict[str, bool]:
    """{output name: in binary} for the outputs asked for (all when none are named)."""
    if outputs is None:
        return dict.fromkeys(OUTPUTS, binary_default)
    if not isinstance(outputs, list):
        raise bad('"outputs" must be a list of {"name": ...}')
    chosen = {}
    for out in outputs:
        name = out.get("name") if isinstance(out, dict) else None
        if name not in OUTPUTS:
            raise bad(f"unknown output {str(name)[:64]!r}; the outputs are {', '.join(OUTPUTS)}")
        chosen[name] = bool((out.get("parameters") or {}).get("binary_data", binary_default))
    return chosen


def infer_response(
    request: InferRequest, results: list[dict], model_name: str, version: str, parameters: dict
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length (for HEADER_LENGTH)."""
    k = min(len(r["topk"]) for r in results)
    arrays = {
        "labels": [r["label"].encode() for r in results],
        "scores": np.array([r["score"] for r in results], dtype="<f4"),
        "topk_labels": [t["label"].encode() for r in results for t in r["topk"][:k]],
        "topk_scores": np.array([[t["score"] for t in r["topk"][:k]] for r in results], dtype="<f4"),
    }
    shapes = {
        "labels": [len(results)],
        "scores": [len(results)],
        "topk_labels": [len(results), k],
        "topk_scores": [len(results), k],
    }
    outputs, blobs = [], []
    for name, binary in request.outputs.items():
        tensor = {"name": name, "datatype": OUTPUTS[name], "shape": shapes[name]}
        if binary:
            blob = encode_binary(arrays[name])
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            values = arrays[name]
            tensor["data"] = [v.decode() for v in values] if OUTPUTS[name] == "BYTES" else values.reshape(-1).tolist()
        outputs.append(tensor)
    doc = {"model_name": model_name, "model_version": version, "outputs": outputs, "parameters": parameters}
    if request.id is not None:
        doc["id"] = request.id
    head = json.dumps(doc).encode()
    return (head + b"".join(blobs), len(head)) if blobs else (head, None)


def encode_binary(values) -> bytes:
    """A tensor's binary data: FP32 as little-endian floats, BYTES as length-prefixed elements."""
    if isinstance(values, np.ndarray):
        return values.astype("<f4").tobytes()
    return b"".join(struct.pack("<I", len(v)) + v for v in values)

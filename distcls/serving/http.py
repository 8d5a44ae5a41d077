"""The endpoint's requests: bodies within their limit, the three input forms, admission, and the errors.

`read_images` turns one POST /v1/classify into (image bytes, top_k): raw `image/*` bytes, multipart files
or JSON with base64, each refused with a `RequestError` (status, kind, a message with the fix) when it is
too large, holds too many images or is malformed. `Admission` bounds the requests one Ingress replica
takes. Nothing here imports Ray or FastAPI at import time (the auth checks use `RequestError` too).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.requests import Request


class RequestError(Exception):
    """A request we refuse: HTTP status, a short kind and a message naming the problem and the fix."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def model_failure(model: dict) -> RequestError:
    """500 for a model whose output is not finite, naming it (by id, as every response does: not its URI)."""
    return RequestError(
        500,
        "non_finite_output",
        f"model {model['id'][:12]}... ({model['architecture']}) gave non-finite scores (NaN or infinity); its "
        "checkpoint is broken (weights or calibration): deploy another checkpoint",
    )


async def read_images(request: Request, max_bytes: int, max_images: int, default_top_k: int) -> tuple[list[bytes], int]:
    """POST /v1/classify's images and top_k, by Content-Type: image/* (or octet-stream) bytes, multipart
    files, or JSON {"images": [{"b64": ...}], "top_k": k}; top_k from the body or else the query string."""
    body = await read_body(request, max_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        images, top_k = [body], request.query_params.get("top_k")
    elif ctype == "multipart/form-data":
        images, top_k = await parse_multipart(request, body, max_images)
        top_k = top_k if top_k is not None else request.query_params.get("top_k")
    elif ctype == "application/json":
        images, top_k = await read_json_images(body, max_images)
    else:
        raise RequestError(
            415,
            "unsupported_media_type",
            f"Content-Type {ctype or '(none)'!r} is not accepted; "
            "send image/* bytes, multipart/form-data files or application/json with base64",
        )
    if not images:
        raise RequestError(400, "bad_request", "no image in the request")
    if len(images) > max_images:
        raise too_many_images(len(images), max_images)
    return images, parse_top_k(top_k, default_top_k)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes without reading all of it."""
    too_big = RequestError(
        413,
        "too_large_body",
        f"request body exceeds the limit of {limit} bytes "
        f"({limit / 1e6:g} MB); send smaller or fewer images (server flag --max-request-mb)",
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def parse_top_k(raw, default: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
        if isinstance(raw, bool) or not 1 <= value <= 1000 or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError
    except (TypeError, ValueError):
        raise RequestError(400, "bad_request", f"top_k {raw!r} must be an integer from 1 to 1000") from None
    return value


def too_many_images(count: int, max_images: int) -> RequestError:
    return RequestError(
        413, "too_many_images", f"{count} images in one request; the limit is {max_images} (server flag --max-images-per-request)"
    )


def count_json_values(body: bytes, max_images: int) -> None:
    """Refuse, before parsing, a body that holds more images or JSON values than `max_images` images need.

    Parsing builds every value first: 10 MB of {"b64": ""} items would be ~900,000 objects. A string
    "b64" is each image's key, and base64 has no ',', '{' or '[', so a valid request has about two of
    those per image; anything far past that is refused here, in C-speed scans of the bytes.
    """
    if (images := body.count(b'"b64"')) > max_images:
        raise too_many_images(images, max_images)
    if (values := body.count(b",") + body.count(b"{") + body.count(b"[")) > 4 * max_images + 64:
        raise RequestError(
            413,
            "too_many_images",
            f"the JSON body holds {values} values, more than {max_images} "
            'images need; send {"images": [{"b64": "..."}, ...]} with at most '
            f"{max_images} images (server flag --max-images-per-request)",
        )


async def read_json_images(body: bytes, max_images: int) -> tuple[list[bytes], object]:
    """parse_json_images in a worker thread: parsing and base64 decoding never block the event loop."""
    try:
        return await asyncio.to_thread(parse_json_images, body, max_images)
    except MemoryError:
        raise RequestError(
            422, "too_large", "decoding the request needs more memory than the server could get; send fewer or smaller images"
        ) from None


def parse_json_images(body: bytes, max_images: int) -> tuple[list[bytes], object]:
    """{"images": [{"b64": ...}, ...], "top_k": k} -> (image bytes, top_k); counted before anything is decoded."""
    count_json_values(body, max_images)
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise RequestError(
            400, "bad_request", f'body is not valid JSON ({reason}); send {{"images": [{{"b64": "..."}}], "top_k": 5}}'
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise RequestError(400, "bad_request", 'JSON body must be an object with "images": [{"b64": "..."}, ...]')
    if len(doc["images"]) > max_images:
        raise too_many_images(len(doc["images"]), max_images)
    images = []
    for i, item in enumerate(doc["images"]):
        if not isinstance(item, dict) or not isinstance(item.get("b64"), str):
            extra = " (distcls never fetches URLs; send the bytes)" if isinstance(item, dict) and "url" in item else ""
            raise RequestError(400, "bad_request", f'images[{i}] must be {{"b64": "<base64 image bytes>"}}{extra}')
        try:
            images.append(base64.b64decode(item["b64"], validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(400, "bad_request", f"images[{i}].b64 is not valid base64") from None
    return images, doc.get("top_k")


async def parse_multipart(request: Request, body: bytes, max_images: int) -> tuple[list[bytes], object]:
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(
            request.headers, stream(), max_files=max_images, max_fields=16, max_part_size=len(body) + 1
        ).parse()
    except MultiPartException as exc:
        raise RequestError(400, "bad_request", f"multipart body: {exc.message}") from None
    images, top_k = [], None
    for key, value in form.multi_items():
        if hasattr(value, "read"):
            images.append(await value.read())
        elif key == "top_k":
            top_k = value
    return images, top_k


class Admission:
    """At most `running` classify requests in progress in one Ingress replica and `queued` more waiting;
    beyond that a JSON 503 at once. (Left to Ray, the proxy would queue them and answer a plain-text 503.)"""

    def __init__(self, running: int, queued: int):
        self.slots, self.queued, self.waiting = asyncio.Semaphore(running), queued, 0

    @contextlib.asynccontextmanager
    async def slot(self):
        if self.slots.locked() and self.waiting >= self.queued:
            raise RequestError(
                503,
                "overloaded",
                "the server is at its limit of requests in progress and waiting; retry after a moment",
                headers={"Retry-After": "1"},
            )
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self.slots.release()

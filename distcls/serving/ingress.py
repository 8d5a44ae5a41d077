"""`distcls serve`: a checkpoint as an autoscaling HTTP endpoint on Ray Serve.

Two deployments: `Ingress` (FastAPI: auth, body limits, parsing the three input forms, errors, metrics)
and `ImageClassifier` (decode + preprocess with the checkpoint's own spec, then `@serve.batch` forward
passes). The classifier's checkpoint is its `user_config`, so pointing a running application at another
checkpoint reloads the model in place, without failed requests. `build_app` is the import path that
`serve deploy` and a KubeRay RayService use; `distcls serve-config` prints that config.
"""

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from starlette.exceptions import HTTPException

from distcls import DistclsError
from distcls.config import ServeConfig, load_config, to_dict

TOKEN_ENV = "DISTCLS_API_TOKEN"
PAGE = Path(__file__).with_name("static") / "index.html"
LATENCY_BOUNDARIES_MS = [2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
# Replica failures worth one more try on another replica (a killed or restarting replica).
RETRIES = 2
# Requests an Ingress replica takes beyond its own admission limit (health checks, the page, /v1/model, and
# /v1/classify requests on their way to a JSON 503), so that Ray's proxy never has to queue or refuse them.
INGRESS_HEADROOM = 64


class RequestError(Exception):
    """A request we refuse: HTTP status, a short kind and a message naming the problem and the fix."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def token_digest(token: str) -> str:
    """The sha256 the endpoint compares tokens by, of the token without surrounding whitespace (a Secret file's
    final newline): the server's own token and the one a client sends are stripped alike."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def env_token() -> str | None:
    """DISTCLS_API_TOKEN without surrounding whitespace, None when unset; set but empty or only whitespace
    (an empty Secret) is refused, so that a token meant to be required never leaves the endpoint open."""
    raw = os.environ.get(TOKEN_ENV)
    if raw is None:
        return None
    if not raw.strip():
        raise DistclsError(
            f"serve: {TOKEN_ENV} is set but empty (or only whitespace); set it to the API token, or unset it "
            "to serve without authentication on a loopback --host"
        )
    return raw.strip()


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (a hostname other than localhost may resolve anywhere)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth(cfg: ServeConfig, token: str | None) -> str | None:
    """The sha256 of the API token the endpoint will require, or None for an open endpoint, which only a
    loopback host or an explicit --no-auth gets. Refuses (before anything starts) what would be open by accident."""
    if token and not token.strip():
        raise DistclsError(f"serve: the API token ({TOKEN_ENV}) is only whitespace; set it to the token, or unset it")
    if token and cfg.no_auth:
        raise DistclsError(
            f"serve: --no-auth is given but {TOKEN_ENV} is set; unset {TOKEN_ENV} to serve "
            "without authentication, or drop --no-auth to require the token"
        )
    if token:
        return token_digest(token)
    if is_loopback(cfg.host):
        return None
    if not cfg.no_auth:
        raise DistclsError(
            f"serve: --host {cfg.host} is reachable from other machines and {TOKEN_ENV} is not "
            f"set; set {TOKEN_ENV} (e.g. from a Kubernetes Secret) to require 'Authorization: "
            "Bearer <token>', or pass --no-auth (no_auth: true) to serve without authentication"
        )
    warn_no_auth(cfg)
    return None


def warn_no_auth(cfg: ServeConfig) -> None:
    print(
        f"distcls: WARNING: NO AUTHENTICATION (--no-auth): anyone who can reach {cfg.host}:{cfg.port} can use "
        f"the model; set {TOKEN_ENV} instead unless an authenticating proxy is the only way in",
        file=sys.stderr,
        flush=True,
    )


def host_names(cfg: ServeConfig, token_sha256: str | None, declarative: bool = False) -> tuple[str, ...] | None:
    """The Host header names the endpoint answers (besides loopback addresses), or None: no Host check.

    A loopback endpoint without a token is reachable from any web page this machine's browser opens, through
    DNS rebinding (a name of the attacker's that resolves to 127.0.0.1): it answers only its own names. With
    a token, on another --host, or in an app that `serve deploy` or a RayService builds (`declarative`, names
    unknown here), there is no check unless --allowed-hosts names the hosts.
    """
    if not cfg.allowed_hosts and (token_sha256 is not None or declarative or not is_loopback(cfg.host)):
        return None
    names = {host_of(name) for name in (cfg.host, "localhost", *cfg.allowed_hosts)}
    return tuple(sorted(names - {"", "0.0.0.0", "::"}))


def host_of(header: str) -> str:
    """The name in a Host header (or an --allowed-hosts entry): lowercased, without the port, the brackets of
    an IPv6 literal ([::1]:8000) or a final dot."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def check_host(header: str | None, names: tuple[str, ...] | None) -> None:
    """Refuse (403) a request whose Host is not one of `names` or a loopback address (None: no check)."""
    if names is None or not header:  # every browser sends Host; a client without one is no rebinding page
        return
    host = host_of(header)
    if host in names or is_loopback(host):
        return
    shown = host[:100]
    raise RequestError(
        403,
        "host_not_allowed",
        f"Host {shown!r} is not a name of this endpoint (a loopback endpoint without a token answers localhost, "
        f"its own address and --allowed-hosts only, against DNS rebinding); use http://localhost, or restart "
        f"the server with --allowed-hosts {shown or 'NAME'} (or with {TOKEN_ENV} set)",
    )


def non_finite(value) -> bool:
    """Whether a response holds a NaN or an infinity anywhere (JSON has neither)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(non_finite(v) for v in value)
    return False


def calibration_numbers(meta: dict) -> dict | None:
    """The calibration record's finite numbers (temperature, threshold, ECE...), never its strings (the
    data URI it was fitted on names buckets)."""
    record = meta.get("calibration")
    if not isinstance(record, dict):
        return None
    return {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def model_failure(model: dict) -> RequestError:
    """500 for a model whose output is not finite, naming it (by id, as every response does: not its URI)."""
    return RequestError(
        500,
        "non_finite_output",
        f"model {model['id'][:12]}... ({model['architecture']}) gave non-finite scores (NaN or infinity); its "
        "checkpoint is broken (weights or calibration): deploy another checkpoint",
    )


# --- the classifier -----------------------------------------------------------------------------------


@serve.deployment
class ImageClassifier:
    """Decodes each request's image in a thread, then batches forward passes (one model per replica, on the
    inference engine's runtime: onnxruntime on CPU, torch bf16 on CUDA, unless --runtime says otherwise)."""

    def __init__(
        self,
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.01,
        threads: int = 1,
        runtime: str = "auto",
        unknown: str = "off",
    ):
        import torch

        torch.set_num_threads(max(1, threads))
        self.threads, self.runtime, self.unknown = max(1, threads), runtime, unknown
        self.loaded = None  # an infer.Predictor
        self.scoring: dict[str, tuple] = {}  # model id -> (Calibration, unknown threshold or None)
        self.uris: dict[str, str] = {}  # model id -> its URI (logged, never sent to clients)
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def reconfigure(self, config: dict) -> None:
        """user_config {"checkpoint": URI}: load the new model fully, then swap it in (no request fails)."""
        from distcls.checkpoint import checkpoint_id, read_meta
        from distcls.infer import load_model
        from distcls.scores import Calibration, resolve_unknown

        uri = config["checkpoint"]
        if self.loaded is not None and checkpoint_id(read_meta(uri)) == self.loaded.id:
            return
        loaded = load_model(uri, self.runtime, threads=self.threads)  # a checkpoint or an export
        calibration = Calibration.of(loaded.meta)
        try:
            threshold = resolve_unknown(self.unknown, calibration, "serve")
        except DistclsError as exc:  # a model switched to on a running app: serve it, without `unknown`
            print(f"distcls: {exc}; serving {uri} with --unknown off", flush=True)
            threshold = None
        self.scoring[loaded.id] = (calibration, threshold)
        self.uris[loaded.id] = uri
        self.loaded = loaded

    def check_health(self) -> None:
        if self.loaded is None:
            raise RuntimeError("no model loaded")

    def info(self) -> dict:
        m = self.loaded
        return {
            "id": m.id,
            "architecture": m.meta["architecture"],
            "class_names": m.class_names,
            "num_classes": len(m.class_names),
            "preprocessing": m.meta["preprocessing"],
            "created": m.meta.get("created_at"),
            "calibration": calibration_numbers(m.meta),
            "unknown_above": self.scoring[m.id][1],
            **m.describe(),
        }

    async def classify(self, data: bytes, top_k: int) -> dict:
        """One image -> {"label", "score", "topk", "model"}, or {"error": {"kind", "message"}}."""
        from distcls.images import ImageDecodeError
        from distcls.infer import top_prediction
        from distcls.transforms import preprocess_bytes

        loaded = self.loaded
        try:
            image = await asyncio.to_thread(preprocess_bytes, data, loaded.spec)
        except ImageDecodeError as exc:
            return {"error": {"kind": exc.kind, "message": exc.message}}
        logits = await self.predict_batch((loaded, image))
        with np.errstate(invalid="ignore", over="ignore"):  # a broken model's NaN is answered below, not warned
            prediction = top_prediction(logits, loaded.class_names, top_k, *self.scoring[loaded.id])
        model = {"id": loaded.id, "architecture": loaded.meta["architecture"]}
        if non_finite(prediction):
            err = model_failure(model)
            print(f"distcls: serve: {self.uris.get(loaded.id)}: {err.message}", flush=True)
            return {"error": {"kind": err.kind, "message": err.message, "status": 500, "model": model}}
        prediction["model"] = model
        return prediction

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def predict_batch(self, items: list[tuple[object, np.ndarray]]) -> list[np.ndarray]:
        return await asyncio.to_thread(self._forward, items)

    @staticmethod
    def _forward(items: list[tuple[object, np.ndarray]]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}  # a batch can straddle a model switch
        for i, (loaded, _) in enumerate(items):
            groups.setdefault(loaded.id, []).append(i)
        for idx in groups.values():
            logits = items[idx[0]][0].predict(np.stack([items[i][1] for i in idx]))
            for row, i in enumerate(idx):
                out[i] = logits[row]
        return out


# --- the HTTP ingress ---------------------------------------------------------------------------------

api = FastAPI(
    title="distcls", summary="Image classification with a fine-tuned checkpoint", docs_url=None, redoc_url=None, openapi_url=None
)


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse({"error": {"kind": err.kind, "message": err.message}}, status_code=err.status, headers=err.headers)


@api.exception_handler(HTTPException)
async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """A path or method the API does not have: the JSON error shape instead of FastAPI's {"detail": ...}."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    return error_response(
        RequestError(
            exc.status_code,
            kind,
            f"{request.method} {request.url.path}: {exc.detail}; "
            "the API is POST /v1/classify, GET /v1/model, GET /healthz, GET /",
            headers=getattr(exc, "headers", None),
        )
    )


@api.exception_handler(Exception)
async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A failure no other handler names (a bug, a classifier that raised): JSON, without internals."""
    return error_response(
        RequestError(
            500, "internal", f"the server failed on this request ({type(exc).__name__}); retry, and report it if it persists"
        )
    )


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


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP front: auth, limits, the three input forms, errors as JSON, metrics; forwards images one by
    one to the classifier so that they batch with other requests' images."""

    def __init__(
        self,
        classifier,
        max_request_bytes: int,
        max_images: int,
        default_top_k: int,
        token_sha256: str | None = None,
        max_running: int = 256,
        max_waiting: int = 256,
        host_names: tuple[str, ...] | None = None,
    ):
        from ray.serve.metrics import Counter, Histogram

        self.classifier = classifier
        self.admission = Admission(max_running, max_waiting)
        self.max_request_bytes = max_request_bytes
        self.max_images = max_images
        self.default_top_k = default_top_k
        env_token = os.environ.get(TOKEN_ENV, "").strip()
        self.token_sha256 = token_sha256 or (token_digest(env_token) if env_token else None)
        self.host_names = None if host_names is None else tuple(host_names)
        self.page = PAGE.read_text()
        self.predictions = Counter("distcls_predictions", "images classified", tag_keys=("model",))
        self.errors = Counter("distcls_errors", "refused requests and images, by kind", tag_keys=("kind",))
        self.latency = Histogram(
            "distcls_request_latency_ms", "POST /v1/classify latency (ms)", boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("status",)
        )

    def authorize(self, request: Request) -> None:
        check_host(request.headers.get("host"), self.host_names)
        if self.token_sha256 is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(given.strip()), self.token_sha256):
            raise RequestError(
                401,
                "unauthorized",
                f"missing or wrong token; send 'Authorization: Bearer <token>' (the server's {TOKEN_ENV})",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def refuse(self, err: RequestError) -> JSONResponse:
        self.errors.inc(tags={"kind": err.kind})
        return error_response(err)

    async def call_classifier(self, method: str, *args):
        """A classifier call, retried on another replica when the one answering died (never on overload)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        for attempt in range(RETRIES + 1):
            try:
                return await getattr(self.classifier, method).remote(*args)
            except BackPressureError:
                raise RequestError(
                    503, "overloaded", "the classifier's queue is full; retry after a moment", headers={"Retry-After": "1"}
                ) from None
            except DeploymentUnavailableError:
                raise RequestError(
                    503,
                    "unavailable",
                    "the classifier is not deployed or not healthy; retry shortly",
                    headers={"Retry-After": "1"},
                ) from None
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                if attempt == RETRIES:
                    raise RequestError(
                        503, "unavailable", "no classifier replica could answer; retry shortly", headers={"Retry-After": "1"}
                    ) from None
                await asyncio.sleep(0.1 * (attempt + 1))

    def respond(self, content: dict, model: dict) -> JSONResponse:
        """200 with `content`, or 500 naming the model when a NaN or an infinity got into it (never in JSON)."""
        if non_finite(content):
            return self.refuse(model_failure(model))
        return JSONResponse(content)

    def host_refused(self, request: Request) -> JSONResponse | None:
        try:
            check_host(request.headers.get("host"), self.host_names)
        except RequestError as err:
            return self.refuse(err)
        return None

    @api.get("/healthz")
    async def healthz(self, request: Request):
        return self.host_refused(request) or {"status": "ok"}

    @api.get("/", response_class=HTMLResponse)
    async def page(self, request: Request):
        return self.host_refused(request) or HTMLResponse(self.page)

    @api.get("/v1/model")
    async def model(self, request: Request):
        try:
            self.authorize(request)
            info = await self.call_classifier("info")
        except RequestError as err:
            return self.refuse(err)
        return self.respond(info, info)

    @api.post("/v1/classify")
    async def classify(self, request: Request):
        started = time.perf_counter()
        try:
            self.authorize(request)
            async with self.admission.slot():
                response = await self._classify(request)
        except RequestError as err:
            response = self.refuse(err)
        self.latency.observe((time.perf_counter() - started) * 1000, tags={"status": str(response.status_code)})
        return response

    async def _classify(self, request: Request) -> JSONResponse:
        body = await read_body(request, self.max_request_bytes)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            images, top_k = [body], request.query_params.get("top_k")
        elif ctype == "multipart/form-data":
            images, top_k = await parse_multipart(request, body, self.max_images)
            top_k = top_k if top_k is not None else request.query_params.get("top_k")
        elif ctype == "application/json":
            images, top_k = await read_json_images(body, self.max_images)
        else:
            raise RequestError(
                415,
                "unsupported_media_type",
                f"Content-Type {ctype or '(none)'!r} is not accepted; "
                "send image/* bytes, multipart/form-data files or application/json with base64",
            )
        if not images:
            raise RequestError(400, "bad_request", "no image in the request")
        if len(images) > self.max_images:
            raise too_many_images(len(images), self.max_images)
        top_k = parse_top_k(top_k, self.default_top_k)
        results = await asyncio.gather(*(self.call_classifier("classify", data, top_k) for data in images))
        bad = [(i, r["error"]) for i, r in enumerate(results) if "error" in r]
        if bad:
            return self.refuse_images(bad, len(images))
        models = [r.pop("model") for r in results]
        if any(m["id"] != models[0]["id"] for m in models):  # answered across a model switch: say so
            for r, m in zip(results, models):
                r["model_id"] = m["id"]
        self.predictions.inc(len(results), tags={"model": models[0]["id"][:12]})
        return self.respond({"model": models[0], "predictions": results}, models[0])

    def refuse_images(self, bad: list[tuple[int, dict]], count: int) -> JSONResponse:
        """422 naming the first image that could not be classified; 500 (naming the model) when the model failed."""
        for _, e in bad:
            self.errors.inc(tags={"kind": e["kind"]})
        failed = [(i, e) for i, e in bad if e.get("status") == 500]
        i, e = (failed or bad)[0]
        where = f"image {i}" if count > 1 else "the image"
        error = {"kind": e["kind"], "message": f"{where}: {e['message']}", "image": i, "bad_images": [j for j, _ in bad]}
        if "model" in e:
            error["model"] = e["model"]
        return JSONResponse({"error": error}, status_code=500 if failed else 422)


# --- building and running the application ---------------------------------------------------------------


def autoscaling_delays(cfg: ServeConfig) -> dict:
    """The classifier's autoscaling timing: how fast it follows load up, down and to zero."""
    delays = {
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
        "look_back_period_s": cfg.look_back_period_s,
    }
    if cfg.downscale_to_zero_delay_s is not None:
        delays["downscale_to_zero_delay_s"] = cfg.downscale_to_zero_delay_s
    return delays


def application(cfg: ServeConfig, token_sha256: str | None = None, declarative: bool = False):
    """The Serve application for `cfg` (a bound Ingress in front of an autoscaling classifier); `declarative`:
    built by build_app (`serve deploy`, a RayService), where the Host check is --allowed-hosts only."""
    classifier = ImageClassifier.options(
        name="ImageClassifier",
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.num_gpus},
        autoscaling_config={
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "initial_replicas": max(1, cfg.min_replicas),
            "target_ongoing_requests": cfg.target_ongoing_requests,
            **autoscaling_delays(cfg),
        },
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        user_config={"checkpoint": cfg.checkpoint},
        health_check_period_s=10,
    ).bind(
        max_batch_size=cfg.max_batch_size,
        batch_wait_timeout_s=cfg.batch_wait_timeout_s,
        threads=max(1, int(cfg.cpus_per_replica)),
        runtime=cfg.runtime,
        unknown=cfg.unknown,
    )
    running = cfg.max_ongoing_requests * cfg.max_replicas
    return Ingress.options(
        name="Ingress",
        ray_actor_options={"num_cpus": 0.5},
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": 4 * cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s,
            "look_back_period_s": cfg.look_back_period_s,
        },
        # Admission is the Ingress's own (JSON 503s). Ray's limits sit above it, the proxy's queue included
        # (it also holds requests while their replica is being chosen): only a flood of more concurrent
        # requests than both together reaches them, and gets Ray's plain-text 503.
        max_ongoing_requests=running + cfg.max_queued_requests + INGRESS_HEADROOM,
        max_queued_requests=running + cfg.max_queued_requests + INGRESS_HEADROOM,
    ).bind(
        classifier,
        max_request_bytes=int(cfg.max_request_mb * 1e6),
        max_images=cfg.max_images_per_request,
        default_top_k=cfg.top_k,
        token_sha256=token_sha256,
        max_running=running,
        max_waiting=cfg.max_queued_requests,
        host_names=host_names(cfg, token_sha256, declarative),
    )


def build_app(args: dict):
    """Ray Serve application builder (`import_path: distcls.serving:build_app`); `args` are ServeConfig
    fields. The API token comes from DISTCLS_API_TOKEN where the app is built, never from the config; args
    without a `host` count as a public address, so such an app needs the token or `no_auth: true`."""
    cfg = load_config(ServeConfig, overrides={"host": "0.0.0.0", **args})
    return application(cfg, check_auth(cfg, env_token()), declarative=True)


APP_ARGS_EXCLUDED = ("port", "name", "detach")  # `host` stays: build_app decides on auth by it


def serve_config(cfg: ServeConfig) -> dict:
    """A Ray Serve config file (`serve deploy`, a RayService's serveConfigV2) for this configuration.

    The checkpoint is also the classifier's `user_config` override: change only that value and Serve
    reloads the model inside the running replicas. Changing `args` (the checkpoint there included) gives
    the application a new code version, so Serve replaces every replica (also without failed requests).
    """
    args = {k: v for k, v in to_dict(cfg).items() if k not in APP_ARGS_EXCLUDED}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [
            {
                "name": cfg.name,
                "route_prefix": "/",
                "import_path": "distcls.serving:build_app",
                "args": args,
                "deployments": [{"name": "ImageClassifier", "user_config": {"checkpoint": cfg.checkpoint}}],
            }
        ],
    }


def start(cfg: ServeConfig, route_prefix: str = "/", token: str | None = None, access_log: bool = False) -> str:
    """Deploy on the Ray cluster (RAY_ADDRESS, else a local instance); returns the endpoint's base URL."""
    from distcls.checkpoint import read_meta
    from distcls.infer import prepare_runtime
    from distcls.runtime import init_ray
    from distcls.scores import Calibration, resolve_unknown

    token_sha256 = check_auth(cfg, token if token is not None else env_token())
    resolve_unknown(cfg.unknown, Calibration.of(read_meta(cfg.checkpoint)), "serve")  # refused here, before Ray
    # Compile once here (replicas on this machine read the cache); after a fallback replicas go straight to torch.
    runtime, note = prepare_runtime(cfg.checkpoint, cfg.runtime, cfg.num_gpus > 0)
    print(f"serve: runtime {runtime} ({note})", flush=True)
    if runtime == "torch" and cfg.runtime != "torch":
        cfg = dataclasses.replace(cfg, runtime="torch")
    init_ray()
    logging_config = {"log_level": "INFO" if access_log else "WARNING", "enable_access_log": access_log}
    # This process's Serve logger (set to INFO when ray.serve is imported) said "Started Serve", "Connecting
    # to existing Serve app" and "Application ready" on every start; `distcls serve` prints its own lines.
    logging.getLogger("ray.serve").setLevel(logging.INFO if access_log else logging.WARNING)
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=logging_config)
    serve.run(application(cfg, token_sha256), name=cfg.name, route_prefix=route_prefix, logging_config=logging_config)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{route_prefix.rstrip('/')}"


def run_serve(cfg: ServeConfig) -> None:
    """`distcls serve`: deploy, print where it listens, serve until Ctrl-C or SIGTERM, then take the app down
    (cli.main prints the one line that says why and shuts down the Ray instance it started)."""
    from distcls.infer import verify_model

    meta = verify_model(cfg.checkpoint)  # a bad or tampered checkpoint fails here, in one line, before Ray
    if cfg.detach and not os.environ.get("RAY_ADDRESS"):
        raise DistclsError(
            "serve: --detach needs a running cluster (RAY_ADDRESS, or run it with "
            "`ray job submit`); a local Ray instance would stop when this command ends"
        )
    url = start(cfg)
    auth = (
        f"on ({TOKEN_ENV})"
        if os.environ.get(TOKEN_ENV)
        else "OFF (--no-auth)"
        if cfg.no_auth
        else f"off: loopback only (set {TOKEN_ENV} to require a token)"
    )
    print(
        f"serving {meta['architecture']} ({len(meta['class_names'])} classes, model {meta['weights_sha256'][:12]}...) at {url}/",
        flush=True,
    )
    print(f"  POST {url}/v1/classify   GET {url}/v1/model   GET {url}/healthz   page: {url}/", flush=True)
    print(
        f"  replicas {cfg.min_replicas}..{cfg.max_replicas}, batch <= {cfg.max_batch_size}, auth {auth}; "
        + ("deployed; `serve status` shows it, `serve shutdown` removes it" if cfg.detach else "Ctrl-C stops it"),
        flush=True,
    )
    if cfg.detach:
        return
    try:
        while True:
            time.sleep(3600)
    finally:
        stop_app(cfg.name)


def stop_app(name: str) -> None:
    """Take the application down; on a cluster (RAY_ADDRESS) also Serve, if no other application runs on
    it. A local instance goes with Ray itself (cli.main), so nothing else is needed there."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO lines while stopping
    serve.delete(name)
    if os.environ.get("RAY_ADDRESS") and not serve.status().applications:
        serve.shutdown()

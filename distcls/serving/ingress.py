"""The `Ingress` deployment: the endpoint's HTTP API (FastAPI) in front of the classifier.

The routes are the API: GET /healthz, GET / (the page), GET /v1/model and POST /v1/classify (a new
protocol's routes go next to them). Each request is checked (`auth`), admitted and parsed (`http`), and
its images are sent one by one to the classifier so that they batch with other requests' images;
replica failures are retried on another replica, every refusal is a JSON error, and requests, images
and latencies are counted in Ray's metrics.
"""

import asyncio
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from starlette.exceptions import HTTPException

from distcls.infer.api import non_finite
from distcls.serving.auth import check_bearer, check_host, replica_token_sha256
from distcls.serving.http import Admission, RequestError, model_failure, read_images

PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"  # package data of distcls
LATENCY_BOUNDARIES_MS = [2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
# Replica failures worth one more try on another replica (a killed or restarting replica).
RETRIES = 2

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
        self.token_sha256 = replica_token_sha256(token_sha256)
        self.host_names = None if host_names is None else tuple(host_names)
        self.page = PAGE.read_text()
        self.predictions = Counter("distcls_predictions", "images classified", tag_keys=("model",))
        self.errors = Counter("distcls_errors", "refused requests and images, by kind", tag_keys=("kind",))
        self.latency = Histogram(
            "distcls_request_latency_ms", "POST /v1/classify latency (ms)", boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("status",)
        )

    # --- the routes -----------------------------------------------------------------------------------

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
        images, top_k = await read_images(request, self.max_request_bytes, self.max_images, self.default_top_k)
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

    # --- checks, the classifier's handle, responses ---------------------------------------------------

    def authorize(self, request: Request) -> None:
        check_host(request.headers.get("host"), self.host_names)
        check_bearer(request.headers.get("authorization", ""), self.token_sha256)

    def host_refused(self, request: Request) -> JSONResponse | None:
        try:
            check_host(request.headers.get("host"), self.host_names)
        except RequestError as err:
            return self.refuse(err)
        return None

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

    def refuse(self, err: RequestError) -> JSONResponse:
        self.errors.inc(tags={"kind": err.kind})
        return error_response(err)

    def respond(self, content: dict, model: dict) -> JSONResponse:
        """200 with `content`, or 500 naming the model when a NaN or an infinity got into it (never in JSON)."""
        if non_finite(content):
            return self.refuse(model_failure(model))
        return JSONResponse(content)

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

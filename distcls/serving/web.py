"""The endpoint's FastAPI application: the app every route of the `Ingress` (and its protocol mixins) is
registered on, and the error handlers that keep every refusal JSON: `{"error": {"kind", "message"}}` on distcls's
own routes, `{"error": "message"}` (the Open Inference Protocol's form) under /v2.
"""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from distcls.serving.http import RequestError
from distcls.serving.variants import VARIANT_HEADER

ROUTES = (
    "POST /v1/classify, GET /v1/model, GET /v1/models, GET /v1/rollout, GET /healthz, GET /, and /v2 (Open Inference Protocol)"
)

api = FastAPI(
    title="distcls", summary="Image classification with a fine-tuned checkpoint", docs_url=None, redoc_url=None, openapi_url=None
)


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse({"error": {"kind": err.kind, "message": err.message}}, status_code=err.status, headers=err.headers)


def v2_error(err: RequestError) -> JSONResponse:
    """The Open Inference Protocol's error: {"error": "message"}, same status and headers as distcls's own."""
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


def named(response: JSONResponse, variant: str) -> JSONResponse:
    """The response with the header that names the variant that answered."""
    response.headers[VARIANT_HEADER] = variant
    return response


def shaped(request: Request, err: RequestError) -> JSONResponse:
    return v2_error(err) if request.url.path.rstrip("/").endswith("/v2") or "/v2/" in request.url.path else error_response(err)


@api.exception_handler(HTTPException)
async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """A path or method the API does not have: the JSON error shape instead of FastAPI's {"detail": ...}."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    message = f"{request.method} {request.url.path}: {exc.detail}; the API is {ROUTES}"
    return shaped(request, RequestError(exc.status_code, kind, message, headers=getattr(exc, "headers", None)))


@api.exception_handler(Exception)
async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A failure no other handler names (a bug, a classifier that raised): JSON, without internals."""
    message = f"the server failed on this request ({type(exc).__name__}); retry, and report it if it persists"
    return shaped(request, RequestError(500, "internal", message))


def add_server_timing(response, total_ms: float) -> None:
    """The `Server-Timing` header (ms) of an answered prediction: the Ingress's own work, the hop to the classifier
    and back, and in the classifier the decode, the batch wait, the forward pass and its whole time."""
    t = getattr(response, "server_timing", None)
    if not t:
        return
    stages = {
        "ingress": total_ms - t["hop"] - t["classifier"],
        **{k: t[k] for k in ("hop", "decode", "wait", "forward", "classifier")},
    }
    response.headers["Server-Timing"] = ", ".join(f"{k};dur={v:.2f}" for k, v in stages.items())

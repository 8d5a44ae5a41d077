"""The Open Inference Protocol's routes (KServe V2 REST), a mixin of the `Ingress`, beside distcls's own /v1.

GET /v2 (server metadata), /v2/health/live and /v2/health/ready (no token, as /healthz), GET /v2/models/{name}
(metadata) and /v2/models/{name}/ready, POST /v2/models/{name}/infer. The name is the served name (--name) on a
one-model endpoint, a model id on a --models one. Requests are checked, admitted and routed to a variant
exactly as /v1/classify's (the same token, limits, `variant_for` and classifier calls); the wire format is
`oip`'s, and every error is the protocol's {"error": "message"}.
"""

import time

from fastapi import Request
from fastapi.responses import Response

from distcls import __version__
from distcls.serving.http import RequestError, read_body
from distcls.serving.oip import HEADER_LENGTH, infer_response, model_metadata, parse_infer
from distcls.serving.web import add_server_timing, named, v2_error

PRIMARY = "main"
EXTENSIONS = ["binary_tensor_data"]


class OpenInferenceRoutes:
    """/v2: health, server and model metadata, readiness, infer."""

    async def v2_server(self, request: Request):
        try:
            self.authorize(request)
        except RequestError as err:
            return v2_error(err)
        return {"name": "distcls", "version": __version__, "extensions": EXTENSIONS}

    def v2_live(self, request: Request):
        return self.v2_host_refused(request) or {"live": True}

    async def v2_ready(self, request: Request):
        """Ready when the primary's classifier answers (on a --models endpoint: when the prefix can be listed)."""
        try:
            self.v2_host_check(request)
            await (self.catalog.refresh() if self.catalog is not None else self.call_classifier("models_status"))
        except RequestError as err:
            return v2_error(err)
        return {"ready": True}

    async def v2_metadata(self, request: Request, name: str):
        try:
            self.authorize(request)
            info = await self.call_classifier("info", model_id=await self.v2_model(request, name))
        except RequestError as err:
            return v2_error(err)
        return model_metadata(name, info, self.default_top_k)

    async def v2_model_ready(self, request: Request, name: str):
        try:
            self.authorize(request)
            await self.call_classifier("info", model_id=await self.v2_model(request, name))
        except RequestError as err:
            return v2_error(err)
        return {"name": name, "ready": True}

    async def v2_infer(self, request: Request, name: str):
        started, variant = time.perf_counter(), None
        try:
            self.authorize(request)
            model_id = await self.v2_model(request, name)
            variant = self.variant_for(request)
            async with self.admission.slot():
                response = await self.v2_answer(request, name, variant, model_id)
        except RequestError as err:
            self.errors.inc(tags={"kind": err.kind, "variant": variant or "none"})
            response = v2_error(err)
        ms = (time.perf_counter() - started) * 1000
        add_server_timing(response, ms)
        self.latency.observe(ms, tags={"status": str(response.status_code), "variant": variant or "none"})
        return named(response, variant) if variant else response

    async def v2_answer(self, request: Request, name: str, variant: str, model_id: str | None) -> Response:
        body = await read_body(request, self.max_request_bytes)
        infer = parse_infer(body, request.headers.get(HEADER_LENGTH), self.max_images, self.default_top_k)
        results, bad, timing = await self.predict(infer.images, infer.top_k, variant, model_id)
        if bad:
            for _, e in bad:
                self.errors.inc(tags={"kind": e["kind"], "variant": variant})
            i, e = ([(i, e) for i, e in bad if e.get("status") == 500] or bad)[0]
            status = e.get("status", 422)
            raise RequestError(status, e["kind"], f"image {i} of {len(infer.images)}: {e['message']}")
        model = results[0]["model"]
        self.predictions.inc(len(results), tags={"model": model["id"][:12], "variant": variant})
        content, header_length = infer_response(infer, results, name, model["id"][:12], {"variant": variant})
        if header_length is None:
            response = Response(content, media_type="application/json")
        else:
            response = Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})
        response.server_timing = timing
        return response

    async def v2_model(self, request: Request, name: str) -> str | None:
        """The model id behind /v2/models/{name}: None (the one model) when `name` is the served name; on a
        --models endpoint the id itself."""
        if self.catalog is not None:
            return await self.model_for(request, name)
        if name != self.model_name:
            raise RequestError(404, "not_found", f"no model {name[:64]!r} here; this endpoint serves {self.model_name!r}")
        return None

    def v2_host_check(self, request: Request) -> None:
        from distcls.serving.auth import check_host

        check_host(request.headers.get("host"), self.host_names)

    def v2_host_refused(self, request: Request):
        try:
            self.v2_host_check(request)
        except RequestError as err:
            return v2_error(err)
        return None

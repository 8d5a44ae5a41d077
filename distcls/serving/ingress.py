"""The `Ingress` deployment: the endpoint's HTTP API (FastAPI) in front of the classifiers (its variants).

The routes are the API: GET /healthz, GET / (the page), GET /v1/model, POST /v1/classify, GET /v1/rollout, POST
/admin/rollout, the --models routes (`multi`) and the Open Inference Protocol's /v2 (`v2`), all declared here. Each
request is checked (`auth`), admitted, given a variant (`variant_for`: the one routing rule, by the weights in this
deployment's user_config) and parsed (`http`), and its images are sent one by one to that variant's classifier so
that they batch with other requests' images; replica failures are retried on another replica, every refusal is a
JSON error, every answer names its variant, and requests, images and latencies are counted in Ray's metrics (by
variant) and in the rollout's comparison (`stats`, mirrors in `shadow`)."""

import asyncio
import random
import time
from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from starlette.background import BackgroundTask

from distcls.infer.api import non_finite
from distcls.serving import admin
from distcls.serving.auth import check_admin, check_bearer, check_host, replica_token_sha256
from distcls.serving.catalog import Catalog
from distcls.serving.http import Admission, RequestError, model_failure, read_body, read_images
from distcls.serving.multi import ModelRoutes
from distcls.serving.page import with_rollout
from distcls.serving.shadow import Mirror, MirrorJob
from distcls.serving.stats import RolloutStats
from distcls.serving.v2 import OpenInferenceRoutes
from distcls.serving.variants import KEY_HEADER, VARIANT_HEADER, check_weights, pick_variant
from distcls.serving.web import add_server_timing, api, error_response, named

PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"  # package data of distcls
LATENCY_BOUNDARIES_MS = [2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
# Replica failures worth one more try on another replica (a killed or restarting replica).
RETRIES = 2
PRIMARY = "main"
FLUSH_S = 0.5  # how often a replica sends its rollout events to the recorder


def local_transport(handle):
    """`handle` talking the way this replica's Serve does: gRPC in Ray's throughput-optimized mode (distcls's
    default for a local instance, `runtime.SERVE_DEFAULTS`), else Ray's actor calls. A handle carries the
    choice of the process that built the application, which read its environment when it imported ray.serve
    (perhaps before that default was set); Ray's own constant is what this replica's Serve decided."""
    if handle is None:
        return None
    from ray.serve._private import constants  # no public API says which transport the replicas serve

    return handle.options(_by_reference=not getattr(constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", False))


@serve.deployment
@serve.ingress(api)
class Ingress(ModelRoutes, OpenInferenceRoutes):
    """HTTP front: auth, limits, the three input forms, errors as JSON, metrics; routes each request to a variant
    and forwards its images one by one to that variant's classifier so that they batch with other requests'."""

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
        variants: dict | None = None,
        shadows: dict | None = None,
        recorder=None,
        deployments: dict[str, str] | None = None,
        mirror_queue: int = 64,
        log_pairs: bool = False,
        admin_sha256: str | None = None,
        model_name: str = "distcls",
        models: str | None = None,
        send_batch: int = 32,
    ):
        """`classifier` is the primary's handle (`main`); `variants` / `shadows`: name -> handle of the other
        A/B variants / the shadows; `recorder`: the RolloutRecorder's handle (None: this replica counts alone);
        `deployments`: variant -> deployment name; `admin_sha256`: DISTCLS_ADMIN_TOKEN's digest (None: off);
        `model_name`: the served name (/v2/models/{name}); `models`: the --models prefix (None: one model);
        `send_batch`: most images in one call to a classifier (its --max-batch-size)."""
        from ray.serve.metrics import Counter, Histogram

        from distcls.serving.auth import replica_admin_sha256

        self.handles = {name: local_transport(h) for name, h in {PRIMARY: classifier, **(variants or {})}.items()}
        self.shadows = {name: local_transport(h) for name, h in (shadows or {}).items()}
        self.recorder, self.deployments = local_transport(recorder), dict(deployments or {})
        self.weights = {name: 100.0 if name == PRIMARY else 0.0 for name in self.handles}
        self.shadow_fraction = 1.0
        roles = {name: "primary" if name == PRIMARY else "variant" for name in self.handles}
        self.stats = RolloutStats(PRIMARY, {**roles, **dict.fromkeys(self.shadows, "shadow")})
        self.events: list[dict] = []
        self.flusher = None
        self.mirror = Mirror(PRIMARY, mirror_queue, self.mirror_call, self.emit, hash_images=log_pairs)
        self.admin_sha256 = replica_admin_sha256(admin_sha256)
        self.admission, self.max_running = Admission(max_running, max_waiting), max_running
        self.senders: dict = {}  # variant -> its batched sender (`sender`)
        self.send_batch = send_batch
        self.model_name, self.catalog = model_name, Catalog(models) if models else None
        self.max_request_bytes = max_request_bytes
        self.max_images = max_images
        self.default_top_k = default_top_k
        self.token_sha256 = replica_token_sha256(token_sha256)
        self.host_names = None if host_names is None else tuple(host_names)
        self.page = PAGE.read_text() if len(self.stats.roles) == 1 else with_rollout(PAGE.read_text())
        self.predictions = Counter("distcls_predictions", "images classified", tag_keys=("model", "variant"))
        self.errors = Counter("distcls_errors", "refused requests and images, by kind", tag_keys=("kind", "variant"))
        self.latency = Histogram(
            "distcls_request_latency_ms",
            "POST /v1/classify latency (ms)",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("status", "variant"),
        )
        self.mirrored = Counter(
            "distcls_mirrored_images",
            "mirrored images by variant and outcome (agree, disagree, error, dropped)",
            tag_keys=("variant", "outcome"),
        )

    def reconfigure(self, config: dict) -> None:
        """user_config {"weights": {variant: weight}, "shadow_fraction": f}: the split every replica routes by.
        A config that does not fit this application is printed and ignored: the traffic stays as it was."""
        try:
            weights = check_weights(config.get("weights", self.weights), list(self.handles))
            fraction = float(config.get("shadow_fraction", self.shadow_fraction))
            if not 0 <= fraction <= 1:
                raise ValueError(f"shadow_fraction {fraction} must be in [0, 1]")
        except (TypeError, ValueError, AttributeError) as exc:
            print(f"distcls: Ingress user_config {config!r} refused ({exc}); the weights stay {self.weights}", flush=True)
            return
        self.weights, self.shadow_fraction = weights, fraction

    def variant_for(self, request: Request) -> str:
        """THE routing rule, for every protocol's routes: `X-Distcls-Variant`, else `X-Distcls-Key`'s hash, else a
        random draw, on the weights of this deployment's user_config."""
        return pick_variant(self.weights, request.headers.get(KEY_HEADER), request.headers.get(VARIANT_HEADER))

    # --- the routes -----------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self, request: Request):
        return self.host_refused(request) or {"status": "ok"}

    @api.get("/", response_class=HTMLResponse)
    async def page(self, request: Request):
        return self.host_refused(request) or HTMLResponse(self.page)

    @api.get("/v1/model")
    async def model(self, request: Request):
        """The primary's model, or the variant that X-Distcls-Variant / X-Distcls-Key routes to."""
        variant = None
        try:
            self.authorize(request)
            model_id = await self.model_for(request)
            routed = VARIANT_HEADER in request.headers or KEY_HEADER in request.headers
            variant = self.variant_for(request) if routed else PRIMARY
            info = await self.call_classifier("info", variant=variant, model_id=model_id)
        except RequestError as err:
            return self.refuse(err, variant)
        return self.respond(info, info, variant)

    @api.post("/v1/classify")
    async def classify(self, request: Request):
        return await self.answer_classify(request)

    async def answer_classify(self, request: Request, model_id: str | None = None):
        """POST /v1/classify (and /v1/models/{id}/classify, with `model_id`)."""
        started = time.perf_counter()
        variant, answered = None, None
        try:
            self.authorize(request)
            model_id = await self.model_for(request, model_id)
            variant = self.variant_for(request)
            async with self.admission.slot():
                response, answered = await self._classify(request, variant, model_id)
        except RequestError as err:
            response = self.refuse(err, variant)
        ms = (time.perf_counter() - started) * 1000
        add_server_timing(response, ms)
        self.latency.observe(ms, tags={"status": str(response.status_code), "variant": variant or "none"})
        if variant is not None:
            results = answered[1] if answered else []
            labels, scores = [r["label"] for r in results], [r["score"] for r in results]
            self.emit(
                {"e": "req", "variant": variant, "ok": response.status_code == 200, "ms": ms, "labels": labels, "scores": scores}
            )
            if answered and (self.shadows or variant != PRIMARY) and random.random() < self.shadow_fraction:
                response.background = BackgroundTask(self.offer_mirrors, variant, *answered)  # after the answer is sent
        return response

    async def _classify(self, request: Request, variant: str, model_id: str | None) -> tuple[JSONResponse, tuple | None]:
        images, top_k = await read_images(request, self.max_request_bytes, self.max_images, self.default_top_k)
        results, bad, timing = await self.predict(images, top_k, variant, model_id)
        if bad:
            return self.refuse_images(bad, len(images), variant), None
        models = [r.pop("model") for r in results]
        if any(m["id"] != models[0]["id"] for m in models):  # answered across a model switch: say so
            for r, m in zip(results, models):
                r["model_id"] = m["id"]
        self.predictions.inc(len(results), tags={"model": models[0]["id"][:12], "variant": variant})
        response = self.respond({"model": models[0], "predictions": results}, models[0], variant)
        response.server_timing = timing
        return response, ((images, results, models[0]["id"]) if response.status_code == 200 else None)

    async def predict(self, images: list[bytes], top_k: int, variant: str, model_id: str | None = None) -> tuple:
        """Every protocol's prediction: each image to the variant's classifier (so that images batch across
        requests) -> (results, [(index, error)] of the images refused, the stages' times in ms)."""

        async def one(data: bytes) -> dict:
            sent = time.perf_counter()
            if model_id:  # many models: each call names its model, so these go one by one
                result = await self.call_classifier("classify", data, top_k, variant=variant, model_id=model_id)
            else:
                result = await self.sender(variant)((data, top_k))
                if "exception" in result:  # what the classifier raised for this image alone
                    raise result["exception"]
            if "timing" in result:
                result["timing"]["hop"] = (time.perf_counter() - sent) * 1000 - result["timing"]["classifier"]
            return result

        results = await asyncio.gather(*(one(data) for data in images))
        timings = [r.pop("timing") for r in results if "timing" in r]
        timing = {k: max(t[k] for t in timings) for k in timings[0]} if timings else {}
        return results, [(i, r["error"]) for i, r in enumerate(results) if "error" in r], timing

    def sender(self, variant: str):
        """The variant's sender (a @serve.batch queue, built on first use in this replica): the images that
        concurrent requests queued while this replica's event loop was busy go to the classifier in one call
        (at most `max_batch_size`), never waiting for more; a lone image goes at once. Measured on 2 cores at
        16 clients: 97 -> 114 req/s, the per-call work in the Ingress and the classifier paid once per call."""
        send = self.senders.get(variant)
        if send is None:

            async def send_many(items: list[tuple[bytes, int]]) -> list[dict]:
                return await self.call_classifier("classify_many", items, variant=variant)

            send = self.senders[variant] = serve.batch(
                max_batch_size=self.send_batch, batch_wait_timeout_s=0.0, max_concurrent_batches=self.max_running
            )(send_many)
        return send

    # The routes of the other protocols and of --models (declared here: Serve's class-based view pickles this
    # class's methods with their FastAPI signatures; a mixin's own routes would reach the replica without them)

    @api.get("/v1/models")
    async def models(self, request: Request):
        return await self.list_models(request)

    @api.post("/v1/models/{model_id}/classify")
    async def classify_model(self, request: Request, model_id: str):
        return await self.answer_classify(request, model_id)

    @api.get("/v2")
    async def v2(self, request: Request):
        return await self.v2_server(request)

    @api.get("/v2/health/live")
    async def v2_health_live(self, request: Request):
        return self.v2_live(request)

    @api.get("/v2/health/ready")
    async def v2_health_ready(self, request: Request):
        return await self.v2_ready(request)

    @api.get("/v2/models/{name}")
    async def v2_model_metadata(self, request: Request, name: str):
        return await self.v2_metadata(request, name)

    @api.get("/v2/models/{name}/ready")
    async def v2_model_is_ready(self, request: Request, name: str):
        return await self.v2_model_ready(request, name)

    @api.post("/v2/models/{name}/infer")
    async def v2_model_infer(self, request: Request, name: str):
        return await self.v2_infer(request, name)

    @api.get("/v1/rollout")
    async def rollout(self, request: Request):
        """Per variant traffic and answers, per variant agreement with the primary on mirrored requests."""
        try:
            self.authorize(request)
        except RequestError as err:
            return self.refuse(err)
        if self.recorder is not None:
            await self.send_events()
            snapshot = await self.recorder.snapshot.remote(self.weights)
        else:
            snapshot = self.stats.snapshot(self.weights)
        return JSONResponse({**snapshot, "shadow_fraction": self.shadow_fraction, "shadows": list(self.shadows)})

    @api.post("/admin/rollout")
    async def set_rollout(self, request: Request):
        """New weights (and shadow fraction) as a new user_config of this deployment, applied through Serve;
        admin token only (DISTCLS_ADMIN_TOKEN), never the API token."""
        try:
            check_host(request.headers.get("host"), self.host_names)
            check_admin(request.headers.get("authorization", ""), self.admin_sha256)
            config = await self.read_rollout_change(request)
            app = serve.get_replica_context().app_name
            live = [self.deployments.get(name, name) for name, w in config["weights"].items() if w > 0]
            await admin.check_deployments_healthy(app, live)
            how = await admin.apply_ingress_config(app, config)
        except RequestError as err:
            return self.refuse(err)
        except ValueError as exc:
            return self.refuse(RequestError(409, "conflict", f"rollout change refused: {exc}"))
        deadline = time.monotonic() + 10
        while (self.weights, self.shadow_fraction) != (
            config["weights"],
            config["shadow_fraction"],
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        in_effect = self.weights == config["weights"]
        return JSONResponse({**config, "applied": how, "in_effect": in_effect})

    async def read_rollout_change(self, request: Request) -> dict:
        """{"weights": "main=50,new=50" or {...}, "shadow_fraction": f} -> the complete new user_config."""
        import json

        from distcls import DistclsError
        from distcls.config.serve import parse_weights

        try:
            body = json.loads(await read_body(request, 64_000) or b"{}")
            weights = parse_weights(body["weights"], list(self.handles), "weights")
            fraction = float(body.get("shadow_fraction", self.shadow_fraction))
            if not 0 <= fraction <= 1:
                raise ValueError(f"shadow_fraction {fraction} must be in [0, 1]")
        except (ValueError, KeyError, TypeError, AttributeError, DistclsError) as exc:
            raise RequestError(
                400, "bad_request", f'rollout change: {exc}; send {{"weights": "main=90,new=10", "shadow_fraction": 1.0}}'
            ) from None
        return {"weights": weights, "shadow_fraction": fraction}

    # --- the rollout's events and mirrors --------------------------------------------------------------

    async def offer_mirrors(self, variant: str, images: list[bytes], results: list[dict], model_id: str) -> None:
        """After the answer: the primary's requests to every shadow, an A/B variant's to the primary."""
        targets = [(name, name) for name in self.shadows] if variant == PRIMARY else [(variant, PRIMARY)]
        for pair_variant, call in targets:
            self.mirror.offer(MirrorJob(pair_variant, call, images, results, model_id))

    async def mirror_call(self, variant: str, data: bytes) -> dict:
        return await self.call_classifier("classify", data, 1, variant=variant)

    def emit(self, event: dict) -> None:
        """One rollout event: into the Prometheus counters, then to the recorder (batched) or this replica's stats."""
        kind, name = event["e"], event["variant"]
        if kind == "pair":
            agree = sum(p[0] == o[0] for p, o in zip(event["primary"], event["other"]))
            for outcome, n in (("agree", agree), ("disagree", len(event["primary"]) - agree)):
                if n:
                    self.mirrored.inc(n, tags={"variant": name, "outcome": outcome})
        elif kind in ("drop", "mirror_error"):
            self.mirrored.inc(tags={"variant": name, "outcome": "dropped" if kind == "drop" else "error"})
        if self.recorder is None:
            self.stats.add([event])
            return
        self.events.append(event)
        if self.flusher is None:
            self.flusher = asyncio.get_running_loop().create_task(self.flush_events())

    async def flush_events(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.send_events()

    async def send_events(self) -> None:
        events, self.events = self.events, []
        if events:
            try:
                await self.recorder.record.remote(events)
            except Exception as exc:  # the comparison misses these; the requests were answered
                print(f"distcls: rollout recorder: {type(exc).__name__}: {exc}", flush=True)

    # --- checks, the classifiers' handles, responses --------------------------------------------------

    def authorize(self, request: Request) -> None:
        check_host(request.headers.get("host"), self.host_names)
        check_bearer(request.headers.get("authorization", ""), self.token_sha256)

    def host_refused(self, request: Request) -> JSONResponse | None:
        try:
            check_host(request.headers.get("host"), self.host_names)
        except RequestError as err:
            return self.refuse(err)
        return None

    async def call_classifier(self, method: str, *args, variant: str = PRIMARY, model_id: str | None = None):
        """A classifier call, retried on another replica when the one answering died (never on overload)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        handle = self.handles.get(variant) or self.shadows[variant]
        if model_id:  # many models: the replica that holds it, else one that loads it (LRU)
            handle = handle.options(multiplexed_model_id=model_id)
        for attempt in range(RETRIES + 1):
            try:
                return await getattr(handle, method).remote(*args)
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

    def refuse(self, err: RequestError, variant: str | None = None) -> JSONResponse:
        """The JSON error; once the request was routed, with the header naming its variant (the body stays the
        documented {"error": ...}: no variant answered it)."""
        self.errors.inc(tags={"kind": err.kind, "variant": variant or "none"})
        response = error_response(err)
        return named(response, variant) if variant is not None else response

    def respond(self, content: dict, model: dict, variant: str) -> JSONResponse:
        """200 with `content` (naming the variant), or 500 naming the model when a NaN or an infinity got into
        it (never in JSON)."""
        if non_finite(content):
            return self.refuse(model_failure(model), variant)
        return named(JSONResponse({**content, "variant": variant}), variant)

    def refuse_images(self, bad: list[tuple[int, dict]], count: int, variant: str) -> JSONResponse:
        """422 naming the first image that could not be classified; 500 (naming the model) when the model failed."""
        for _, e in bad:
            self.errors.inc(tags={"kind": e["kind"], "variant": variant})
        failed = [(i, e) for i, e in bad if e.get("status") == 500]
        i, e = (failed or bad)[0]
        where = f"image {i}" if count > 1 else "the image"
        error = {"kind": e["kind"], "message": f"{where}: {e['message']}", "image": i, "bad_images": [j for j, _ in bad]}
        if "model" in e:
            error["model"] = e["model"]
        return named(JSONResponse({"error": error, "variant": variant}, status_code=500 if failed else 422), variant)

"""The `ImageClassifier` deployment: batched forward passes, one model per replica or many (multiplexed).

Each request's image is decoded and preprocessed in a thread with the checkpoint's own spec, then
`@serve.batch` gathers images across requests into one forward pass on the inference engine's runtime.
The deployment's `user_config` is either {"checkpoint": URI}: one model, `reconfigure` loads another one fully,
then swaps it in (a batch may straddle the switch); or {"models": PREFIX}: every checkpoint under the prefix,
loaded on first use by `serve.multiplexed` (the request's multiplexed model id is the folder name), at most
`max_models_per_replica` at once, the least recently used evicted. `classify` is where a prediction is made
and checked (what every protocol calls), with the time it spent (decode, batch wait, forward); `info` is GET
/v1/model, `models_status` the replica's loaded models and evictions. cluster/kuberay/rayservice.yaml overrides
this deployment by its name, `ImageClassifier`.
"""

import asyncio
import time

import numpy as np
from ray import serve

from distcls import DistclsError
from distcls.infer.api import model_info, non_finite
from distcls.serving.http import model_failure


@serve.deployment
class ImageClassifier:
    """Decodes each request's image in a thread, then batches forward passes (on the inference engine's runtime:
    onnxruntime on CPU, torch bf16 on CUDA, unless --runtime says otherwise)."""

    def __init__(
        self,
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.0,
        max_concurrent_batches: int = 1,
        threads: int = 1,
        runtime: str = "auto",
        unknown: str = "off",
        max_models_per_replica: int = 3,
    ):
        import torch

        torch.set_num_threads(max(1, threads))
        self.threads, self.runtime, self.unknown = max(1, threads), runtime, unknown
        self.loaded = None  # an infer.Predictor (one-model mode)
        self.prefix: str | None = None  # the --models prefix (many-models mode)
        self.scoring: dict[str, tuple] = {}  # model id -> (Calibration, unknown threshold or None)
        self.uris: dict[str, str] = {}  # model id -> its URI (logged, never sent to clients)
        self.loads = 0
        # Built per replica (Ray's decorator has no setter for max_concurrent_batches): up to that many forward
        # passes run at once, each in its own thread, so a core is not left idle between batches.
        self.predict_batch = serve.batch(
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s,
            max_concurrent_batches=max(1, max_concurrent_batches),
        )(self.forward_batch)

        async def load_one(model_id: str):
            return await asyncio.to_thread(self.load, f"{self.prefix.rstrip('/')}/{model_id}")

        self.get_model = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(load_one)

    def load(self, uri: str):
        """Load and verify one checkpoint (or export) with its calibration and `unknown` threshold."""
        from distcls.infer import load_model
        from distcls.scores import Calibration, resolve_unknown

        loaded = load_model(uri, self.runtime, threads=self.threads)
        calibration = Calibration.of(loaded.meta)
        try:
            threshold = resolve_unknown(self.unknown, calibration, "serve")
        except DistclsError as exc:  # a model switched to on a running app: serve it, without `unknown`
            print(f"distcls: {exc}; serving {uri} with --unknown off", flush=True)
            threshold = None
        self.scoring[loaded.id] = (calibration, threshold)
        self.uris[loaded.id] = uri
        self.loads += 1
        return loaded

    def reconfigure(self, config: dict) -> None:
        """user_config {"checkpoint": URI}: load the new model fully, then swap it in (no request fails);
        {"models": PREFIX}: serve the checkpoints under PREFIX, loaded when first asked for."""
        from distcls.checkpoint import checkpoint_id, read_meta

        if config.get("models"):
            self.prefix = config["models"]
            return
        uri = config["checkpoint"]
        if self.loaded is not None and checkpoint_id(read_meta(uri)) == self.loaded.id:
            return
        self.loaded = self.load(uri)

    def check_health(self) -> None:
        if self.loaded is None and self.prefix is None:
            raise RuntimeError("no model loaded")

    async def model(self):
        """The Predictor for this request: the request's multiplexed model, else the one model."""
        model_id = serve.get_multiplexed_model_id()
        if self.prefix is None or not model_id:
            if self.loaded is None:
                raise DistclsError("this endpoint serves many models (--models): name one in the request")
            return self.loaded
        return await self.get_model(model_id)

    async def info(self) -> dict:
        """GET /v1/model: id, architecture, classes, preprocessing, calibration numbers, runtime..."""
        loaded = await self.model()
        return model_info(loaded, self.scoring[loaded.id][1])

    def models_status(self) -> dict:
        """This replica's loaded models (multiplexed ids), loads and evictions so far."""
        wrapper = getattr(self.get_model.__wrapped__, "__serve_multiplex_wrapper", None)  # Ray's LRU of this replica
        held = list(wrapper.models) if wrapper is not None else []
        return {"loaded": held, "loads": self.loads, "evictions": self.loads - len(held) if self.prefix else 0}

    async def classify(self, data: bytes, top_k: int) -> dict:
        """One image -> {"label", "score", "topk", "model", "timing"}, or {"error": {"kind", "message"}}."""
        from distcls.images import ImageDecodeError
        from distcls.infer import top_prediction
        from distcls.transforms import preprocess_bytes

        started = time.perf_counter()
        loaded = await self.model()
        try:
            image = await asyncio.to_thread(preprocess_bytes, data, loaded.spec)
        except ImageDecodeError as exc:
            return {"error": {"kind": exc.kind, "message": exc.message}}
        queued = time.perf_counter()
        logits, forward_started, forward_ms = await self.predict_batch((loaded, image))
        with np.errstate(invalid="ignore", over="ignore"):  # a broken model's NaN is answered below, not warned
            prediction = top_prediction(logits, loaded.class_names, top_k, *self.scoring[loaded.id])
        model = {"id": loaded.id, "architecture": loaded.meta["architecture"]}
        if non_finite(prediction):
            err = model_failure(model)
            print(f"distcls: serve: {self.uris.get(loaded.id)}: {err.message}", flush=True)
            return {"error": {"kind": err.kind, "message": err.message, "status": 500, "model": model}}
        prediction["model"] = model
        prediction["timing"] = {
            "decode": (queued - started) * 1000,
            "wait": (forward_started - queued) * 1000,
            "forward": forward_ms,
            "classifier": (time.perf_counter() - started) * 1000,
        }
        return prediction

    async def forward_batch(self, items: list[tuple[object, np.ndarray]]) -> list[tuple[np.ndarray, float, float]]:
        """One batch (gathered by `predict_batch`, the @serve.batch queue built in __init__) in a thread."""
        return await asyncio.to_thread(self._forward, items)

    async def classify_many(self, items: list[tuple[bytes, int]]) -> list[dict]:
        """`classify` for each (image, top_k) of one call from the Ingress's sender (images of several
        requests); what one image raises comes back as {"exception": ...} for its own request only."""
        results = await asyncio.gather(*(self.classify(data, top_k) for data, top_k in items), return_exceptions=True)
        return [{"exception": r} if isinstance(r, Exception) else r for r in results]

    @staticmethod
    def _forward(items: list[tuple[object, np.ndarray]]) -> list[tuple[np.ndarray, float, float]]:
        """Each item's logits, with when the forward pass began and how long it took (ms)."""
        began = time.perf_counter()
        out: list[np.ndarray | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}  # a batch can straddle a model switch, or hold several models
        for i, (loaded, _) in enumerate(items):
            groups.setdefault(loaded.id, []).append(i)
        for idx in groups.values():
            logits = items[idx[0]][0].predict(np.stack([items[i][1] for i in idx]))
            for row, i in enumerate(idx):
                out[i] = logits[row]
        ms = (time.perf_counter() - began) * 1000
        return [(logits, began, ms) for logits in out]

"""The `ImageClassifier` deployment: one model per replica, batched forward passes.

Each request's image is decoded and preprocessed in a thread with the checkpoint's own spec, then
`@serve.batch` gathers images across requests into one forward pass on the inference engine's runtime.
The checkpoint is the deployment's `user_config`: `reconfigure` loads another one fully, then swaps it in
(a batch may straddle the switch). `classify` is where a prediction is made and checked (what a protocol
other than distcls's own would call); `info` is GET /v1/model, the Python API's `model_info`.
cluster/kuberay/rayservice.yaml overrides this deployment by its name, `ImageClassifier`.
"""

import asyncio

import numpy as np
from ray import serve

from distcls import DistclsError
from distcls.infer.api import model_info, non_finite
from distcls.serving.http import model_failure


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
        """GET /v1/model: id, architecture, classes, preprocessing, calibration numbers, runtime..."""
        return model_info(self.loaded, self.scoring[self.loaded.id][1])

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

"""The engine inside Ray Data, and the prediction helpers every consumer shares.

`BatchPredictor` is the callable class Ray Data's actor pool runs: the model is loaded once per actor
(`load_model`, on the runtime the driver chose), each batch gets `logits` and loses `image`.
"""

from __future__ import annotations

import numpy as np

from distcls import DistclsError


class BatchPredictor:
    """Ray Data callable class: adds `logits` (float32) for the rows without `error`, drops `image`."""

    def __init__(
        self,
        checkpoint: str,
        runtime: str = "auto",
        device: str | None = None,
        threads: int | None = None,
        expected_model: str | None = None,
        embeddings: bool = False,
        max_bytes: int | None = None,
    ):
        from distcls.infer.engine import load_model

        # Ray pins actors to OMP_NUM_THREADS = their CPU count; `threads` is that share, set explicitly.
        self.predictor = load_model(checkpoint, runtime, device, threads)
        found = self.predictor.id
        if expected_model and found != expected_model:
            raise DistclsError(
                f"label: the model at {checkpoint} changed while the job ran (weights sha256 "
                f"{str(found)[:12]}..., the job verified {expected_model[:12]}...); rows of two models "
                "would mix: run the job again, with a new --output for the new model"
            )
        self.num_classes = len(self.predictor.meta["class_names"])
        self.embeddings = embeddings
        self.max_bytes = max_bytes  # image objects read by DecodeAndPredict (None: objects.DEFAULT_MAX_OBJECT_BYTES)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.fromiter((not e for e in batch["error"]), dtype=bool, count=len(batch["error"]))
        logits = np.zeros((len(ok), self.num_classes), dtype=np.float32)
        images = batch["image"][ok] if not ok.all() else batch["image"]
        out = {k: v for k, v in batch.items() if k != "image"}
        if self.embeddings:
            features = None
            if ok.any():
                logits[ok], feats = self.predictor.predict_with_features(images)
                features = np.zeros((len(ok), feats.shape[1]), dtype=np.float16)
                features[ok] = feats
            out["embedding"] = features if features is not None else np.zeros((len(ok), 1), dtype=np.float16)
            out["thumb"] = thumbnails(batch["image"])
        elif ok.any():
            logits[ok] = self.predictor.predict(images)
        out["logits"] = logits
        return out


class DecodeAndPredict(BatchPredictor):
    """Rows {"path", ...} -> read, decode and preprocess (threads, the model's own spec), then predict, in one
    actor: no decode tasks and no decoded images through the object store (the fused CPU pipeline)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from distcls.datasets import load_images

        return super().__call__(load_images(batch, self.predictor.spec, max_bytes=self.max_bytes))


THUMB_SIDE = 16


def thumbnails(images: np.ndarray) -> np.ndarray:
    """(N, 256) uint8: each model-input image as a 16x16 grey thumbnail (box-filtered). `dedup` compares
    them to confirm a near-duplicate that the embeddings propose (resizing and re-encoding barely change it,
    two different photos of similar things do)."""
    from PIL import Image

    out = np.zeros((len(images), THUMB_SIDE * THUMB_SIDE), dtype=np.uint8)
    for i, image in enumerate(images):
        grey = Image.fromarray(np.asarray(image, dtype=np.float32).mean(axis=0)).resize((THUMB_SIDE, THUMB_SIDE), Image.BOX)
        out[i] = np.clip(np.asarray(grey), 0, 255).astype(np.uint8).ravel()
    return out


def predict_dataset(
    ds,
    checkpoint: str,
    batch_size: int,
    concurrency: int | tuple[int, ...],
    num_gpus: float,
    cpus_per_replica: float = 1.0,
    runtime: str = "auto",
    decode: bool = False,
    expected_model: str | None = None,
    embeddings: bool = False,
    max_bytes: int | None = None,
):
    """Add `logits` with an actor pool of `concurrency` replicas (an int, or (MIN, MAX) to autoscale).
    `runtime` should be what `prepare_runtime` chose in the driver, so actors never compile. With `decode`
    the rows are paths and the actors read and decode them too (DecodeAndPredict). `expected_model`: the
    weights sha256 the driver verified; an actor that loads other weights (the model replaced mid-run) refuses.
    `max_bytes`: the largest image object the decoding actors read (too_large rows past it)."""
    return ds.map_batches(
        DecodeAndPredict if decode else BatchPredictor,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "runtime": runtime,
            "threads": max(1, int(cpus_per_replica)),
            "expected_model": expected_model,
            "embeddings": embeddings,
            "max_bytes": max_bytes,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=actor_pool(concurrency),
        num_gpus=num_gpus or None,
        num_cpus=cpus_per_replica,
    )


def actor_pool(concurrency: int | tuple[int, ...]):
    import ray.data

    sizes = (concurrency,) if isinstance(concurrency, int) else tuple(concurrency)
    if len(sizes) == 1:
        return ray.data.ActorPoolStrategy(size=sizes[0])
    return ray.data.ActorPoolStrategy(min_size=sizes[0], max_size=sizes[1])


def top_prediction(logits: np.ndarray, class_names: list[str], k: int, calibration=None, unknown_above=None) -> dict:
    """One image's (C,) logits -> the endpoint's form: {"label", "score", "topk": [{"label", "score"}, ...],
    "margin", "entropy", "ood_score", "calibrated"}; scores calibrated when the model is, label `unknown`
    past `unknown_above` (top-k kept)."""
    from distcls.scores import UNKNOWN, Calibration, score

    calibration = calibration or Calibration()
    s = score(np.asarray(logits)[None, :], calibration, k, unknown_above)
    topk = [{"label": class_names[j], "score": float(s.probs[0, j])} for j in s.order[0]]
    return {
        "label": UNKNOWN if s.unknown[0] else topk[0]["label"],
        "score": topk[0]["score"],
        "topk": topk,
        "margin": float(s.margin[0]),
        "entropy": float(s.entropy[0]),
        "ood_score": float(s.ood_score[0]),
        "calibrated": calibration.calibrated,
    }

"""The inference engine: every consumer (label, evaluate, serve, compare, the bench baselines) loads and
runs models through here.

- `modelfile`: read and verify a model directory (checkpoint or export) written by someone else.
- `engine`: `load_model(uri, runtime, device, threads) -> Predictor` and the runtime/device policy.
- `onnxrt`: the onnxruntime session, compiling checkpoints to ONNX, the compile cache.
- `batch`: the Ray Data batch predictor; the endpoint's form of one prediction.
- `labeled`: a model over a labeled index (`predict_labeled`), what evaluate, calibrate and find-label-issues run.
"""

from distcls.infer.batch import BatchPredictor, predict_dataset, top_prediction
from distcls.infer.modelfile import is_export, model_file_uri, verify_model

ENGINE = ("RUNTIMES", "Predictor", "load_model", "prepare_runtime")


def __getattr__(name: str):
    """The engine's names load torch and onnxruntime on first use: a driver that only plans (label) or
    verifies model files never imports them."""
    if name in ENGINE:
        from distcls.infer import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'distcls.infer' has no attribute {name!r}")


__all__ = [
    "BatchPredictor",
    "Predictor",
    "RUNTIMES",
    "is_export",
    "load_model",
    "model_file_uri",
    "predict_dataset",
    "prepare_runtime",
    "top_prediction",
    "verify_model",
]

"""The inference engine: every consumer (label, evaluate, serve, compare, the bench baselines) loads and
runs models through here.

- `modelfile`: read and verify a model directory (checkpoint or export) written by someone else.
- `engine`: `load_model(uri, runtime, device, threads) -> Predictor` and the runtime/device policy.
- `onnxrt`: the onnxruntime session, compiling checkpoints to ONNX, the compile cache.
- `batch`: the Ray Data batch predictor, softmax/top-k.
"""

from distcls.infer.batch import BatchPredictor, predict_dataset, softmax_topk, top_prediction
from distcls.infer.engine import RUNTIMES, Predictor, load_model, prepare_runtime
from distcls.infer.modelfile import is_export, model_file_uri, verify_model

__all__ = ["BatchPredictor", "Predictor", "RUNTIMES", "is_export", "load_model", "model_file_uri",
           "predict_dataset", "prepare_runtime", "softmax_topk", "top_prediction", "verify_model"]

"""The serving benchmark's baseline: one FastAPI + uvicorn process, one model, no batching.

Written as a careful engineer would write it without Ray: the same model loader (the inference engine,
on the runtime given: `torch` is the plain PyTorch server, `onnx` the same server on onnxruntime) and
preprocessing function as distcls, decode and forward in uvicorn's thread pool (PIL, torch and
onnxruntime release the GIL), one thread per forward so that concurrent requests run on different cores.
That was the fastest of the PyTorch variants measured on the 2-core machine at 1, 4 and 16 clients: 2 torch
threads with forwards serialised under a lock reached 32 req/s at 16 clients, 2 threads without the lock
41, 1 thread without the lock 50.
`python -m distcls.tools.plain_server CHECKPOINT PORT [THREADS] [RUNTIME]` (RUNTIME: torch, the default, or onnx).
"""

import sys

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from distcls.images import ImageDecodeError
from distcls.infer import load_model, top_prediction
from distcls.transforms import preprocess_bytes


def create_app(checkpoint: str, threads: int = 1, runtime: str = "torch") -> FastAPI:
    model = load_model(checkpoint, runtime, "cpu", threads=threads)
    names, model_info = model.class_names, {"id": model.id, "architecture": model.meta["architecture"]}
    app = FastAPI()

    def predict(data: bytes, top_k: int) -> dict:
        logits = model.predict(preprocess_bytes(data, model.spec)[None])
        return top_prediction(logits[0], names, top_k)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await request.body()
        try:
            prediction = await run_in_threadpool(predict, body, int(request.query_params.get("top_k", 5)))
        except ImageDecodeError as exc:
            return JSONResponse({"error": {"kind": exc.kind, "message": exc.message}}, status_code=422)
        return {"model": model_info, "predictions": [prediction]}

    size = model.spec.image_size  # warm-up, as distcls's replicas get from their first requests
    model.predict(np.zeros((1, 3, size, size), dtype=np.uint8))
    return app


if __name__ == "__main__":
    argv = sys.argv[1:]
    app = create_app(argv[0], int(argv[2]) if len(argv) > 2 else 1, argv[3] if len(argv) > 3 else "torch")
    uvicorn.run(app, host="127.0.0.1", port=int(argv[1]), log_level="warning", access_log=False)

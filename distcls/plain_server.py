"""The serving benchmark's baseline: one FastAPI + uvicorn process, one PyTorch model, no batching.

Written as a careful engineer would write it without Ray: the same checkpoint loader and preprocessing
function as distcls, eval + inference mode, decode and forward in uvicorn's thread pool (PIL and torch
release the GIL), one torch thread per forward so that concurrent requests run on different cores.
That was the fastest of the variants measured on the 2-core machine at 1, 4 and 16 clients: 2 torch
threads with forwards serialised under a lock reached 32 req/s at 16 clients, 2 threads without the lock
41, 1 thread without the lock 50. `python -m distcls.plain_server CHECKPOINT PORT [THREADS]`.
"""

import sys

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from distcls.checkpoint import checkpoint_id, load_checkpoint
from distcls.evaluate import top_prediction
from distcls.images import ImageDecodeError
from distcls.transforms import preprocess_bytes


def create_app(checkpoint: str, threads: int = 1) -> FastAPI:
    torch.set_num_threads(threads)
    model, meta = load_checkpoint(checkpoint)
    names, model_info = meta["class_names"], {"id": checkpoint_id(meta), "architecture": meta["architecture"]}
    app = FastAPI()

    def predict(data: bytes, top_k: int) -> dict:
        image = torch.from_numpy(preprocess_bytes(data, model.spec))[None]
        with torch.inference_mode():
            logits = model(image).numpy()
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

    with torch.inference_mode():  # warm-up, as distcls's replicas get from their first requests
        model(torch.zeros((1, 3, model.spec.image_size, model.spec.image_size), dtype=torch.uint8))
    return app


if __name__ == "__main__":
    uvicorn.run(create_app(sys.argv[1], int(sys.argv[3]) if len(sys.argv) > 3 else 1), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
                access_log=False)

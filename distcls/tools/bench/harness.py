"""What the benchmarks share: the machine record, real photos, the ImageNet checkpoint, the HTTP load generator."""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch

from distcls import __version__, storage
from distcls.models import get_model_info


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    import ray

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "distcls": __version__,
    }


def make_photos(n: int, seed: int = 0) -> list[bytes]:
    """N JPEGs of typical photo size (500x375), random crops of scikit-image's real sample photos."""
    import io

    from PIL import Image
    from skimage import data

    sources = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket(), data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src = Image.fromarray(sources[i % len(sources)])
        w, h = src.size
        scale = rng.uniform(0.6, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((left, top, left + cw, top + ch)).resize((500, 375), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def imagenet_checkpoint(root: str, model: str = "efficientnet_lite0") -> str:
    """An ImageNet classifier as a checkpoint under root (written once per bench run): the bundled pretrained
    EfficientNet-Lite0, or another registry architecture with random weights (for throughput only: the
    benchmark machines have no internet to fetch torchvision's weights)."""
    from distcls.checkpoint import META, from_pretrained

    checkpoint = f"{root}/ck/imagenet" if model == "efficientnet_lite0" else f"{root}/ck/imagenet-{model}"
    if not storage.exists(storage.join_uri(checkpoint, META)):
        storage.ensure_bucket(checkpoint)
        weights = "bundled" if get_model_info(model).bundled else "none"
        from_pretrained(out=checkpoint, model=model, weights=weights)
    return checkpoint


def post_image(conn, path: str, body: bytes) -> str:
    """POST one JPEG on `conn`: the HTTP status, or the exception's name when no answer came (the caller
    then reconnects)."""
    import http.client

    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "image/jpeg"})
        response = conn.getresponse()
        response.read()
        return str(response.status)
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        return type(exc).__name__


def load_test(url: str, photos: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` threads, each with one keep-alive connection, POST the photos in turn for `seconds`.
    requests/s counts 200 answers only; latency percentiles are over every request."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        k = i
        while time.perf_counter() < deadline:
            body = photos[k % len(photos)]
            k += clients
            started = time.perf_counter()
            code = post_image(conn, parts.path, body)
            if not code.isdigit():
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
            with lock:
                latencies.append(time.perf_counter() - started)
                codes[code] = codes.get(code, 0) + 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {
        "clients": clients,
        "requests_per_s": codes.get("200", 0) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "requests": len(latencies),
        "status_codes": codes,
    }


def wait_healthy(url: str, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"bench: {url} did not become healthy within {timeout:.0f}s")
        time.sleep(0.5)

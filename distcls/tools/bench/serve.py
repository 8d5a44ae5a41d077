"""`distcls bench serve`: `distcls serve` against plain single-process servers, one row per runtime.

Servers, measured in turn at each client count with the same load generator, same checkpoint and JPEGs:
- plain torch: FastAPI + uvicorn + the PyTorch model, no batching (`distcls.tools.plain_server`);
- plain onnx: the same server on onnxruntime (the same-runtime baseline);
- distcls (default runtime) and distcls torch: Ray Serve, batching, N replicas.
Ratios are taken at 16 clients against the plain servers (and p50 at 1 client against the same-runtime one). Where a
request's time goes (`measure_stages`): the endpoint's Server-Timing header (the Ingress's own work, the hop to the
classifier, decode, batch wait, forward) against the client's clock (the rest: the HTTP proxy and the client), at
1 and 16 clients. Then the shadow measurement (`bench_shadow`): the
primary's errors and p99 at 16 clients with no shadow, a shadow that sleeps 1 s per image and one that fails
on every image, the three applications measured in turn with the same load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys

from distcls.config import ServeConfig, from_config, to_dict
from distcls.infer import prepare_runtime
from distcls.runtime import SERVE_DEFAULTS
from distcls.tools.bench.harness import imagenet_checkpoint, load_test, make_photos, wait_healthy
from distcls.tools.bench.label import model_ceiling
from distcls.tools.config import BenchConfig
from distcls.tools.s3server import free_port

PLAIN = ("torch", "onnx")


def start_plain(checkpoint: str, runtime: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "distcls.tools.plain_server", checkpoint, str(port), "1", runtime])
    return proc, f"http://127.0.0.1:{port}"


def start_distcls(cfg: BenchConfig, checkpoint: str, runtime: str, port: int) -> tuple[dict, str]:
    """An application at /<runtime> (Serve has one HTTP proxy: every application shares its port)."""
    from distcls.serving import start

    settings = from_config(  # the bench's serve_cpus_per_replica, serve_max_batch_size, serve_batch_wait_timeout_s
        ServeConfig,
        cfg,
        prefix="serve_",
        checkpoint=checkpoint,
        port=port,
        min_replicas=cfg.serve_replicas,
        max_replicas=cfg.serve_replicas,
        runtime=runtime,
        name=f"bench-{runtime}",
    )
    return to_dict(settings), start(settings, route_prefix=f"/{runtime}", token="")


STAGES = ("proxy", "ingress", "hop", "decode", "wait", "forward", "classifier_other")


def server_timing(header: str) -> dict[str, float]:
    """`Server-Timing: name;dur=1.2, ...` -> {name: ms}."""
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        if rest:
            out[name] = float(rest)
    return out


def measure_stages(url: str, photos: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    """Median ms per stage of the 200 answers `clients` keep-alive clients get for `seconds`: `proxy` is the
    client's time less the endpoint's (HTTP client, Ray's proxy and its hop to the Ingress)."""
    import http.client
    import threading
    import time
    from urllib.parse import urlsplit

    import numpy as np

    parts, rows, deadline = urlsplit(url), [], time.perf_counter() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        k = i
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            conn.request(
                "POST", f"{parts.path}/v1/classify", body=photos[k % len(photos)], headers={"Content-Type": "image/jpeg"}
            )
            response = conn.getresponse()
            response.read()
            total, k = (time.perf_counter() - started) * 1000, k + clients
            t = server_timing(response.getheader("Server-Timing") or "")
            if response.status == 200 and t:
                other = t["classifier"] - t["decode"] - t["wait"] - t["forward"]
                rows.append(
                    {"total": total, "proxy": total - t["ingress"] - t["hop"] - t["classifier"], **t, "classifier_other": other}
                )
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {k: float(np.median([r[k] for r in rows])) if rows else float("nan") for k in ("total", *STAGES)}


def measure_servers(urls: dict[str, str], photos: list[bytes], cfg: BenchConfig) -> dict[int, dict]:
    """{clients: {server: load_test record}}: at each client count the servers are measured in turn."""
    for url in urls.values():
        wait_healthy(f"{url}/healthz")
        load_test(f"{url}/v1/classify", photos, 4, 3)  # warm-up: first batches, thread pools, caches
    return {
        clients: {name: load_test(f"{url}/v1/classify", photos, clients, cfg.serve_seconds) for name, url in urls.items()}
        for clients in cfg.serve_clients
    }


class SlowShadow:
    """A shadow that sleeps a second per image, then answers."""

    async def classify(self, data: bytes, top_k: int) -> dict:
        await asyncio.sleep(1.0)
        return {"label": "slow", "score": 0.5, "topk": [], "model": {"id": "slow", "architecture": "sleep"}}


class FailingShadow:
    """A shadow that fails on every image."""

    async def classify(self, data: bytes, top_k: int) -> dict:
        raise RuntimeError("this shadow fails on every request")


def shadow_app(settings: ServeConfig, shadow: type | None):
    """The distcls application for `settings`, with `shadow` (a class above) mirrored every request, or none."""
    from ray import serve

    from distcls.serving import application
    from distcls.serving.app import bind_classifier
    from distcls.serving.ingress import Ingress
    from distcls.serving.recorder import RolloutRecorder

    if shadow is None:
        return application(settings)
    name = shadow.__name__.lower()
    bound = serve.deployment(shadow, name=name, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000).bind()
    return Ingress.options(
        name="Ingress", ray_actor_options={"num_cpus": 0.5}, user_config={"weights": {"main": 100.0}, "shadow_fraction": 1.0}
    ).bind(
        bind_classifier(settings),
        max_request_bytes=int(settings.max_request_mb * 1e6),
        max_images=settings.max_images_per_request,
        default_top_k=settings.top_k,
        shadows={name: bound},
        recorder=RolloutRecorder.options(name="RolloutRecorder").bind("main", {"main": "primary", name: "shadow"}),
        mirror_queue=settings.shadow_queue,
    )


def bench_shadow(cfg: BenchConfig, checkpoint: str, photos: list[bytes], port: int) -> dict:
    """The primary at 16 clients with no shadow, a slow shadow and a failing one: errors and p99, in turn."""
    from ray import serve

    base = from_config(ServeConfig, cfg, prefix="serve_", checkpoint=checkpoint, port=port, name="shadow")
    base = dataclasses.replace(base, min_replicas=cfg.serve_replicas, max_replicas=cfg.serve_replicas)
    rows = {}
    for label, shadow in (("none", None), ("slow", SlowShadow), ("failing", FailingShadow)):
        serve.run(shadow_app(base, shadow), name="shadow", route_prefix="/shadow")
        url = f"http://127.0.0.1:{port}/shadow"
        wait_healthy(f"{url}/healthz")
        load_test(f"{url}/v1/classify", photos, 4, 3)  # warm-up
        rows[label] = load_test(f"{url}/v1/classify", photos, 16, cfg.serve_seconds)
        rows[label]["rollout"] = requests_json(f"{url}/v1/rollout")
        serve.delete("shadow")
        print(
            f"shadow {label}: {rows[label]['requests_per_s']:.1f} req/s, p99 {rows[label]['p99_ms']:.0f} ms, "
            f"errors {errors_of(rows[label])}",
            flush=True,
        )
    none = rows["none"]
    return {
        "rows": rows,
        **{f"p99_ratio_{k}": rows[k]["p99_ms"] / max(none["p99_ms"], 1e-9) for k in ("slow", "failing")},
        **{f"errors_{k}": errors_of(rows[k]) for k in rows},
    }


def errors_of(record: dict) -> int:
    return sum(n for code, n in record.get("status_codes", {}).items() if code != "200")


def requests_json(url: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def print_row(row: dict) -> None:
    names = [k for k in row if k != "clients"]
    print(
        f"{row['clients']:>3} clients: "
        + " | ".join(
            f"{name} {row[name]['requests_per_s']:.1f} req/s (p50 {row[name]['p50_ms']:.0f} ms, p99 {row[name]['p99_ms']:.0f} ms)"
            for name in names
        ),
        flush=True,
    )


def bench_serve(cfg: BenchConfig, root: str) -> dict:
    from ray import serve

    checkpoint = imagenet_checkpoint(root)
    photos = make_photos(cfg.serve_images, seed=1)
    default_runtime = prepare_runtime(checkpoint, "auto", use_gpu=False)[0]  # compiled before anything is timed
    # What the hardware allows: forward passes alone, all cores, no HTTP and no decoding.
    ceilings = {r: model_ceiling(dataclasses.replace(cfg, use_gpu=False), checkpoint, r, cfg.serve_max_batch_size) for r in PLAIN}
    print(
        "model alone on preprocessed tensors (batch "
        f"{cfg.serve_max_batch_size}): " + ", ".join(f"{r} {v:.1f} images/s" for r, v in ceilings.items()),
        flush=True,
    )
    plain = {r: start_plain(checkpoint, r) for r in PLAIN}
    urls = {f"plain_{r}": url for r, (_, url) in plain.items()}
    try:
        # One distcls application at a time (two would not fit a 2-core Ray's CPUs): the default runtime
        # side by side with both plain servers, then the torch runtime on its own.
        port = free_port()
        settings, urls["distcls"] = start_distcls(cfg, checkpoint, "auto", port)
        measured = measure_servers(urls, photos, cfg)
        stages = {f"clients_{n}": measure_stages(urls["distcls"], photos, n, min(cfg.serve_seconds, 10)) for n in (1, 16)}
        for key, row in stages.items():
            print(f"stages ({key}, median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
        serve.delete(settings["name"])
        _, torch_url = start_distcls(cfg, checkpoint, "torch", port)
        measured_torch = measure_servers({"distcls_torch": torch_url}, photos, cfg)
        serve.delete("bench-torch")
        shadow = bench_shadow(cfg, checkpoint, photos, port)
    finally:
        for proc, _ in plain.values():
            proc.terminate()
            proc.wait(timeout=30)
        serve.shutdown()
    rows = [{"clients": n, **measured[n], **measured_torch[n]} for n in cfg.serve_clients]
    for row in rows:
        print_row(row)
    at16 = next((r for r in rows if r["clients"] == 16), rows[-1])
    at1 = next((r for r in rows if r["clients"] == 1), rows[0])
    ours, same = at16["distcls"], at16[f"plain_{default_runtime}"]
    result = {
        "photos": len(photos),
        "settings": settings,
        "default_runtime": default_runtime,
        # How Ray Serve ran (runtime.SERVE_DEFAULTS unless the environment said otherwise).
        "ray_serve_env": {k: os.environ.get(k) for k in SERVE_DEFAULTS},
        "model_only_images_per_s": ceilings,
        "rows": rows,
        "ratio_clients": at16["clients"],
        "ratio_rps_vs_plain_torch": ours["requests_per_s"] / max(at16["plain_torch"]["requests_per_s"], 1e-9),
        "ratio_p99_vs_plain_torch": ours["p99_ms"] / max(at16["plain_torch"]["p99_ms"], 1e-9),
        "ratio_rps_vs_plain_same_runtime": ours["requests_per_s"] / max(same["requests_per_s"], 1e-9),
        "ratio_p50_1client_vs_plain_same_runtime": at1["distcls"]["p50_ms"]
        / max(at1[f"plain_{default_runtime}"]["p50_ms"], 1e-9),
        "stages_ms": stages,
        "shadow": shadow,
    }
    print(
        f"distcls serve at {at16['clients']} clients: {result['ratio_rps_vs_plain_torch']:.2f}x the plain PyTorch "
        f"server's req/s at {result['ratio_p99_vs_plain_torch']:.2f}x its p99; "
        f"{result['ratio_rps_vs_plain_same_runtime']:.2f}x the plain {default_runtime} server's req/s, "
        f"{result['ratio_p50_1client_vs_plain_same_runtime']:.2f}x its p50 at 1 client",
        flush=True,
    )
    return result

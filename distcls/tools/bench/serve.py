"""`distcls bench serve`: `distcls serve` against plain single-process servers, one row per runtime.

Servers, measured in turn at each client count with the same load generator, same checkpoint and JPEGs:
- plain torch: FastAPI + uvicorn + the PyTorch model, no batching (`distcls.tools.plain_server`);
- plain onnx: the same server on onnxruntime (the same-runtime baseline);
- distcls (default runtime) and distcls torch: Ray Serve, batching, N replicas.
Ratios are taken at 16 clients against the plain servers. Then the shadow measurement (`bench_shadow`): the
primary's errors and p99 at 16 clients with no shadow, a shadow that sleeps 1 s per image and one that fails
on every image, the three applications measured in turn with the same load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys

from distcls.config import ServeConfig, from_config, to_dict
from distcls.infer import prepare_runtime
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
    ours, same = at16["distcls"], at16[f"plain_{default_runtime}"]
    result = {
        "photos": len(photos),
        "settings": settings,
        "default_runtime": default_runtime,
        "model_only_images_per_s": ceilings,
        "rows": rows,
        "ratio_clients": at16["clients"],
        "ratio_rps_vs_plain_torch": ours["requests_per_s"] / max(at16["plain_torch"]["requests_per_s"], 1e-9),
        "ratio_p99_vs_plain_torch": ours["p99_ms"] / max(at16["plain_torch"]["p99_ms"], 1e-9),
        "ratio_rps_vs_plain_same_runtime": ours["requests_per_s"] / max(same["requests_per_s"], 1e-9),
        "shadow": shadow,
    }
    print(
        f"distcls serve at {at16['clients']} clients: {result['ratio_rps_vs_plain_torch']:.2f}x the plain PyTorch "
        f"server's req/s at {result['ratio_p99_vs_plain_torch']:.2f}x its p99; "
        f"{result['ratio_rps_vs_plain_same_runtime']:.2f}x the plain {default_runtime} server's req/s",
        flush=True,
    )
    return result

"""The endpoint under load and faults, over real HTTP on the session's local Ray instance.

A bounded load generator (a few client threads, one request in flight each, paced to a fixed rate)
runs while the fault happens for real: a classifier replica's process is SIGKILLed, the application is
redeployed with another checkpoint, or far more clients arrive than the queues admit.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import requests
from PIL import Image

from distcls.checkpoint import from_pretrained, read_meta
from distcls.config import ServeConfig
from tests.conftest import alive_replicas, encode, make_checkpoint

BUCKET = "s3://serve-faults"
QUIET = {"log_level": "WARNING", "enable_access_log": False}
CLIENT_TIMEOUT = 60  # seconds; a request that takes longer counts as failed


@dataclass
class Shot:
    at: float  # seconds since the load started
    seconds: float
    status: str  # "200", "503", ... or the exception's name
    model: str | None = None
    kind: str | None = None  # a refusal's error kind from distcls's JSON body; "text" for another body


class Load:
    """`clients` threads POST `body` to `url`, together `rate` requests/s (None: as fast as each can) for
    `seconds`. Each thread has one keep-alive connection and one request in flight, so a slow server
    delays that thread's next request instead of piling up more: the load is bounded."""

    def __init__(self, url: str, body: bytes, clients: int, seconds: float, rate: float | None = None):
        self.url, self.body, self.clients, self.seconds, self.rate = url, body, clients, seconds, rate
        self.shots: list[Shot] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> Load:
        self.t0 = time.perf_counter()
        for t in self.threads:
            t.start()
        return self

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def client(self, i: int) -> None:
        session = requests.Session()
        for k in range(10**9):
            due = (i + k * self.clients) / self.rate if self.rate else self.now()
            if due >= self.seconds:
                break
            if due > self.now():
                time.sleep(due - self.now())
            started = self.now()
            model = kind = None
            try:
                r = session.post(self.url, data=self.body, headers={"Content-Type": "image/jpeg"}, timeout=CLIENT_TIMEOUT)
                status = str(r.status_code)
                if r.status_code == 200:
                    model = r.json()["model"]["id"]
                else:
                    try:
                        kind = r.json()["error"]["kind"]
                    except (ValueError, KeyError, TypeError):
                        kind = "text"
            except requests.RequestException as exc:
                status = type(exc).__name__
                session = requests.Session()
            with self.lock:
                self.shots.append(Shot(started, self.now() - started, status, model, kind))
        session.close()

    def join(self) -> list[Shot]:
        for t in self.threads:
            t.join(self.seconds + 2 * CLIENT_TIMEOUT)
        assert not any(t.is_alive() for t in self.threads), "a client hung past its timeout"
        return sorted(self.shots, key=lambda s: s.at)


def summary(shots: list[Shot]) -> str:
    codes: dict[str, int] = {}
    for s in shots:
        codes[s.status] = codes.get(s.status, 0) + 1
    ms = np.array([s.seconds for s in shots]) * 1000
    return (
        f"{len(shots)} requests, {codes}, latency p50 {np.percentile(ms, 50):.0f} ms, "
        f"p99 {np.percentile(ms, 99):.0f} ms, max {ms.max():.0f} ms"
    )


@pytest.fixture(scope="module")
def checkpoints(s3_server) -> dict[str, str]:
    """Two small 10-class EfficientNet-Lite0 checkpoints at 64 px (different heads: different ids), and
    the ImageNet one at 224 px for the overload test (slow enough per image to fill the queues)."""
    uris = {"a": f"{BUCKET}/ck/a", "b": f"{BUCKET}/ck/b", "imagenet": f"{BUCKET}/ck/imagenet"}
    for seed, key in ((0, "a"), (1, "b")):
        make_checkpoint(uris[key], 10, image_size=64, seed=seed)
    from_pretrained(out=uris["imagenet"])
    return uris


def two_replicas(checkpoint: str, port: int, **kw) -> ServeConfig:
    return ServeConfig(
        checkpoint=checkpoint,
        min_replicas=2,
        max_replicas=2,
        cpus_per_replica=0.5,
        port=port,
        max_ongoing_requests=8,
        max_queued_requests=32,
        **kw,
    )


@pytest.fixture(scope="module")
def serve_port(ray_local, checkpoints):
    from ray import serve

    from distcls.tools.s3server import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
    yield port
    serve.shutdown()


DEPLOYED: set[str] = set()


@pytest.fixture(autouse=True)
def delete_apps_after_each_test():
    """Each test's applications go when it ends: their replicas would hold the session's few CPUs."""
    yield
    from ray import serve

    while DEPLOYED:
        serve.delete(DEPLOYED.pop())


def deploy(app, name: str) -> None:
    from ray import serve

    DEPLOYED.add(name)
    serve.run(app, name=name, route_prefix=f"/{name}", logging_config=QUIET)


@pytest.fixture(scope="module")
def photo_jpeg(photo) -> bytes:
    return encode(Image.fromarray(photo), "JPEG", quality=90)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.mark.slow
def test_killing_one_of_two_replicas_keeps_99_percent(serve_port, checkpoints, photo_jpeg):
    """4 requests/s from 4 clients for 45 s; 8 s in, one of the two replica processes gets SIGKILL."""
    from distcls.serving import application

    deploy(application(two_replicas(checkpoints["a"], serve_port)), "kill")
    url = f"http://127.0.0.1:{serve_port}/kill/v1/classify"
    assert requests.post(url, data=photo_jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60).status_code == 200
    before = wait_for(lambda: alive_replicas("kill") if len(alive_replicas("kill")) == 2 else None, 60, "2 replicas")
    load = Load(url, photo_jpeg, clients=4, seconds=45, rate=4).start()
    time.sleep(8)
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = load.now()
    replaced = wait_for(
        lambda: (pids := set(alive_replicas("kill"))) and len(pids) == 2 and victim not in pids and pids,
        120,
        "Serve to replace the killed replica",
    )
    back_at = load.now()
    shots = load.join()
    ok = sum(s.status == "200" for s in shots)
    after_kill = [s for s in shots if s.at >= killed_at]
    print(
        f"\nkill: replica pid {victim} SIGKILLed at {killed_at:.1f}s, replacement {sorted(replaced - set(before))} "
        f"alive by {back_at:.1f}s; all: {summary(shots)}; after the kill: {summary(after_kill)}"
    )
    assert len(shots) >= 150  # the rate was held: 4/s for 45 s is 180
    assert ok >= 0.99 * len(shots), summary(shots)
    assert len(after_kill) >= 100 and sum(s.status == "200" for s in after_kill) >= 0.99 * len(after_kill)


@pytest.mark.slow
def test_redeploy_with_new_checkpoint_under_load_fails_no_request(serve_port, checkpoints, photo_jpeg):
    """4 requests/s from 4 clients while the application is redeployed a -> b, then b -> a with another
    batch size. `serve.run` gives every deployment a new version, so each redeploy replaces both replica
    processes (a rolling update), the hardest case for in-flight requests."""
    from distcls.serving import application

    ids = {key: read_meta(uri)["weights_sha256"] for key, uri in checkpoints.items()}
    deploy(application(two_replicas(checkpoints["a"], serve_port)), "redeploy")
    url = f"http://127.0.0.1:{serve_port}/redeploy/v1/classify"
    assert requests.post(url, data=photo_jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60).status_code == 200
    pids = [wait_for(lambda: (p := set(alive_replicas("redeploy"))) and len(p) == 2 and p, 60, "2 replicas")]
    load = Load(url, photo_jpeg, clients=4, seconds=600, rate=4).start()
    times = []
    try:
        for key, extra in (("b", {}), ("a", {"max_batch_size": 16})):
            time.sleep(5)
            deploy(application(two_replicas(checkpoints[key], serve_port, **extra)), "redeploy")
            wait_for(
                lambda: load.shots and load.shots[-1].model == ids[key],  # noqa: B023 - called in this iteration
                120,
                f"answers from checkpoint {key}",
            )
            times.append(load.now())
            pids.append(wait_for(lambda: (p := set(alive_replicas("redeploy"))) and len(p) == 2 and p, 120, "2 replicas"))
        time.sleep(5)
    finally:
        load.seconds = 0  # every client stops after its current request
        shots = load.join()
    models = [s.model for s in shots]
    print(
        f"\nredeploy: answers from b by {times[0]:.1f}s, from a again by {times[1]:.1f}s; replica pids "
        f"{[sorted(p) for p in pids]}; {summary(shots)}; answers by model: a {models.count(ids['a'])}, "
        f"b {models.count(ids['b'])}"
    )
    assert [s for s in shots if s.status != "200"] == []
    assert models[0] == ids["a"] and ids["b"] in models and models[-1] == ids["a"]


def test_serve_deploy_config_switches_checkpoint_in_place(serve_port, checkpoints, photo_jpeg):
    """The declarative path (`serve deploy` / a RayService) with `distcls serve-config`'s config: changing
    the classifier's user_config checkpoint under 4 requests/s reloads the model inside the same two
    replica processes, and no request fails."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from distcls.serving import serve_config

    def config(key: str) -> ServeDeploySchema:
        doc = serve_config(two_replicas(checkpoints["a"], serve_port, name="declarative"))
        app = doc["applications"][0]
        app["route_prefix"] = "/declarative"
        app["deployments"][0]["user_config"]["checkpoint"] = checkpoints[key]
        return ServeDeploySchema(applications=doc["applications"])  # the running proxy's options stay

    ids = {key: read_meta(uri)["weights_sha256"] for key, uri in checkpoints.items()}
    client = _get_global_client()
    DEPLOYED.add("declarative")
    client.deploy_apps(config("a"), _blocking=True)
    url = f"http://127.0.0.1:{serve_port}/declarative/v1/classify"
    first = wait_for(lambda: (p := set(alive_replicas("declarative"))) and len(p) == 2 and p, 120, "2 replicas")
    r = requests.post(url, data=photo_jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200 and r.json()["model"]["id"] == ids["a"], r.text
    load = Load(url, photo_jpeg, clients=4, seconds=600, rate=4).start()
    try:
        time.sleep(5)
        client.deploy_apps(config("b"), _blocking=True)
        wait_for(lambda: load.shots and load.shots[-1].model == ids["b"], 120, "answers from checkpoint b")
        switched_at = load.now()
        time.sleep(5)
    finally:
        load.seconds = 0
        shots = load.join()
    models = [s.model for s in shots]
    print(
        f"\ndeclarative switch a->b by {switched_at:.1f}s, replicas {sorted(first)} -> "
        f"{sorted(alive_replicas('declarative'))}; {summary(shots)}; answers: a {models.count(ids['a'])}, "
        f"b {models.count(ids['b'])}"
    )
    assert [s for s in shots if s.status != "200"] == []
    assert models[0] == ids["a"] and models[-1] == ids["b"]
    assert set(alive_replicas("declarative")) == first  # reloaded in place: the same processes


def test_over_limit_load_gets_quick_503s(serve_port, checkpoints, photo_jpeg):
    """One replica admitting 2 requests at once and queueing 2 more, against 32 clients as fast as they
    can for 10 s: the excess is refused with 503 (never a hang), then a single request succeeds."""
    from distcls.serving import application

    cfg = ServeConfig(
        checkpoint=checkpoints["imagenet"],
        min_replicas=1,
        max_replicas=1,
        cpus_per_replica=0.5,
        port=serve_port,
        max_batch_size=2,
        max_ongoing_requests=2,
        max_queued_requests=2,
    )
    deploy(application(cfg), "tight")
    url = f"http://127.0.0.1:{serve_port}/tight/v1/classify"
    assert requests.post(url, data=photo_jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60).status_code == 200
    shots = Load(url, photo_jpeg, clients=32, seconds=10).start().join()
    print(
        f"\noverload: all {summary(shots)}; 503s: {summary([s for s in shots if s.status == '503'])}; "
        f"200s: {summary([s for s in shots if s.status == '200'])}"
    )
    assert {s.status for s in shots} <= {"200", "503"}, summary(shots)
    kinds = {k: sum(s.kind == k for s in shots if s.status == "503") for k in {s.kind for s in shots}}
    print(f"503 bodies by kind: {kinds}")
    assert {s.kind for s in shots if s.status == "503"} == {"overloaded"}, kinds  # JSON, never Ray's plain text
    refused = [s.seconds for s in shots if s.status == "503"]
    assert len(refused) >= 32 and any(s.status == "200" for s in shots), summary(shots)
    # Generous bound (a fail-fast 503 takes milliseconds); a queue without limit would grow past it.
    assert max(refused) < 15, summary(shots)
    time.sleep(1)
    assert requests.post(url, data=photo_jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60).status_code == 200


def test_a_failing_classifier_is_a_json_500(serve_port):
    """A classifier that raises on every call (a bug, a model that fails): the endpoint answers 500 in the
    documented JSON shape, names no internals, and keeps answering."""
    from ray import serve

    from distcls.serving import Ingress

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class FailingClassifier:
        def classify(self, data: bytes, top_k: int) -> dict:
            raise ValueError("secret internal detail")

        def info(self) -> dict:
            raise ValueError("secret internal detail")

    deploy(
        Ingress.options(name="Ingress", ray_actor_options={"num_cpus": 0}).bind(
            FailingClassifier.bind(), max_request_bytes=1_000_000, max_images=4, default_top_k=5
        ),
        "failing",
    )
    base = f"http://127.0.0.1:{serve_port}/failing"
    for _ in range(2):
        for r in (
            requests.post(f"{base}/v1/classify", data=b"x", headers={"Content-Type": "image/jpeg"}, timeout=60),
            requests.get(f"{base}/v1/model", timeout=60),
        ):
            assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text
            assert r.json()["error"]["kind"] == "internal" and "secret" not in r.text, r.text
    assert requests.get(f"{base}/healthz", timeout=30).json() == {"status": "ok"}

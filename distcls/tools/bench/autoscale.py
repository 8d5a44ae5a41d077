"""`distcls serve` autoscaling, measured on a real Ray Serve deployment. Measured, never asserted.

One application (`distcls.serving.start`, the endpoint's own code) with 1..3 classifier replicas at
fractional CPUs, so that three fit a 2-core machine. Phases: idle (1 replica) -> load (N HTTP clients) ->
cooldown (no requests, until the replicas are back at the minimum) -> scale_to_zero (the same application
with min_replicas 0: wait for 0 replicas, then time a cold and a warm request). Replica counts are read from
Serve's status API every SAMPLE_S; nothing scales but Ray Serve's own autoscaler. Every answer's status code
is counted: a request that is not answered 200 is a failed request.
"""

from __future__ import annotations

import dataclasses
import http.client
import threading
import time
from urllib.parse import urlsplit

from distcls import storage
from distcls.config import ServeConfig, to_dict
from distcls.tools.bench.harness import post_image

APP = "autoscale"
DEPLOYMENT = "ImageClassifier"
SAMPLE_S = 0.5
BASELINE_S = 3.0
REQUEST_TIMEOUT_S = 120.0  # a cold start includes starting a replica process and loading the model
# The run's autoscaling settings. Those that ServeConfig does not have stay at Ray Serve's defaults
# (look_back_period_s 30 s, downscale_to_zero_delay_s = downscale_delay_s) and are reported as such.
# look_back_period_s must stay above Ray Serve's 10 s metrics interval (a FutureWarning, later an error).
SETTINGS = {
    "min_replicas": 1,
    "max_replicas": 3,
    "target_ongoing_requests": 1.0,
    "upscale_delay_s": 2.0,
    "downscale_delay_s": 5.0,
    "look_back_period_s": 15.0,
    "downscale_to_zero_delay_s": 5.0,
}


def autoscale_config(
    checkpoint: str, cpus_per_replica: float, port: int, overrides: dict | None = None
) -> tuple[ServeConfig, list[str]]:
    """The run's ServeConfig (SETTINGS, then `overrides`), and the names of the settings it cannot carry."""
    settings = {**SETTINGS, **(overrides or {})}
    known = {f.name for f in dataclasses.fields(ServeConfig)}
    given = {k: v for k, v in settings.items() if k in known}
    cfg = ServeConfig(checkpoint=checkpoint, port=port, name=APP, cpus_per_replica=cpus_per_replica, **given)
    return cfg, sorted(set(settings) - known)


def replica_states(app: str, deployment: str = DEPLOYMENT) -> dict[str, int]:
    """Replicas of `app`'s `deployment` by state (RUNNING, STARTING, STOPPING, ...), from Serve's status API."""
    from ray import serve

    status = serve.status().applications.get(app)
    overview = status.deployments.get(deployment) if status else None
    return {str(getattr(k, "value", k)): int(v) for k, v in overview.replica_states.items()} if overview else {}


def live(states: dict[str, int]) -> int:
    """Replicas serving or on their way to serve (all but STOPPING and STOPPED ones)."""
    return sum(n for state, n in states.items() if state not in ("STOPPING", "STOPPED"))


class Timeline:
    """(seconds since start, RUNNING replicas, phase), sampled every SAMPLE_S; `live` has the same rows
    with the replicas that are running or starting."""

    def __init__(self, app: str):
        self.app, self.t0, self.rows, self.live = app, time.monotonic(), [], []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sample(self, phase: str, seconds: float, until=None) -> float | None:
        """Sample for `seconds`, or until `until(states)` holds: returns when it held, else None."""
        deadline = time.monotonic() + seconds
        while True:
            states, t = replica_states(self.app), self.now()
            self.rows.append((round(t, 2), states.get("RUNNING", 0), phase))
            self.live.append((round(t, 2), live(states), phase))
            if until is not None and until(states):
                return t
            if time.monotonic() >= deadline:
                return None
            time.sleep(SAMPLE_S)

    def first(self, phase: str, test, start: float, rows: list | None = None) -> float | None:
        """Seconds from `start` to the first sample of `phase` whose replica count passes `test`."""
        return next((round(t - start, 2) for t, n, p in rows or self.rows if p == phase and test(n)), None)


class LoadGenerator:
    """`clients` threads POST the photos in turn over keep-alive connections until stopped; every answer's
    time and status code (or exception name, for a request that got no HTTP answer) is kept."""

    def __init__(self, url: str, photos: list[bytes], clients: int, clock: Timeline):
        self.parts, self.photos, self.clients, self.clock = urlsplit(url), photos, clients, clock
        self.answers: list[tuple[float, str]] = []
        self.lock, self.halt = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.halt.set()
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + 5
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self.threads):
            raise RuntimeError(f"bench autoscale: load clients still waiting after {REQUEST_TIMEOUT_S:.0f}s")

    def _client(self, i: int) -> None:
        conn, k = self._connect(), i
        while not self.halt.is_set():
            body, k = self.photos[k % len(self.photos)], k + self.clients
            code = post_image(conn, self.parts.path, body)
            if not code.isdigit():
                conn = self._connect()
            with self.lock:
                self.answers.append((self.clock.now(), code))
        conn.close()

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.parts.hostname, self.parts.port, timeout=REQUEST_TIMEOUT_S)


def timed_request(url: str, photo: bytes) -> tuple[str, float]:
    """One POST on a new connection: (status code or exception name, seconds)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=REQUEST_TIMEOUT_S)
    started = time.perf_counter()
    code = post_image(conn, parts.path, photo)
    conn.close()
    return code, time.perf_counter() - started


def count(codes: dict[str, int], code: str) -> None:
    codes[code] = codes.get(code, 0) + 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """The load and the bounds of the phases: `idle_seconds` is the longest wait for the replicas to fall
    back to the minimum (and, later, to 0); `stop_at_max` ends the load once max_replicas are running."""

    clients: int
    load_seconds: float
    idle_seconds: float
    stop_at_max: bool = False


def scale_up_and_down(
    url: str, photos: list[bytes], cfg: ServeConfig, plan: Plan, clock: Timeline, codes: dict[str, int]
) -> dict:
    """idle -> load -> cooldown on the running application; replica counts and every answer recorded."""
    low, high = cfg.min_replicas, cfg.max_replicas
    clock.sample("idle", BASELINE_S)
    print(f"autoscale: idle: {clock.rows[-1][1]} replica(s) before the load", flush=True)
    load = LoadGenerator(url, photos, plan.clients, clock)
    load_start = clock.now()
    load.start()
    try:
        clock.sample(
            "load", plan.load_seconds, until=(lambda states: states.get("RUNNING", 0) >= high) if plan.stop_at_max else None
        )
    finally:
        load.stop()
    load_end = clock.now()
    for _, code in load.answers:
        count(codes, code)
    ok = sum(code == "200" for _, code in load.answers)
    seen = max(n for _, n, p in clock.rows if p == "load")
    asked = clock.first("load", lambda n: n > low, load_start, clock.live)
    up = clock.first("load", lambda n: n > low, load_start)
    full = clock.first("load", lambda n: n >= seen, load_start) if seen > low else None
    growth = (
        f"more asked for after {asked}s, first one running after {up}s, {seen} after {full}s" if up is not None else "none added"
    )
    print(
        f"autoscale: load: {plan.clients} clients for {load_end - load_start:.0f}s, {len(load.answers)} requests "
        f"({ok / (load_end - load_start):.1f}/s answered 200), replicas {low} -> {seen} ({growth}), "
        f"{len(load.answers) - ok} failed",
        flush=True,
    )
    down_at = clock.sample("cooldown", plan.idle_seconds, until=lambda states: live(states) <= low)
    down = None if down_at is None else round(down_at - load_end, 2)
    print(
        f"autoscale: cooldown: back to {low} replica(s) {down}s after the load stopped"
        if down is not None
        else f"autoscale: cooldown: gave up, still {clock.rows[-1][1]} replicas {plan.idle_seconds:.0f}s after the load stopped",
        flush=True,
    )
    return {
        "load_start_s": round(load_start, 2),
        "load_end_s": round(load_end, 2),
        "requests": len(load.answers),
        "requests_per_s": ok / (load_end - load_start),
        "answers": load.answers,
        "max_replicas_seen": seen,
        "upscale_started_s": asked,
        "scale_up_s": up,
        "full_scale_up_s": full,
        "scale_down_s": down,
    }


def scale_to_zero(cfg: ServeConfig, photo: bytes, idle_seconds: float, clock: Timeline, codes: dict[str, int]) -> dict:
    """Redeploy with min_replicas 0, wait (bounded) for 0 replicas, then a cold and a warm request."""
    from distcls.serving import start

    since = clock.now()
    clock.sample("scale_to_zero", 0)
    url = start(cfg, token="") + "/v1/classify"  # blocks while Serve redeploys (replicas not sampled meanwhile)
    zero_at = clock.sample("scale_to_zero", idle_seconds, until=lambda states: live(states) == 0)
    out = {
        "redeploy_at_s": round(since, 2),
        "reached_zero": zero_at is not None,
        "zero_after_s": None,
        "cold_start_at_s": None,
        "cold_start_s": None,
        "cold_status": None,
        "warm_request_s": None,
        "warm_status": None,
    }
    if zero_at is None:
        print(
            f"autoscale: scale to zero: gave up, still {clock.rows[-1][1]} replica(s) {clock.now() - since:.0f}s "
            "after the redeploy with min_replicas 0 began",
            flush=True,
        )
        return out
    sent = clock.now()
    cold_code, cold = timed_request(url, photo)
    warm_code, warm = timed_request(url, photo)
    count(codes, cold_code)
    count(codes, warm_code)
    clock.sample("cold_start", 0)
    print(
        f"autoscale: scale to zero: 0 replicas {zero_at - since:.1f}s after the redeploy with min_replicas 0 began; "
        f"first request {cold_code} in {cold:.2f}s (cold start), next {warm_code} in {warm:.3f}s",
        flush=True,
    )
    return {
        **out,
        "zero_after_s": round(zero_at - since, 2),
        "cold_start_at_s": round(sent, 2),
        "cold_start_s": cold,
        "cold_status": cold_code,
        "warm_request_s": warm,
        "warm_status": warm_code,
    }


def plot(result: dict) -> bytes:
    """Replicas over time (load phase shaded, the cold request marked) and requests/s answered 200, one PNG."""
    from distcls.plots import png_bytes, subplots

    fig, ax = subplots(figsize=(10, 4.5))
    for rows, style, label in (
        (result["live_timeline"], ":", "running or starting"),
        (result["timeline"], "-", "running replicas"),
    ):
        ax.step([r[0] for r in rows], [r[1] for r in rows], style, where="post", color="tab:blue", label=label)
    ax.axvline(result["redeploy_at_s"], color="tab:gray", linestyle="--", alpha=0.6, label="redeploy with min_replicas 0")
    if result.get("cold_start_s") is not None:
        ax.axvline(
            result["cold_start_at_s"],
            color="tab:red",
            alpha=0.6,
            label=f"first request at 0 replicas (answered in {result['cold_start_s']:.1f}s)",
        )
    ax.axvspan(result["load_start_s"], result["load_end_s"], color="tab:orange", alpha=0.15, label="load")
    ax.set(
        xlabel="seconds",
        ylabel="classifier replicas",
        ylim=(-0.2, result["settings"]["max_replicas"] + 0.5),
        title=f"distcls serve autoscaling: {result['clients']} clients, failed requests {result['failed_requests']}",
    )
    ok = [a for a, code in result["answers"] if code == "200"]
    if ok:
        seconds = range(int(min(ok)), int(max(ok)) + 1)
        per_s = [sum(1 for a in ok if s <= a < s + 1) for s in seconds]
        twin = ax.twinx()
        twin.plot([s + 0.5 for s in seconds], per_s, color="tab:green", alpha=0.6, label="requests/s (200)")
        twin.set_ylabel("requests/s answered 200")
        twin.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    return png_bytes(fig)


def bench_autoscale(
    root: str,
    *,
    checkpoint: str | None = None,
    clients_high: int = 16,
    load_seconds: float = 40,
    idle_seconds: float = 60,
    cpus_per_replica: float = 0.5,
    out_png: str | None = None,
    port: int | None = None,
    overrides: dict | None = None,
    stop_at_max: bool = False,
) -> dict:
    """Measure scale-up under load, scale-down after it and scale-to-zero with a cold start (module doc).

    `checkpoint`: the model to serve (default: the ImageNet EfficientNet-Lite0 written under `root`);
    `overrides`: ServeConfig fields over SETTINGS; `idle_seconds`, `stop_at_max`: see Plan.
    """
    from distcls.serving import start, stop_app
    from distcls.tools.bench.harness import imagenet_checkpoint, make_photos, wait_healthy
    from distcls.tools.s3server import free_port

    cfg, unsupported = autoscale_config(checkpoint or imagenet_checkpoint(root), cpus_per_replica, port or free_port(), overrides)
    plan = Plan(clients_high, load_seconds, idle_seconds, stop_at_max)
    photos = make_photos(16, seed=3)
    codes: dict[str, int] = {}
    clock = Timeline(cfg.name)
    try:
        url = start(cfg, token="")
        wait_healthy(f"{url}/healthz")
        count(codes, timed_request(f"{url}/v1/classify", photos[0])[0])  # the model answers before we measure
        run = scale_up_and_down(f"{url}/v1/classify", photos, cfg, plan, clock, codes)
        run.update(scale_to_zero(dataclasses.replace(cfg, min_replicas=0), photos[1], idle_seconds, clock, codes))
    finally:
        stop_app(cfg.name)
    result = {
        **run,
        "timeline": clock.rows,
        "live_timeline": clock.live,
        "clients": clients_high,
        "status_codes": codes,
        "failed_requests": sum(n for code, n in codes.items() if code != "200"),
        "scaled_up": run["max_replicas_seen"] > cfg.min_replicas,
        "scaled_down": run["scale_down_s"] is not None,
        "settings": {**to_dict(cfg), "not_in_serve_config": unsupported},
    }
    print(f"autoscale: {result['failed_requests']} failed requests of {sum(codes.values())}: {codes}", flush=True)
    if out_png:
        storage.write_bytes(out_png, plot(result))
    return result

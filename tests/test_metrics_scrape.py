"""The endpoint's Prometheus metrics where operators look: real traffic to a real served application, then
a scrape of Ray's real metrics endpoint (the node's metrics export port, what KubeRay's PodMonitors scrape);
and the Grafana dashboard cluster/grafana/distcls-serve.json queries only metrics and labels in that scrape."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import encode, make_checkpoint

APP = "metrics"
DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "grafana" / "distcls-serve.json"
# What the endpoint exports, with the labels each carries (besides Ray's own: application, deployment,
# replica, node...). Ray Serve's proxy counts every route; distcls's Ingress counts by variant and kind.
EXPECTED = {
    "ray_serve_num_http_requests_total": {"route", "method", "status_code"},
    "ray_serve_num_http_error_requests_total": {"route", "error_code"},
    "ray_serve_http_request_latency_ms_bucket": {"route", "status_code", "le"},
    "ray_distcls_request_latency_ms_bucket": {"status", "variant", "le"},
    "ray_distcls_predictions_total": {"model", "variant"},
    "ray_distcls_errors_total": {"kind", "variant"},
    "ray_serve_actual_batch_size_bucket": {"deployment", "le"},
    "ray_serve_batch_wait_time_ms_bucket": {"deployment", "le"},
    "ray_serve_deployment_processing_latency_ms_bucket": {"deployment", "le"},
    "ray_serve_autoscaling_target_replicas": {"deployment"},
    "ray_serve_deployment_replica_healthy": {"deployment", "replica"},
    "ray_serve_replica_processing_queries": {"deployment", "replica"},
}
# Label values the traffic below must have produced in this application's series.
EXPECTED_VALUES = [
    ("ray_serve_num_http_requests_total", "status_code", {"200", "404", "422", "503"}),
    ("ray_distcls_request_latency_ms_bucket", "status", {"200", "422", "503"}),
    ("ray_distcls_errors_total", "kind", {"not_image", "overloaded"}),  # overloaded: the admission refusal
    ("ray_distcls_predictions_total", "variant", {"main"}),
]


def scrape(port: int) -> dict[str, list[dict]]:
    """Ray's metrics endpoint as {sample name: [labels of each series]}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    samples: dict[str, list[dict]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def ours(samples: dict[str, list[dict]], name: str) -> list[dict]:
    return [labels for labels in samples.get(name, []) if labels.get("application") == APP]


def missing(samples: dict[str, list[dict]], wanted: set[str]) -> list[str]:
    """What this application's series do not show yet: metrics, labels, label values."""
    gaps = [name for name in sorted(wanted) if not ours(samples, name)]
    for name, labels in EXPECTED.items():
        if ours(samples, name) and not labels <= set().union(*ours(samples, name)):
            gaps.append(f"{name} labels {sorted(labels - set().union(*ours(samples, name)))}")
    for name, label, values in EXPECTED_VALUES:
        seen = {series.get(label) for series in ours(samples, name)}
        if not values <= seen:
            gaps.append(f"{name}{{{label}}} {sorted(values - seen)} (seen {sorted(map(str, seen))})")
    return gaps


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    panels = [p for row in doc["panels"] for p in [row, *row.get("panels", [])]]
    queries = [t["expr"] for p in panels for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            queries.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return queries


def metric_names(query: str) -> set[str]:
    return set(re.findall(r"\bray_[a-z0-9_]+\b", query))


def post(url: str, data, ctype: str = "image/png") -> requests.Response:
    return requests.post(url, data=data, headers={"Content-Type": ctype}, timeout=120)


def slow_body(image: bytes, gate: threading.Event):
    """A request body that arrives in two parts: the request holds its admission slot until `gate` opens."""
    yield image[:100]
    gate.wait(60)
    yield image[100:]


def send_traffic(url: str, image: bytes) -> list[int]:
    """200s (one request of two images, which the classifier may batch), a 422, a 404, GET /v1/model, and one
    admission refusal: 4 requests hold the Ingress's 2 running slots and 2 queue places, the 5th gets 503."""
    codes = [post(f"{url}/v1/classify", image).status_code for _ in range(3)]
    files = [("images", (f"{i}.png", image, "image/png")) for i in range(2)]
    codes.append(requests.post(f"{url}/v1/classify", files=files, timeout=120).status_code)
    codes.append(post(f"{url}/v1/classify", b"these are notes, not an image\n" * 10).status_code)
    codes.append(requests.get(f"{url}/nope", timeout=60).status_code)
    codes.append(requests.get(f"{url}/v1/model", timeout=60).status_code)
    gate, held = threading.Event(), []
    threads = [
        threading.Thread(target=lambda: held.append(post(f"{url}/v1/classify", slow_body(image, gate)).status_code))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    time.sleep(5)  # the four are in: two reading their bodies, two waiting for a slot
    codes.append(post(f"{url}/v1/classify", image).status_code)
    gate.set()
    for t in threads:
        t.join()
    return codes + held


@pytest.fixture(scope="module")
def scraped(ray_local, tmp_path_factory):
    """Serve a small checkpoint, send the traffic, and scrape until everything the test and the dashboard
    look for has been exported (Ray's agent exports application metrics every few seconds)."""
    from ray import serve

    from distcls.config import ServeConfig
    from distcls.serving import application
    from distcls.tools.s3server import free_port

    checkpoint = make_checkpoint(str(tmp_path_factory.mktemp("metrics") / "ck"), 3, image_size=32)
    port = free_port()
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    cfg = ServeConfig(
        checkpoint=checkpoint,
        port=port,
        min_replicas=1,
        max_replicas=1,
        cpus_per_replica=0.5,
        max_ongoing_requests=2,
        max_queued_requests=2,
        max_batch_size=2,
        runtime="torch",
    )
    serve.run(application(cfg), name=APP, route_prefix=f"/{APP}", logging_config=quiet)
    rng = np.random.default_rng(0)
    image = encode(Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)), "PNG")
    codes = send_traffic(f"http://127.0.0.1:{port}/{APP}", image)
    (node,) = [n for n in ray_local.nodes() if n["Alive"]]
    wanted = set(EXPECTED) | {name for q in dashboard_queries() for name in metric_names(q)}
    deadline = time.monotonic() + 120
    while True:
        samples = scrape(node["MetricsExportPort"])
        if not missing(samples, wanted) or time.monotonic() > deadline:
            break
        time.sleep(2)
    yield codes, samples, wanted
    serve.delete(APP)
    serve.shutdown()


def test_endpoint_metrics_in_a_real_scrape(scraped):
    codes, samples, wanted = scraped
    assert missing(samples, wanted) == []
    assert sorted(codes) == [200] * 9 + [404, 422, 503], codes


def test_dashboard_queries_name_scraped_metrics_and_labels(scraped):
    """Every query of the dashboard (panels and variables) names at least one metric, only metrics the
    scrape holds, and only labels those metrics carry."""
    _, samples, _ = scraped
    queries = dashboard_queries()
    assert len(queries) >= 10
    for query in queries:
        names = metric_names(query)
        assert names, f"no metric in {query!r}"
        assert {m for m in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", query)} <= names, query
        for name in names:
            assert ours(samples, name), f"{name} (in {query!r}) is not in the scrape"
        labels = set().union(*(series for name in names for series in ours(samples, name)))
        used = set(re.findall(r"\b([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", query))
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", query):
            used |= {label.strip() for label in group.split(",") if label.strip()}
        used |= set(re.findall(r"label_values\([^,]+,\s*([a-z_]+)\)", query))
        assert used <= labels, f"labels {sorted(used - labels)} of {query!r} are not on {sorted(names)}"

"""`distcls serve`: real HTTP against the application running on the session's local Ray instance."""

import base64
import io
import json
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from distcls import storage
from distcls.checkpoint import from_pretrained, read_meta
from distcls.cli import main
from distcls.config import LabelConfig, ServeConfig
from distcls.label import existing_parts, run_labeling
from distcls.serving import application, build_app, serve_config, token_digest
from distcls.tools.s3server import free_port
from tests.conftest import encode, make_checkpoint

BUCKET = "s3://serve-test"
IMAGENET_CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def checkpoints(s3_server):
    """The ImageNet EfficientNet-Lite0 as it is, and a 10-class Lite0 at 64 px (different weights)."""
    imagenet, small = f"{BUCKET}/ck/imagenet", f"{BUCKET}/ck/small"
    storage.ensure_bucket(imagenet)
    from_pretrained(out=imagenet)
    make_checkpoint(small, 10, image_size=64)
    return imagenet, small


@pytest.fixture(scope="module")
def serve_url(ray_local, checkpoints):
    """Serve on a free port with three applications: open (ImageNet), secure (token) and tiny (queues of 1)."""
    from ray import serve

    imagenet, small = checkpoints
    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING", "enable_access_log": False}
    )
    common = dict(min_replicas=1, max_replicas=1, cpus_per_replica=0.5, port=port)
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.run(
        application(ServeConfig(checkpoint=imagenet, max_request_mb=1, **common)),
        name="open",
        route_prefix="/open",
        logging_config=quiet,
    )
    serve.run(
        application(ServeConfig(checkpoint=small, **common), token_sha256=token_digest(TOKEN)),
        name="secure",
        route_prefix="/secure",
        logging_config=quiet,
    )
    serve.run(
        application(ServeConfig(checkpoint=imagenet, max_batch_size=1, max_ongoing_requests=1, max_queued_requests=1, **common)),
        name="tiny",
        route_prefix="/tiny",
        logging_config=quiet,
    )
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def cat_jpeg(photo) -> bytes:
    return encode(Image.fromarray(photo), "JPEG", quality=92)


@pytest.fixture(scope="module")
def astronaut_jpeg() -> bytes:
    from skimage import data

    return encode(Image.fromarray(data.astronaut()), "JPEG", quality=92)


def post_image(url: str, data: bytes, ctype: str = "image/jpeg", **kw) -> requests.Response:
    return requests.post(url, data=data, headers={"Content-Type": ctype, **kw.pop("headers", {})}, timeout=60, **kw)


def test_cat_raw_bytes_and_model_info(serve_url, cat_jpeg, checkpoints):
    r = post_image(f"{serve_url}/open/v1/classify?top_k=3", cat_jpeg)
    assert r.status_code == 200, r.text
    body = r.json()
    meta = read_meta(checkpoints[0])
    assert body["model"] == {"id": meta["weights_sha256"], "architecture": "efficientnet_lite0"}
    (pred,) = body["predictions"]
    assert pred["label"] in IMAGENET_CATS
    assert len(pred["topk"]) == 3 and pred["topk"][0]["label"] == pred["label"]
    scores = [t["score"] for t in pred["topk"]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    info = requests.get(f"{serve_url}/open/v1/model", timeout=30).json()
    assert info["id"] == meta["weights_sha256"] and len(info["class_names"]) == 1000
    assert info["preprocessing"]["image_size"] == 224
    assert info["created"] == meta["created_at"]  # the checkpoint's own timestamp, not null
    assert info["runtime"] == "onnx" and "ONNX" in info["note"]  # the default runtime on a CPU replica


def test_multipart_and_json_keep_order(serve_url, cat_jpeg, astronaut_jpeg):
    single = {}
    for name, data in (("cat", cat_jpeg), ("astronaut", astronaut_jpeg)):
        single[name] = post_image(f"{serve_url}/open/v1/classify", data).json()["predictions"][0]
    assert single["cat"]["label"] != single["astronaut"]["label"]
    files = [
        ("images", ("a.jpg", astronaut_jpeg, "image/jpeg")),
        ("images", ("c.jpg", cat_jpeg, "image/jpeg")),
        ("images", ("a2.jpg", astronaut_jpeg, "image/jpeg")),
    ]
    r = requests.post(f"{serve_url}/open/v1/classify", files=files, data={"top_k": "2"}, timeout=60)
    assert r.status_code == 200, r.text
    labels = [p["label"] for p in r.json()["predictions"]]
    assert labels == [single["astronaut"]["label"], single["cat"]["label"], single["astronaut"]["label"]]
    assert all(len(p["topk"]) == 2 for p in r.json()["predictions"])
    doc = {"images": [{"b64": base64.b64encode(d).decode()} for d in (cat_jpeg, astronaut_jpeg)], "top_k": 4}
    r = requests.post(f"{serve_url}/open/v1/classify", json=doc, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == [single["cat"]["label"], single["astronaut"]["label"]]
    assert len(preds[0]["topk"]) == 4
    assert abs(preds[0]["score"] - single["cat"]["score"]) < 1e-5


@pytest.mark.parametrize(
    "body,ctype,status,kind",
    [
        (b"", "image/jpeg", 422, "empty"),
        (b"hello", "text/plain", 415, "unsupported_media_type"),
        (b"{not json", "application/json", 400, "bad_request"),
        (b'{"images": [{"url": "http://169.254.169.254/"}]}', "application/json", 400, "bad_request"),
        (b'{"images": [{"b64": "@@@"}]}', "application/json", 400, "bad_request"),
        (b'{"images": []}', "application/json", 400, "bad_request"),
    ],
)
def test_bad_requests_are_4xx_json(serve_url, body, ctype, status, kind):
    r = post_image(f"{serve_url}/open/v1/classify", body, ctype)
    assert r.status_code == status, r.text
    assert r.json()["error"]["kind"] == kind and r.json()["error"]["message"]


def test_bad_images_then_good_request(serve_url, bad_images, cat_jpeg):
    for name, (data, kind) in bad_images.items():
        r = post_image(f"{serve_url}/open/v1/classify", data)
        assert r.status_code == 422, (name, r.text)
        assert r.json()["error"]["kind"] == kind, (name, r.json())
    files = [("f", ("cat.jpg", cat_jpeg, "image/jpeg")), ("f", ("bomb.png", bad_images["bomb.png"][0], "image/png"))]
    r = requests.post(f"{serve_url}/open/v1/classify", files=files, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["image"] == 1 and r.json()["error"]["kind"] == "too_large"
    r = post_image(f"{serve_url}/open/v1/classify", cat_jpeg)  # the replica still serves
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in IMAGENET_CATS


def test_body_over_limit_is_413(serve_url, cat_jpeg):
    big = cat_jpeg + os.urandom(1_100_000)  # the open app allows 1 MB
    r = post_image(f"{serve_url}/open/v1/classify", big)
    assert r.status_code == 413 and r.json()["error"]["kind"] == "too_large_body"

    def chunks():  # no Content-Length: the limit holds while streaming
        yield big[:500_000]
        yield big[500_000:]

    r = requests.post(f"{serve_url}/open/v1/classify", data=chunks(), headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 413
    assert post_image(f"{serve_url}/open/v1/classify", cat_jpeg).status_code == 200


def test_token_auth(serve_url, cat_jpeg):
    url = f"{serve_url}/secure/v1/classify"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        r = post_image(url, cat_jpeg, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["kind"] == "unauthorized" and TOKEN not in r.text
    assert requests.get(f"{serve_url}/secure/v1/model", timeout=30).status_code == 401
    # Every /v1 route the app has (not just the ones above): no token and a wrong token of the same length.
    from distcls.serving import api

    def routes(router):  # FastAPI nests the class-based routes Serve registers in included routers
        for route in router.routes:
            inner = getattr(route, "original_router", None)
            yield from routes(inner) if inner is not None else [route]

    v1 = [
        (method, route.path)
        for route in routes(api)
        if getattr(route, "path", "").startswith("/v1")
        for method in sorted(getattr(route, "methods", ()) or ())
    ]
    assert {("GET", "/v1/model"), ("POST", "/v1/classify")} <= set(v1)
    for method, path in v1:
        for headers in ({}, {"Authorization": "Bearer " + "x" * len(TOKEN)}):
            r = requests.request(method, f"{serve_url}/secure{path}", headers=headers, timeout=30)
            assert r.status_code == 401 and TOKEN not in r.text, (method, path, headers)
    r = post_image(url, cat_jpeg, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"].startswith("class")
    health = requests.get(f"{serve_url}/secure/healthz", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok"}  # no model, version or config
    assert TOKEN not in health.text and "sha256" not in health.text
    assert requests.get(f"{serve_url}/secure/", timeout=30).status_code == 200  # the page holds no secrets


def test_overload_answers_503_then_recovers(serve_url, cat_jpeg):
    """24 clients at once against queues of 1: the excess gets 503 in the documented JSON shape (the
    Ingress's own admission, never Ray's plain-text proxy 503), with Retry-After, then it serves again."""
    url = f"{serve_url}/tiny/v1/classify"
    codes: list = []
    refusals: list = []
    lock = threading.Lock()

    def client():
        r = post_image(url, cat_jpeg)
        with lock:
            codes.append(r.status_code)
            if r.status_code == 503:
                refusals.append((r.headers.get("content-type"), r.headers.get("retry-after"), r.text))

    threads = [threading.Thread(target=client) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    for ctype, retry_after, text in refusals:
        assert ctype == "application/json" and retry_after == "1", (ctype, text)
        assert json.loads(text)["error"]["kind"] == "overloaded", text
    time.sleep(1)
    assert post_image(url, cat_jpeg).status_code == 200


@pytest.mark.parametrize(
    "method,path,status,kind",
    [
        ("GET", "/nope", 404, "not_found"),
        ("POST", "/v1/nope", 404, "not_found"),
        ("GET", "/v1/classify", 405, "method_not_allowed"),
        ("DELETE", "/v1/model", 405, "method_not_allowed"),
    ],
)
def test_unknown_paths_and_methods_are_json(serve_url, method, path, status, kind):
    for app in ("open", "secure"):
        r = requests.request(method, f"{serve_url}/{app}{path}", timeout=30)
        assert r.status_code == status and r.headers["content-type"] == "application/json", (app, r.text)
        error = r.json()["error"]
        assert error["kind"] == kind and path in error["message"] and "POST /v1/classify" in error["message"]


def test_same_top_k_as_label(serve_url, cat_jpeg, checkpoints):
    imagenet = checkpoints[0]
    storage.write_bytes(f"{BUCKET}/label-in/cat.jpg", cat_jpeg)
    run_labeling(
        LabelConfig(
            checkpoint=imagenet, input=f"{BUCKET}/label-in", output=f"{BUCKET}/label-out", top_k=5, cpus_per_replica=0.25
        ),
        progress=False,
    )
    import pyarrow.parquet as pq

    (part,) = existing_parts(f"{BUCKET}/label-out")
    row = pq.read_table(io.BytesIO(storage.read_bytes(part))).to_pylist()[0]
    served = post_image(f"{serve_url}/open/v1/classify?top_k=5", cat_jpeg).json()["predictions"][0]
    assert [t["label"] for t in served["topk"]] == row["topk_labels"]
    np.testing.assert_allclose([t["score"] for t in served["topk"]], row["topk_scores"], atol=1e-5)


def test_prometheus_metrics(serve_url, ray_local, cat_jpeg):
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    post_image(f"{serve_url}/open/v1/classify", cat_jpeg)
    post_image(f"{serve_url}/open/v1/classify", b"not an image")
    wanted = ("distcls_predictions", "distcls_errors", "distcls_request_latency_ms_bucket", "serve_num_http_requests")
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    assert any('kind="not_image"' in line for line in text.splitlines() if "distcls_errors" in line)


def test_switch_checkpoint_without_failed_requests(serve_url, checkpoints, cat_jpeg):
    from ray import serve

    imagenet, small = checkpoints
    port = int(serve_url.rsplit(":", 1)[1])
    url = f"{serve_url}/secure/v1/classify"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    seen: list = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            r = post_image(url, cat_jpeg, headers=auth)
            seen.append((r.status_code, r.json().get("model", {}).get("id")))

    t = threading.Thread(target=client)
    t.start()
    time.sleep(2)
    cfg = ServeConfig(checkpoint=imagenet, min_replicas=1, max_replicas=1, cpus_per_replica=0.5, port=port)
    serve.run(
        application(cfg, token_sha256=token_digest(TOKEN)),
        name="secure",
        route_prefix="/secure",
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    new_id = read_meta(imagenet)["weights_sha256"]
    deadline = time.time() + 60
    while time.time() < deadline and not (seen and seen[-1][1] == new_id):
        time.sleep(0.5)
    time.sleep(1)
    stop.set()
    t.join()
    assert all(code == 200 for code, _ in seen), [s for s in seen if s[0] != 200]
    ids = [i for _, i in seen]
    assert ids[0] == read_meta(small)["weights_sha256"] and ids[-1] == new_id


def test_serve_config_is_valid_for_serve_deploy(capsys):
    from ray.serve.schema import ServeDeploySchema

    assert main(["serve-config", "--checkpoint", "s3://models/ck", "--max-replicas", "8", "--num-gpus", "1"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    schema = (
        ServeDeploySchema.model_validate(doc)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(doc)
    )
    (app,) = schema.applications
    assert app.import_path == "distcls.serving:build_app" and app.args["max_replicas"] == 8
    assert doc["http_options"]["host"] == "127.0.0.1"
    assert serve_config(ServeConfig(checkpoint="x", host="0.0.0.0"))["http_options"]["host"] == "0.0.0.0"
    # the import path builds an application from exactly those args
    built = build_app(app.args)
    assert type(built).__name__ == "Application"


def test_serve_rejects_bad_config_and_checkpoint(tmp_path, capsys):
    def error_lines() -> list[str]:  # Ray's own log lines from other replicas may share stderr
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("distcls: error:")]

    assert main(["serve", "--checkpoint", str(tmp_path / "missing"), "--port", "8123"]) == 2
    (err,) = error_lines()
    assert "missing" in err
    assert main(["serve", "--checkpoint", "x", "--min-replicas", "3", "--max-replicas", "2"]) == 2
    (err,) = error_lines()
    assert "--max-replicas" in err


def test_page_in_headless_chromium(serve_url, tmp_path, cat_jpeg):
    """The page at / used as a person would: pick the cat photo, see its label as the top bar."""
    if os.environ.get("DISTCLS_SKIP_BROWSER") == "1":
        pytest.skip("DISTCLS_SKIP_BROWSER=1")
    driver_path = shutil.which("chromedriver")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert driver_path and browser, "install Debian's chromium and chromium-driver (.ci/run does)"
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.get(f"{serve_url}/open/")
        WebDriverWait(driver, 30).until(lambda d: "efficientnet_lite0" in d.find_element(By.ID, "model").text)
        photo = tmp_path / "cat.jpg"
        photo.write_bytes(cat_jpeg)
        driver.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, "top-label"))
        label = driver.find_element(By.ID, "top-label").text
        assert any(cat in label for cat in IMAGENET_CATS), label
        assert len(driver.find_elements(By.CSS_SELECTOR, "#result .bar")) == 5
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()


def test_requests_reach_the_ingress_through_rays_haproxy(serve_url, cat_jpeg):
    """A local instance runs Serve's throughput-optimized mode (runtime.SERVE_DEFAULTS): Ray's HAProxy holds the
    HTTP port and each Ingress replica its own direct-ingress port; no request goes through Ray's Python proxy."""
    from ray.util.state import list_actors

    assert post_image(f"{serve_url}/open/v1/classify", cat_jpeg).status_code == 200
    alive = {a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)}
    assert "HAProxyManager" in alive, alive
    port = int(serve_url.rsplit(":", 1)[1])
    listeners = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    # 0A: LISTEN; the port is HAProxy's, bound to loopback only (the --host asked for), as are the replicas'.
    mine = [f for f in listeners if f[3] == "0A" and int(f[1].split(":")[1], 16) == port]
    assert mine and all(f[1].split(":")[0] == "0100007F" for f in mine), mine
    direct = [f for f in listeners if f[3] == "0A" and 30000 <= int(f[1].split(":")[1], 16) < 31000]
    assert direct and all(f[1].split(":")[0] == "0100007F" for f in direct), direct


def test_local_serve_defaults_keep_the_users_values(monkeypatch):
    from distcls.runtime import SERVE_DEFAULTS, local_serve_defaults

    for key in (*SERVE_DEFAULTS, "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    local_serve_defaults()
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0" and os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert 0 < int(os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]) < 65536

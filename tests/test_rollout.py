"""Variants, shadows and live rollout changes of `distcls serve`: the routing rule on its own (2,000 draws), then
real HTTP against one application on the session's local Ray (a primary, an A/B variant and a shadow that is
the primary's own checkpoint), with the comparison checked against offline predictions of the same images."""

import collections
import io
import os
import random
import threading
import time
import urllib.request

import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from distcls import DistclsError, storage
from distcls.cli import main
from distcls.config import ConfigError, ServeConfig, load_config
from distcls.config.serve import parse_weights
from distcls.serving import application, token_digest
from distcls.serving.app import check_variants, config_args, serve_config
from distcls.serving.http import RequestError
from distcls.serving.variants import check_weights, pick_variant
from distcls.tools.s3server import free_port
from tests.conftest import encode, make_checkpoint

BUCKET = "s3://rollout-test"
ADMIN = "admin-token-0123456789"
QUIET = {"log_level": "WARNING", "enable_access_log": False}


# --- the routing rule and the weights, without Ray ----------------------------------------------------------


def test_weights_parse_and_refuse():
    assert parse_weights("main=90,new=10", ["main", "new"]) == {"main": 90.0, "new": 10.0}
    assert parse_weights("new=5", ["main", "new", "x"]) == {"main": 95.0, "new": 5.0, "x": 0.0}  # main takes the rest
    assert parse_weights("main=1,new=1", ["main", "new"]) == {"main": 1.0, "new": 1.0}
    for bad, says in (
        ("main=0,new=0", "sum to 0"),
        ("new=120", "over 100"),
        ("old=10", r"unknown variant\(s\) old"),
        ("new=-1", ">= 0"),
        ("new=ten", "not a number"),
        ("new", "NAME=VALUE"),
    ):
        with pytest.raises(ConfigError, match=says):
            parse_weights(bad, ["main", "new"])
    with pytest.raises(ValueError, match="unknown variant"):
        check_weights({"main": 1, "zzz": 1}, ["main", "new"])
    with pytest.raises(ValueError, match="sum to 0"):
        check_weights({"main": 0}, ["main", "new"])


def test_pick_is_within_3_points_at_90_10_and_sticky():
    weights = {"main": 90.0, "new": 10.0}
    rng = random.Random(7)
    picks = collections.Counter(pick_variant(weights, rng=rng) for _ in range(2000))
    assert abs(picks["new"] / 2000 - 0.10) < 0.03, picks
    keyed = collections.Counter(pick_variant(weights, key=f"user-{i}") for i in range(2000))
    assert abs(keyed["new"] / 2000 - 0.10) < 0.03, keyed
    for i in range(200):  # the same key, the same variant, whatever the draws in between
        first = pick_variant(weights, key=f"user-{i}")
        assert all(pick_variant(weights, key=f"user-{i}", rng=rng) == first for _ in range(3))
    assert pick_variant(weights, forced="new") == "new"
    assert {pick_variant({"main": 0.0, "new": 1.0}, rng=rng) for _ in range(100)} == {"new"}
    with pytest.raises(RequestError) as err:
        pick_variant(weights, forced="nope")
    assert err.value.status == 400 and err.value.kind == "unknown_variant" and "main, new" in err.value.message


def test_config_variants_flags_yaml_and_serve_config_agree(tmp_path):
    flags = ServeConfig(checkpoint="s3://b/a", variant=("new=s3://b/b",), weights="main=90,new=10", shadow=("sh=s3://b/c",))
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text(
        "checkpoint: s3://b/a\nvariants:\n- {name: new, checkpoint: s3://b/b, weight: 10, max_replicas: 2}\n"
        "- {name: sh, checkpoint: s3://b/c, shadow: true}\n"
    )
    from_yaml = load_config(ServeConfig, str(yaml_file))
    assert from_yaml.initial_weights() == flags.initial_weights() == {"main": 90.0, "new": 10.0}
    assert [(s.name, s.shadow) for s in from_yaml.variant_specs()] == [("main", False), ("new", False), ("sh", True)]
    assert from_yaml.variant_specs()[1].max_replicas == 2
    doc = serve_config(flags)["applications"][0]
    rebuilt = load_config(ServeConfig, overrides=doc["args"])  # what build_app reads on the cluster
    assert rebuilt.variant_specs() == flags.variant_specs() and config_args(rebuilt) == doc["args"]
    names = [d["name"] for d in doc["deployments"]]
    assert names == ["ImageClassifier", "ImageClassifier-new", "ImageClassifier-sh", "Ingress"]
    assert doc["deployments"][-1]["user_config"] == {"weights": {"main": 90.0, "new": 10.0}, "shadow_fraction": 1.0}
    for kw, says in (
        ({"variant": ("main=s3://x",)}, "given twice"),
        ({"variant": ("Big=s3://x",)}, "lowercase"),
        ({"shadow": ("s=s3://x",), "weights": "s=10"}, "unknown variant"),
        ({"variants": ({"name": "v", "checkpoint": "s3://x", "colour": 1},)}, "unknown key"),
    ):
        with pytest.raises(ConfigError, match=says):
            ServeConfig(checkpoint="s3://b/a", **kw)


def test_repeatable_flags_parse(capsys):
    from distcls.cli import build_parser
    from distcls.config import config_from_args

    args = build_parser().parse_args(
        ["serve", "--checkpoint", "a", "--variant", "v1=b", "--variant", "v2=c", "--weights", "v1=5,v2=5", "--shadow", "s=d"]
    )
    cfg = config_from_args(ServeConfig, args)
    assert [(s.name, s.weight) for s in cfg.variant_specs()] == [("main", 90.0), ("v1", 5.0), ("v2", 5.0), ("s", 0.0)]


# --- one application over real HTTP -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(s3_server) -> dict[str, str]:
    """Two 10-class checkpoints of the same classes (different heads) and one of 5 classes."""
    uris = {k: f"{BUCKET}/ck/{k}" for k in ("a", "b", "five")}
    make_checkpoint(uris["a"], 10, image_size=32, seed=0)
    make_checkpoint(uris["b"], 10, image_size=32, seed=1)
    make_checkpoint(uris["five"], 5, image_size=32, seed=2)
    return uris


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Real photos, cut into different crops so that the predictions vary."""
    from skimage import data

    out = []
    for photo in (data.chelsea(), data.astronaut(), data.coffee(), data.rocket()):
        h, w = photo.shape[:2]
        for k in range(4):
            crop = photo[(k * h) // 8 : h - (k * h) // 16, (k * w) // 10 : w - (k * w) // 20]
            out.append(encode(Image.fromarray(crop).resize((64, 64)), "PNG"))
    return out


@pytest.fixture(scope="module")
def app_url(ray_local, checkpoints):
    """`main` (a) at weight 90, `new` (b) at 10, and the shadow `same` (a again: it must agree 100%)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
    cfg = ServeConfig(
        checkpoint=checkpoints["a"],
        variant=(f"new={checkpoints['b']}",),
        shadow=(f"same={checkpoints['a']}",),
        weights="main=90,new=10",
        min_replicas=1,
        max_replicas=1,
        cpus_per_replica=0.5,
        runtime="torch",
        port=port,
        rollout_log=f"{BUCKET}/rollout-log",
    )
    serve.run(application(cfg, admin_sha256=token_digest(ADMIN)), name="ab", route_prefix="/ab", logging_config=QUIET)
    yield f"http://127.0.0.1:{port}/ab"
    serve.shutdown()


def classify(url: str, data: bytes, **headers) -> requests.Response:
    return requests.post(f"{url}/v1/classify", data=data, headers={"Content-Type": "image/png", **headers}, timeout=60)


def send_many(url: str, bodies: list[bytes], clients: int = 8, **headers) -> list[requests.Response]:
    out: list = [None] * len(bodies)

    def client(i: int) -> None:
        with requests.Session() as s:
            for k in range(i, len(bodies), clients):
                out[k] = s.post(
                    f"{url}/v1/classify", data=bodies[k], headers={"Content-Type": "image/png", **headers}, timeout=60
                )

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_split_over_http_names_the_variant_and_keys_stick(app_url, images):
    responses = send_many(app_url, [images[i % len(images)] for i in range(200)])
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:3]
    assert all(r.json()["variant"] == r.headers["X-Distcls-Variant"] for r in responses)
    shares = collections.Counter(r.json()["variant"] for r in responses)
    assert set(shares) == {"main", "new"} and 4 <= shares["new"] <= 40, shares  # 20 expected; 4.7 sigma either side
    for key in ("alice", "bob", "carol"):
        seen = {classify(app_url, images[0], **{"X-Distcls-Key": key}).headers["X-Distcls-Variant"] for _ in range(4)}
        assert len(seen) == 1, (key, seen)
    forced = classify(app_url, images[0], **{"X-Distcls-Variant": "new"})
    assert forced.status_code == 200 and forced.json()["variant"] == "new"
    info = requests.get(f"{app_url}/v1/model", headers={"X-Distcls-Variant": "new"}, timeout=30).json()
    assert info["variant"] == "new" and info["id"] == forced.json()["model"]["id"]
    unknown = classify(app_url, images[0], **{"X-Distcls-Variant": "same"})  # a shadow never answers
    assert unknown.status_code == 400 and unknown.json()["error"]["kind"] == "unknown_variant", unknown.text
    bad = classify(app_url, b"not an image", **{"X-Distcls-Variant": "new"})
    assert bad.status_code == 422 and bad.headers["X-Distcls-Variant"] == "new" and bad.json()["variant"] == "new"


def offline_labels(uri: str, images: list[bytes]) -> dict[str, str]:
    """sha256 of each image -> the label the checkpoint gives it offline (the Python API, same preprocessing)."""
    import hashlib

    from distcls.infer.api import load_model

    model = load_model(uri, "torch", device="cpu")
    return {hashlib.sha256(b).hexdigest(): p["label"] for b, p in zip(images, model.classify(images, top_k=1))}


def test_comparison_matches_offline_predictions(app_url, images, checkpoints):
    send_many(app_url, images * 2, clients=4)
    send_many(app_url, images, clients=4, **{"X-Distcls-Variant": "new"})  # every image answered by `new`
    deadline, status = time.time() + 30, {}
    while time.time() < deadline:
        status = requests.get(f"{app_url}/v1/rollout", timeout=30).json()
        if status["comparison"]["new"]["images"] >= len(images) and status["comparison"]["same"]["images"] >= len(images):
            break
        time.sleep(0.5)
    same, new = status["comparison"]["same"], status["comparison"]["new"]
    assert same["agreement"] == 1.0 and same["mean_score_delta"] == 0 and same["top_disagreements"] == [], same
    assert status["variants"]["same"]["role"] == "shadow" and status["variants"]["same"]["requests"] > 0
    main_stats = status["variants"]["main"]
    assert main_stats["requests"] > 0 and main_stats["p50_ms"] <= main_stats["p99_ms"] and 0 < main_stats["mean_score"] <= 1
    assert sum(main_stats["labels"].values()) == main_stats["images"]
    a, b = offline_labels(checkpoints["a"], images), offline_labels(checkpoints["b"], images)
    # The rollout log: every mirrored pair, its labels exactly the offline ones for that image. The recorder
    # writes every LOG_SECONDS: until its first file the folder does not exist.
    deadline, pairs = time.time() + 20, []
    while time.time() < deadline and not pairs:
        log = f"{BUCKET}/rollout-log"
        files = storage.list_files(log, [".parquet"]) if storage.exists(log) else []
        pairs = [r for f in files for r in pq.read_table(io.BytesIO(storage.read_bytes(f))).to_pylist() if r["variant"] == "new"]
        time.sleep(1)
    assert pairs
    for r in pairs:
        assert (r["primary_label"], r["variant_label"]) == (a[r["image_sha256"]], b[r["image_sha256"]]), r
    offline = sum(a[r["image_sha256"]] == b[r["image_sha256"]] for r in pairs) / len(pairs)
    logged = sum(r["agree"] for r in pairs) / len(pairs)
    assert logged == offline and 0 <= new["agreement"] <= 1
    print(f"agreement new vs main: live {new['agreement']} over {new['images']} images, logged {logged:.4f} = offline")


def test_live_weight_change_under_load_fails_no_request(app_url, images, monkeypatch, capsys):
    """16 clients throughout; `distcls rollout set` to 50/50, then 0/100: no failed request, and the shares follow."""
    shots: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def client(i: int) -> None:
        with requests.Session() as s:
            k = i
            while not stop.is_set():
                r = s.post(
                    f"{app_url}/v1/classify", data=images[k % len(images)], headers={"Content-Type": "image/png"}, timeout=60
                )
                shots.append((time.monotonic(), r.status_code, r.headers.get("X-Distcls-Variant", "")))
                k += 16

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    monkeypatch.setenv("DISTCLS_ADMIN_TOKEN", ADMIN)
    try:
        time.sleep(2)
        assert main(["rollout", "set", "--url", app_url, "--weights", "main=50,new=50"]) == 0
        half = time.monotonic()
        time.sleep(4)
        assert main(["rollout", "set", "--url", app_url, "--weights", "main=0,new=100"]) == 0
        full = time.monotonic()
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    out = capsys.readouterr().out
    assert "in effect" in out and "imperative" in out, out
    failed = [s for s in shots if s[1] != 200]
    assert not failed and len(shots) > 50, (failed[:5], len(shots))
    at_half = collections.Counter(v for t, _, v in shots if half < t < full)
    assert at_half["new"] > 0.25 * sum(at_half.values()), at_half
    assert {v for t, _, v in shots if t > full + 0.5} == {"new"}
    assert main(["rollout", "status", "--url", app_url]) == 0
    table = capsys.readouterr().out
    assert "vs main" in table and "same" in table and "new" in table, table
    assert main(["rollout", "set", "--url", app_url, "--weights", "main=90,new=10"]) == 0  # as the fixture had it


def test_admin_route_takes_its_own_token_only(app_url):
    body = {"weights": "main=10,new=90"}
    for auth in (None, "Bearer wrong", "Bearer " + "x" * 10):
        headers = {"Authorization": auth} if auth else {}
        r = requests.post(f"{app_url}/admin/rollout", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized", r.text
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for bad in ({"weights": "main=0,new=0"}, {"weights": "old=5"}, {"weights": {"new": -1}}, {"nothing": 1}):
        r = requests.post(f"{app_url}/admin/rollout", json=bad, headers=admin, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["kind"] == "bad_request", r.text
    assert requests.get(f"{app_url}/v1/rollout", timeout=30).json()["weights"] == {"main": 90.0, "new": 10.0}


def test_prometheus_metrics_carry_the_variant(app_url, ray_local, images):
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    classify(app_url, images[0], **{"X-Distcls-Variant": "new"})  # mirrored to main
    classify(app_url, images[0], **{"X-Distcls-Variant": "main"})  # mirrored to the shadow `same`
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        lines = [x for x in text.splitlines() if not x.startswith("#") and ("_predictions" in x or "_mirrored" in x)]
        if any('variant="new"' in line for line in lines) and any('variant="same"' in line for line in lines):
            break
        time.sleep(2)
    assert any('variant="new"' in line and "distcls_predictions" in line for line in lines), lines
    assert any('variant="same"' in line and 'outcome="agree"' in line for line in lines), lines


def test_bad_variants_refused_before_starting(checkpoints, capsys):
    five = ServeConfig(checkpoint=checkpoints["a"], variant=(f"five={checkpoints['five']}",))
    with pytest.raises(DistclsError, match="other class names than main"):
        check_variants(five)
    check_variants(
        ServeConfig(checkpoint=checkpoints["a"], shadow=(f"five={checkpoints['five']}",), allow_different_classes=True)
    )
    missing = f"{BUCKET}/ck/missing"
    code = main(["serve", "--checkpoint", checkpoints["a"], "--variant", f"gone={missing}", "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 2 and "variant gone" in err and len(err.strip().splitlines()) == 1, err
    assert not os.environ.get("DISTCLS_ADMIN_TOKEN")


@pytest.mark.slow  # ~60 s: a second application, deployed from its config as `serve deploy` does
def test_declarative_app_gets_new_weights_through_its_config(app_url, checkpoints, images):
    """An application from a config (`serve deploy`, a RayService): POST /admin/rollout applies the config again
    with the Ingress's new user_config, so the controller's config (`serve config`) shows the new weights."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    port = int(app_url.rsplit(":", 1)[1].split("/")[0])
    cfg = ServeConfig(
        checkpoint=checkpoints["a"],
        variant=(f"new={checkpoints['b']}",),
        weights="main=90,new=10",
        min_replicas=1,
        max_replicas=1,
        cpus_per_replica=0.5,
        runtime="torch",
        port=port,
        name="decl",
    )
    doc = serve_config(cfg)
    app = doc["applications"][0]
    app["route_prefix"] = "/decl"
    app["runtime_env"] = {"env_vars": {"DISTCLS_ADMIN_TOKEN": ADMIN}}  # where build_app reads it (a Secret on k8s)
    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema(applications=doc["applications"]), _blocking=True)
    try:
        url = f"http://127.0.0.1:{port}/decl"
        r = requests.post(
            f"{url}/admin/rollout", json={"weights": "main=0,new=100"}, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
        )
        assert r.status_code == 200 and r.json()["applied"] == "declarative" and r.json()["in_effect"], r.text
        configs = client._controller.get_app_configs.remote()
        import ray

        ingress = next(d for d in ray.get(configs)["decl"].deployments if d.name == "Ingress")
        assert ingress.user_config["weights"] == {"main": 0.0, "new": 100.0}
        assert {classify(url, images[0]).headers["X-Distcls-Variant"] for _ in range(10)} == {"new"}
    finally:
        serve.delete("decl")

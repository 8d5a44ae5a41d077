"""`distcls serve --models PREFIX`: every checkpoint under a prefix behind one endpoint, at most N per classifier
replica (serve.multiplexed, LRU), routed by path (/v1 and /v2) or by Ray Serve's serve_multiplexed_model_id header."""

import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from distcls.config import ConfigError, ServeConfig
from distcls.serving import application
from distcls.tools.s3server import free_port
from tests.conftest import encode, make_checkpoint

MODELS = {f"m{i}": [f"m{i}-{c}" for c in ("ant", "bee", "cow")] for i in range(5)}


@pytest.fixture(scope="module")
def endpoint(ray_local, tmp_path_factory):
    """Five checkpoints (distinct class names) under one prefix, served by one replica holding at most 2."""
    from ray import serve

    prefix = tmp_path_factory.mktemp("models")
    for i, (name, classes) in enumerate(MODELS.items()):
        make_checkpoint(str(prefix / name), classes, image_size=32, seed=i)
    (prefix / "notes").mkdir()  # a folder without distcls.json is no model
    port = free_port()
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.shutdown()  # an earlier module's Serve (another port) would keep its proxy: start ours on `port`
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    cfg = ServeConfig(
        models=str(prefix),
        max_models_per_replica=2,
        min_replicas=1,
        max_replicas=1,
        cpus_per_replica=0.5,
        port=port,
        runtime="torch",
    )  # torch: a model loads without an ONNX export, and this test loads seven
    serve.run(application(cfg), name="many", route_prefix="/many", logging_config=quiet)
    yield f"http://127.0.0.1:{port}/many", prefix
    serve.shutdown()


@pytest.fixture(scope="module")
def jpeg(photo) -> bytes:
    return encode(Image.fromarray(photo), "JPEG", quality=90)


def classify(url: str, data: bytes, model: str | None = None, **headers) -> requests.Response:
    path = f"/v1/models/{model}/classify" if model else "/v1/classify"
    return requests.post(url + path, data=data, headers={"Content-Type": "image/jpeg", **headers}, timeout=120)


def test_every_answer_comes_from_its_model_and_the_lru_evicts(endpoint, jpeg):
    url, _ = endpoint
    listing = requests.get(f"{url}/v1/models", timeout=60).json()
    assert [m["id"] for m in listing["models"]] == list(MODELS) and listing["multiplexed"]
    order = ["m0", "m1", "m0", "m2", "m3", "m4", "m1", "m4"]  # with 2 slots: every new id after the second evicts one
    for model in order:
        r = classify(url, jpeg, model)
        assert r.status_code == 200, r.text
        assert all(t["label"] in MODELS[model] for t in r.json()["predictions"][0]["topk"]), (model, r.json())
    by_header = classify(url, jpeg, serve_multiplexed_model_id="m3")
    assert by_header.status_code == 200 and by_header.json()["predictions"][0]["label"] in MODELS["m3"]
    replica = requests.get(f"{url}/v1/models", timeout=60).json()["replica"]
    # LRU of 2: m0 m1 | m0 held | m2 evicts m1, m3 m0, m4 m2, m1 m3 | m4 held | m3 evicts m1: 7 loads, 5 evictions
    assert replica["loads"] == 7 and replica["evictions"] == 5, replica
    assert sorted(replica["loaded"]) == ["m3", "m4"]


def test_v2_infer_by_model_id(endpoint, jpeg):
    import tritonclient.http as tritonclient_http

    url, _ = endpoint
    client = tritonclient_http.InferenceServerClient(url=url.removeprefix("http://"))
    assert client.is_model_ready("m2") and not client.is_model_ready("nope")
    tensor = tritonclient_http.InferInput("images", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([jpeg, jpeg], dtype=np.object_), binary_data=True)
    labels = client.infer("m2", [tensor]).as_numpy("labels")
    assert [v.decode() in MODELS["m2"] for v in labels] == [True, True]


def test_missing_ids_are_json_404_and_new_checkpoints_are_found(endpoint, jpeg):
    url, prefix = endpoint
    missing = classify(url, jpeg, "m9")
    assert missing.status_code == 404 and missing.json()["error"]["kind"] == "model_not_found"
    assert "m0, m1, m2, m3, m4" in missing.json()["error"]["message"]
    assert classify(url, jpeg, "..").status_code in (400, 404)  # never a path
    unnamed = classify(url, jpeg)
    assert unnamed.status_code == 400 and unnamed.json()["error"]["kind"] == "model_required"
    shutil.copytree(prefix / "m0", prefix / "m9")  # listed again for an id it does not know
    found = classify(url, jpeg, "m9")
    assert found.status_code == 200 and found.json()["predictions"][0]["label"] in MODELS["m0"]


def test_models_and_checkpoint_are_exclusive():
    with pytest.raises(ConfigError, match="one of --checkpoint"):
        ServeConfig(checkpoint="ck", models="prefix")
    with pytest.raises(ConfigError, match="one of --checkpoint"):
        ServeConfig()
    with pytest.raises(ConfigError, match="variants and shadows need --checkpoint"):
        ServeConfig(models="prefix", variant=("new=ck2",))

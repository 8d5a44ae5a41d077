"""The Open Inference Protocol (KServe V2 REST) of `distcls serve`, spoken by Triton's own client (tritonclient from
PyPI): nothing here writes a /v2 request by hand."""

import base64

import numpy as np
import pytest
import requests
from PIL import Image

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from distcls.config import ServeConfig  # noqa: E402
from distcls.serving import application, token_digest  # noqa: E402
from distcls.tools.s3server import free_port  # noqa: E402
from tests.conftest import encode, make_checkpoint  # noqa: E402

TOKEN = "v2-token-0123456789"
NAME = "shapes"
CLASSES = ["circle", "square", "triangle", "star"]


def auth() -> dict:
    """A fresh header dict each call: tritonclient adds its own headers to the dict it is given."""
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def endpoint(ray_local, tmp_path_factory):
    """One application with a token, served as NAME, at /oip; yields (tritonclient's url, the HTTP base URL)."""
    from ray import serve

    checkpoint = make_checkpoint(str(tmp_path_factory.mktemp("v2") / "ck"), CLASSES, image_size=32, seed=3)
    port = free_port()
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.shutdown()  # an earlier module's Serve (another port) would keep its proxy: start ours on `port`
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    cfg = ServeConfig(checkpoint=checkpoint, name=NAME, min_replicas=1, max_replicas=1, cpus_per_replica=0.5, port=port, top_k=3)
    serve.run(application(cfg, token_sha256=token_digest(TOKEN)), name="oip", route_prefix="/oip", logging_config=quiet)
    yield f"127.0.0.1:{port}/oip", f"http://127.0.0.1:{port}/oip"
    serve.shutdown()


@pytest.fixture(scope="module")
def jpegs(photo) -> list[bytes]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8))
    return [encode(Image.fromarray(photo), "JPEG", quality=90), encode(noise, "PNG"), encode(Image.fromarray(photo[::2]), "JPEG")]


def images_input(images: list, binary: bool):
    tensor = tritonclient_http.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
    return tensor


def test_health_metadata_and_readiness(endpoint):
    client = tritonclient_http.InferenceServerClient(url=endpoint[0])
    assert client.is_server_live() and client.is_server_ready()  # no token, as /healthz
    assert client.is_model_ready(NAME, headers=auth())
    assert not client.is_model_ready("another-model", headers=auth())
    meta = client.get_model_metadata(NAME, headers=auth())
    assert meta["name"] == NAME and len(meta["versions"]) == 1
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "labels": "BYTES",
        "scores": "FP32",
        "topk_labels": "BYTES",
        "topk_scores": "FP32",
    }
    assert client.get_server_metadata(headers=auth())["extensions"] == ["binary_tensor_data"]
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("another-model", headers=auth())
    assert missing.value.status() == "404" and "serves 'shapes'" in missing.value.message()


def test_infer_a_batch_binary_and_json_agrees_with_v1(endpoint, jpegs):
    client = tritonclient_http.InferenceServerClient(url=endpoint[0])
    result = client.infer(NAME, [images_input(jpegs, binary=True)], headers=auth(), parameters={"top_k": 2})
    labels = [v.decode() for v in result.as_numpy("labels")]
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32 and scores.shape == (3,)
    assert result.as_numpy("topk_labels").shape == (3, 2) and result.as_numpy("topk_scores").shape == (3, 2)
    assert set(labels) <= set(CLASSES)
    v1 = [
        requests.post(f"{endpoint[1]}/v1/classify", data=j, headers={**auth(), "Content-Type": "image/jpeg"}, timeout=60).json()
        for j in jpegs
    ]
    assert labels == [r["predictions"][0]["label"] for r in v1]
    np.testing.assert_allclose(scores, [r["predictions"][0]["score"] for r in v1], rtol=1e-5)
    # JSON tensors (images base64-encoded, outputs asked for in JSON): the same answers
    b64 = [base64.b64encode(j).decode() for j in jpegs]
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=False) for n in ("labels", "scores")]
    as_json = client.infer(NAME, [images_input(b64, binary=False)], outputs=outputs, headers=auth(), request_id="r1")
    assert [str(v) for v in as_json.as_numpy("labels")] == labels
    np.testing.assert_allclose(as_json.as_numpy("scores"), scores, rtol=1e-5)
    assert as_json.get_response()["id"] == "r1" and as_json.as_numpy("topk_labels") is None


def test_auth_bad_image_and_limits_are_protocol_errors(endpoint, jpegs):
    client = tritonclient_http.InferenceServerClient(url=endpoint[0])
    with pytest.raises(InferenceServerException) as unauthorized:
        client.infer(NAME, [images_input(jpegs[:1], binary=True)], headers={"Authorization": "Bearer wrong"})
    assert unauthorized.value.status() == "401" and "DISTCLS_API_TOKEN" in unauthorized.value.message()
    with pytest.raises(InferenceServerException) as bad_image:
        client.infer(NAME, [images_input([jpegs[0], b"not an image at all"], binary=True)], headers=auth())
    assert bad_image.value.status() == "422" and bad_image.value.message().startswith("image 1 of 2:")
    with pytest.raises(InferenceServerException) as too_many:
        client.infer(NAME, [images_input([jpegs[1]] * 65, binary=True)], headers=auth())
    assert too_many.value.status() == "413" and "--max-images-per-request" in too_many.value.message()
    wrong = tritonclient_http.InferInput("pixels", [1], "BYTES")
    wrong.set_data_from_numpy(np.array([jpegs[0]], dtype=np.object_), binary_data=True)
    with pytest.raises(InferenceServerException) as wrong_input:
        client.infer(NAME, [wrong], headers=auth())
    assert wrong_input.value.status() == "400" and "'images'" in wrong_input.value.message()
    # the endpoint still answers, and says where its time went
    assert client.infer(NAME, [images_input(jpegs[:1], binary=True)], headers=auth()).as_numpy("labels").shape == (1,)
    v1 = requests.post(f"{endpoint[1]}/v1/classify", data=jpegs[0], headers={**auth(), "Content-Type": "image/jpeg"}, timeout=60)
    timing = v1.headers["Server-Timing"]
    assert [part.split(";")[0] for part in timing.split(", ")] == ["ingress", "hop", "decode", "wait", "forward", "classifier"]

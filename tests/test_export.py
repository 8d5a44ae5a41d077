"""`distcls export`: ONNX / TorchScript (and ONNX int8) round trips on real photos, and the exports
running in `distcls label` and `distcls serve` in place of the PyTorch checkpoint."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import torch
from PIL import Image

from distcls import DistclsError, storage
from distcls.checkpoint import from_pretrained, load_checkpoint, read_meta
from distcls.cli import main
from distcls.config import ConfigError, ExportConfig, LabelConfig, ServeConfig
from distcls.export import read_sample, sample_paths
from distcls.infer import load_model, verify_model
from distcls.label import existing_parts, run_labeling
from distcls.transforms import PreprocessSpec
from tests.conftest import encode

pytest.importorskip("onnxruntime")
BUCKET = "s3://export-test"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "clock", "hubble_deep_field")


@pytest.fixture(scope="module")
def photos(s3_server) -> str:
    """Real photos shipped by scikit-image, as JPEGs in the S3 server (also the label job's input)."""
    from skimage import data

    prefix = f"{BUCKET}/photos"
    storage.ensure_bucket(prefix)
    for name in PHOTOS:
        img = getattr(data, name)()
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        storage.write_bytes(f"{prefix}/{name}.jpg", encode(Image.fromarray(img), "JPEG", quality=92))
    return prefix


@pytest.fixture(scope="module")
def imagenet_ckpt(s3_server) -> str:
    """The bundled ImageNet EfficientNet-Lite0 as it is, at 128 px (confident top-1 on real photos)."""
    uri = f"{BUCKET}/ck/imagenet"
    storage.ensure_bucket(uri)
    from_pretrained(out=uri, image_size=128)
    return uri


def export(ckpt: str, photos: str, out: str, *extra: str) -> dict:
    assert main(["export", "--checkpoint", ckpt, "--sample", photos, "--out", out, *extra]) == 0
    return read_meta(out)


@pytest.fixture(scope="module")
def onnx_export(imagenet_ckpt, photos) -> str:
    out = f"{BUCKET}/exports/onnx"
    export(imagenet_ckpt, photos, out, "--format", "onnx")
    return out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_round_trip_same_top1_on_real_photos(imagenet_ckpt, photos, onnx_export, fmt, monkeypatch):
    out = onnx_export if fmt == "onnx" else f"{BUCKET}/exports/{fmt}"
    if fmt == "torchscript":  # runs only when trusted (tests/test_hostile_models.py); this one we made
        monkeypatch.setenv("DISTCLS_TRUST_TORCHSCRIPT", "1")
    meta = read_meta(out) if fmt == "onnx" else export(imagenet_ckpt, photos, out, "--format", fmt)
    source = read_meta(imagenet_ckpt)
    e = meta["export"]
    assert meta["format"] == "distcls-export/1" and e["format"] == fmt and e["quantization"] is None
    assert e["source_id"] == source["weights_sha256"] and e["agreement"]["rate"] == 1.0
    assert meta["class_names"] == source["class_names"] and meta["preprocessing"] == source["preprocessing"]
    assert meta["weights_sha256"] != source["weights_sha256"]  # the export's own identity
    assert verify_model(out) == meta
    assert json.loads(storage.read_text(f"{out}/distcls.json")) == meta
    # Loaded back (any batch size): the same logits as the checkpoint on the same decoded photos.
    predictor = load_model(out)
    model, _ = load_checkpoint(imagenet_ckpt)
    images = read_sample(sample_paths(photos, 8), PreprocessSpec.from_dict(meta["preprocessing"]))
    with torch.inference_mode():
        ours, theirs = torch.from_numpy(predictor.predict(images[:5])), model(torch.from_numpy(images[:5]))
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    assert float((ours - theirs).abs().max()) < 1e-3


def test_int8_onnx_is_smaller_and_agrees(imagenet_ckpt, photos, onnx_export, capsys):
    fp32 = read_meta(onnx_export)
    int8 = export(
        imagenet_ckpt,
        photos,
        f"{BUCKET}/exports/int8",
        "--format",
        "onnx",
        "--quantize",
        "int8",
        "--calibration-size",
        "8",
        "--min-agreement",
        "0.6",
    )
    assert int8["export"]["quantization"] == "int8-static"
    assert int8["export"]["file_bytes"] < 0.45 * fp32["export"]["file_bytes"]
    assert int8["export"]["agreement"]["rate"] >= 0.6  # measured on the 8 photos; recorded, not assumed
    a = int8["export"]["agreement"]
    assert f"top-1 agrees with the checkpoint on {a['agree']}/8 real images" in capsys.readouterr().out


def test_tampered_export_and_bad_flags_are_refused(imagenet_ckpt, photos, onnx_export, capsys):
    out = f"{BUCKET}/exports/tamper"
    storage.write_text(f"{out}/distcls.json", storage.read_text(f"{onnx_export}/distcls.json"))
    data = bytearray(storage.read_bytes(f"{onnx_export}/model.onnx"))
    data[-10] ^= 0xFF
    storage.write_bytes(f"{out}/model.onnx", bytes(data))
    with pytest.raises(DistclsError, match="model.onnx has sha256 .* refusing to load"):
        load_model(out)
    assert main(["label", "--checkpoint", out, "--input", photos, "--output", f"{BUCKET}/never"]) == 2
    assert "refusing to load" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="int8 is supported for --format onnx only"):
        ExportConfig(checkpoint="c", out="o", sample="s", format="torchscript", quantize="int8")
    assert (
        main(["export", "--checkpoint", imagenet_ckpt, "--sample", f"{BUCKET}/nothing-here", "--out", f"{BUCKET}/exports/none"])
        == 2
    )
    assert "nothing-here does not exist" in capsys.readouterr().err


def test_label_and_serve_run_an_export(ray_local, imagenet_ckpt, photos, onnx_export):
    from ray import serve

    from distcls.serving import application
    from distcls.tools.s3server import free_port

    out = onnx_export
    meta = read_meta(out)
    rows = {}
    for name, model_uri in (("torch", imagenet_ckpt), ("onnx", out)):
        output = f"{BUCKET}/labels/{name}"
        summary = run_labeling(LabelConfig(checkpoint=model_uri, input=photos, output=output), progress=False)
        assert summary["labeled"] == len(PHOTOS) and summary["errors"] == 0
        tables = [pq.read_table(io.BytesIO(storage.read_bytes(p))) for p in existing_parts(output)]
        rows[name] = {r["path"]: r for t in tables for r in t.to_pylist()}
    assert {r["model"] for r in rows["onnx"].values()} == {meta["weights_sha256"]}  # the export's identity
    assert {p: r["label"] for p, r in rows["onnx"].items()} == {p: r["label"] for p, r in rows["torch"].items()}

    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING", "enable_access_log": False}
    )
    try:
        serve.run(
            application(ServeConfig(checkpoint=out, min_replicas=1, max_replicas=1, cpus_per_replica=0.5, port=port)),
            name="export",
            route_prefix="/export",
        )
        jpeg = storage.read_bytes(f"{photos}/chelsea.jpg")
        r = requests.post(
            f"http://127.0.0.1:{port}/export/v1/classify", data=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["id"] == meta["weights_sha256"]
        assert body["predictions"][0]["label"] == rows["torch"][f"{photos}/chelsea.jpg"]["label"]
    finally:
        serve.shutdown()

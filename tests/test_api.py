"""`distcls.load_model(uri).classify(...)`: the Python API over the inference engine, on a checkpoint and on
an ONNX export. Every input form gives the engine's answer for the same image; bad images fail as the
endpoint fails them. No Ray."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import distcls
from distcls import DistclsError, storage
from distcls.checkpoint import META, read_meta
from distcls.config import ExportConfig
from distcls.export import run_export
from distcls.images import decode_image
from distcls.infer import load_model as load_predictor
from distcls.infer import top_prediction
from distcls.infer.api import ClassifyError
from distcls.scores import Calibration
from distcls.transforms import preprocess_bytes
from tests.conftest import encode, make_checkpoint

CLASSES = ["cat", "dog", "bird"]
FIELDS = {"label", "score", "topk", "margin", "entropy", "ood_score", "calibrated"}
NUMBERS = ("score", "margin", "entropy", "ood_score")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A 3-class EfficientNet-Lite0 checkpoint at 32 px, calibrated (temperature 2, a recorded threshold)."""
    uri = make_checkpoint(str(tmp_path_factory.mktemp("api") / "ck"), CLASSES, image_size=32, seed=0)
    meta = read_meta(uri)
    meta["calibration"] = {"temperature": 2.0, "ood_threshold": -1.5}
    storage.write_text(storage.join_uri(uri, META), json.dumps(meta, indent=2))
    return uri


@pytest.fixture(scope="module")
def model(ckpt):
    return distcls.load_model(ckpt, "torch", device="cpu")


@pytest.fixture(scope="module")
def png(photo) -> bytes:
    """Chelsea the cat as a PNG (lossless: every input form decodes to the same pixels)."""
    return encode(Image.fromarray(photo), "PNG")


def assert_same(a: dict, b: dict) -> None:
    """The same prediction, up to float32 reordering between batch sizes."""
    assert a.keys() == b.keys() == FIELDS
    assert (a["label"], a["calibrated"], [t["label"] for t in a["topk"]]) == (
        b["label"],
        b["calibrated"],
        [t["label"] for t in b["topk"]],
    )
    for key in NUMBERS:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert [t["score"] for t in a["topk"]] == pytest.approx([t["score"] for t in b["topk"]], rel=1e-5, abs=1e-6)


def engine_prediction(uri: str, data: bytes, top_k: int, runtime: str, unknown_above: float | None = None) -> dict:
    """What the engine's own pieces give for these bytes: Predictor + preprocess_bytes + top_prediction."""
    predictor = load_predictor(uri, runtime, "cpu")
    logits = predictor.predict(preprocess_bytes(data, predictor.spec)[None])
    return top_prediction(logits[0], predictor.class_names, top_k, Calibration.of(predictor.meta), unknown_above)


def input_forms(data: bytes, tmp_path) -> list:
    path = tmp_path / "image.png"
    path.write_bytes(data)
    return [
        data,
        bytearray(data),
        str(path),
        path,
        f"file://{path}",
        Image.open(io.BytesIO(data)),
        np.asarray(decode_image(data)),
    ]


def test_every_input_form_gives_the_engines_prediction(model, ckpt, png, tmp_path):
    forms = input_forms(png, tmp_path)
    together = model.classify(forms, top_k=2)
    assert isinstance(together, list) and len(together) == len(forms)
    assert all(r == together[0] for r in together)  # one batch: identical, not just close
    expected = engine_prediction(ckpt, png, 2, "torch")
    assert expected["calibrated"] is True and len(expected["topk"]) == 2
    for form in forms:
        single = model.classify(form, top_k=2)
        assert isinstance(single, dict)
        assert_same(single, expected)
    assert_same(together[0], expected)


def test_pil_modes_and_exif_are_converted_as_decoding_does(model, photo):
    rgb = Image.fromarray(photo)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    images = [
        rgb.convert("RGBA"),
        rgb.convert("L"),
        rgb.convert("P"),
        Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257),
    ]
    encoded = [encode(img, "PNG") for img in images] + [encode(rgb, "PNG", exif=exif)]
    opened = [Image.open(io.BytesIO(data)) for data in encoded]
    assert opened[-1].size == (451, 300) and decode_image(encoded[-1]).size == (300, 451)  # the rotation is EXIF's
    results = model.classify(encoded + opened)
    assert results[: len(encoded)] == results[len(encoded) :]
    arrays = [np.asarray(rgb.convert("RGBA")), np.asarray(rgb.convert("L")), np.asarray(rgb.convert("L"))[:, :, None]]
    assert model.classify(arrays) == model.classify([encoded[0], encoded[1], encoded[1]])


def test_batches_and_top_k(model, good_images):
    items = list(good_images.values())
    whole = model.classify(items, top_k=10)
    for a, b in zip(model.classify(items, top_k=10, batch_size=3), whole, strict=True):
        assert_same(a, b)
    assert all(len(r["topk"]) == len(CLASSES) for r in whole)  # top_k past the class count: every class
    assert model.classify([]) == []
    assert model.classify(tuple(items[:2]), top_k=1)[0]["topk"][0]["label"] == whole[0]["label"]


def test_calibration_and_unknown_come_from_the_checkpoint(ckpt, png):
    calibrated = distcls.load_model(ckpt, "torch", device="cpu", unknown="auto")
    info = calibrated.info
    assert info["unknown_above"] == -1.5 and info["calibration"]["temperature"] == 2.0
    expected = engine_prediction(ckpt, png, 3, "torch", unknown_above=-1.5)
    assert_same(calibrated.classify(png, top_k=3), expected)
    everything_unknown = distcls.load_model(ckpt, "torch", device="cpu", unknown=-1e9).classify(png)
    assert everything_unknown["label"] == "unknown" and everything_unknown["topk"][0]["label"] in CLASSES
    with pytest.raises(DistclsError, match="load_model: --unknown 'sometimes' is not auto, off or a number"):
        distcls.load_model(ckpt, "torch", device="cpu", unknown="sometimes")


def test_class_names_and_info(model, ckpt):
    meta = read_meta(ckpt)
    assert model.class_names == CLASSES
    info = model.info
    assert info["class_names"] == CLASSES and info["num_classes"] == 3
    assert info["architecture"] == "efficientnet_lite0" and info["preprocessing"] == meta["preprocessing"]
    assert info["id"] == model.id != meta["weights_sha256"]  # a calibrated checkpoint's id covers its calibration
    assert (info["runtime"], info["device"], info["unknown_above"]) == ("torch", "cpu", None)
    assert "efficientnet_lite0, 3 classes, torch on cpu" in repr(model)


def test_a_bad_image_raises_naming_it_or_returns_an_error_item(model, png, bad_images, tmp_path):
    for name, (data, kind) in bad_images.items():
        with pytest.raises(ClassifyError, match=f"classify: the image: {kind}: ") as caught:
            model.classify(data)
        assert (caught.value.image, caught.value.kind) == (0, kind), name
    truncated = bad_images["truncated.jpg"][0]
    with pytest.raises(ClassifyError, match=r"classify: images\[2\]: truncated: .*errors='return'"):
        model.classify([png, png, truncated, b""])
    missing = str(tmp_path / "missing.jpg")
    results = model.classify([png, truncated, missing, Image.new("RGB", (0, 0))], errors="return")
    assert_same(results[0], model.classify(png))
    assert [r.get("error", {}).get("kind") for r in results] == [None, "truncated", "read_error", "corrupt"]
    assert missing in results[2]["error"]["message"]
    with pytest.raises(ClassifyError, match=r"images\[1\]: too_large: 3000x3000 = 9000000 pixels exceeds the limit"):
        distcls.load_model(make_small_limit_checkpoint(tmp_path), "torch", device="cpu").classify(
            [png, np.zeros((3000, 3000, 3), np.uint8)]
        )


def test_paths_are_read_as_the_jobs_read_objects(ckpt, png, tmp_path):
    """objects.read_object's checks: regular files only, within max_object_mb."""
    (tmp_path / "cat.png").write_bytes(png)
    small = distcls.load_model(ckpt, "torch", device="cpu", max_object_mb=len(png) / 2**20 / 2)
    results = small.classify([str(tmp_path), tmp_path / "cat.png", png], errors="return")
    assert [r.get("error", {}).get("kind") for r in results] == ["not_a_file", "too_large", None]
    assert "raise --max-object-mb to read it" in results[1]["error"]["message"]
    with pytest.raises(ClassifyError, match=r"classify: images\[0\]: not_a_file: .* is not a regular file"):
        small.classify([str(tmp_path)])


def make_small_limit_checkpoint(tmp_path) -> str:
    uri = make_checkpoint(str(tmp_path / "small-limit"), CLASSES, image_size=32, seed=0)
    meta = read_meta(uri)
    meta["preprocessing"]["max_pixels"] = 1_000_000
    storage.write_text(storage.join_uri(uri, META), json.dumps(meta))
    return uri


def test_a_model_with_non_finite_logits_is_named_not_answered(png, tmp_path):
    """The endpoint's non_finite_output: no NaN scores come back, whatever `errors` says."""
    import torch

    from distcls.checkpoint import save_checkpoint
    from distcls.models import create_model

    net = create_model("efficientnet_lite0", 3, "none", image_size=32).eval()
    with torch.no_grad():
        net.net._fc.bias[0] = float("inf")
    save_checkpoint(str(tmp_path / "broken"), net, CLASSES)
    broken = distcls.load_model(str(tmp_path / "broken"), "torch", device="cpu")
    with pytest.raises(
        DistclsError, match=rf"model {broken.id[:12]}\.\.\. \(efficientnet_lite0\) gave non-finite logits .* images\[1\]"
    ):
        broken.classify([b"", png], errors="return")


@pytest.mark.parametrize(
    ("images", "kwargs", "message"),
    [
        (np.zeros((32, 32, 3), np.float32), {}, r"classify: the image is a float32 array; pass a uint8 array HxWx3 \(RGB\)"),
        (np.zeros((3, 40, 50), np.uint8), {}, r"shape \(3, 40, 50\).*this looks like CHW: pass a.transpose\(1, 2, 0\)"),
        (np.zeros((2, 32, 32, 3), np.uint8), {}, r"an array of shape \(2, 32, 32, 3\)"),
        ([b"x", 7], {}, r"classify: images\[1\] is of type int; pass encoded bytes, a path or URI, a PIL image"),
        (b"x", {"top_k": 0}, "classify: top_k 0 must be an integer from 1 to 1000"),
        (b"x", {"top_k": True}, "classify: top_k True must be an integer"),
        (b"x", {"errors": "ignore"}, "classify: errors='ignore'; use 'raise' or 'return'"),
        (b"x", {"batch_size": 0}, "classify: batch_size 0 must be a positive integer"),
    ],
)
def test_what_is_not_an_image_is_refused_in_one_line(model, images, kwargs, message):
    with pytest.raises(DistclsError, match=message) as caught:
        model.classify(images, **kwargs)
    assert not isinstance(caught.value, ClassifyError) and "\n" not in str(caught.value)


def test_an_image_in_object_storage(s3_server, model, png):
    storage.ensure_bucket("s3://api-test")
    storage.write_bytes("s3://api-test/cat.png", png)
    assert_same(model.classify("s3://api-test/cat.png"), model.classify(png))
    result = model.classify(["s3://api-test/nothing.png"], errors="return")[0]
    assert result["error"]["kind"] == "read_error" and "s3://api-test/nothing.png" in result["error"]["message"]


def test_an_onnx_export_runs_through_the_same_api(ckpt, png, photo, tmp_path):
    sample = tmp_path / "sample"
    sample.mkdir()
    for i, size in enumerate([(451, 300), (120, 90), (64, 64), (300, 451)]):
        (sample / f"{i}.jpg").write_bytes(encode(Image.fromarray(photo).resize(size), "JPEG", quality=90))
    out = str(tmp_path / "onnx")
    run_export(ExportConfig(checkpoint=ckpt, out=out, sample=str(sample), sample_size=4))
    exported = distcls.load_model(out)
    assert exported.info["runtime"] == "onnx" and exported.class_names == CLASSES
    assert exported.info["calibration"] == {"temperature": 2.0, "ood_threshold": -1.5}  # carried by the export
    forms = input_forms(png, tmp_path)
    together = exported.classify(forms, top_k=3)
    assert all(r == together[0] for r in together)
    assert_same(exported.classify(png, top_k=3), engine_prediction(out, png, 3, "auto"))
    assert together[0]["label"] == distcls.load_model(ckpt, "torch", device="cpu").classify(png)["label"]


def test_import_distcls_and_resolving_load_model_stay_light():
    assert "load_model" in distcls.__all__
    code = (
        "import sys, distcls; f = distcls.load_model; "
        "print(f.__module__, sorted(m for m in ('torch', 'ray', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["distcls.infer.api", "[]"]

"""The inference engine: runtimes agree on real photos, the compile cache, fallback, refusals. No Ray."""

from __future__ import annotations

import os

import numpy as np
import pytest

from distcls import DistclsError
from distcls.checkpoint import from_pretrained, read_meta
from distcls.config import ExportConfig
from distcls.export import run_export
from distcls.infer import load_model, onnxrt, prepare_runtime
from distcls.tools.bench.harness import make_photos
from distcls.transforms import preprocess_bytes


@pytest.fixture(scope="module")
def imagenet_ckpt(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("infer") / "lite0")
    from_pretrained(out=out, model="efficientnet_lite0", weights="bundled")
    return out


@pytest.fixture(scope="module")
def photos(imagenet_ckpt) -> np.ndarray:
    spec = load_model(imagenet_ckpt, "torch", "cpu").spec
    return np.stack([preprocess_bytes(data, spec) for data in make_photos(40, seed=3)])


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> str:
    """A compile cache of the test's own, so that 'compiles' and 'reads the cache' are observable."""
    path = str(tmp_path / "cache")
    monkeypatch.setenv(onnxrt.CACHE_ENV, path)
    return path


@pytest.fixture
def tiny_ckpt(tmp_path) -> str:
    out = str(tmp_path / "tiny")
    from_pretrained(out=out, model="mobilenet_v3_small", weights="none", image_size=32)
    return out


def cache_entries(cache_dir: str) -> list[str]:
    root = os.path.join(cache_dir, "onnx")
    return sorted(e for e in os.listdir(root) if not e.startswith(".")) if os.path.isdir(root) else []


def test_runtimes_give_the_same_labels_on_real_photos(imagenet_ckpt, photos, cache_dir):
    # The driver compiles once, checking against the job's own images; the actors then read the cache.
    assert prepare_runtime(imagenet_ckpt, "auto", use_gpu=False, sample=photos[:8])[0] == "onnx"
    (entry,) = cache_entries(cache_dir)
    assert onnxrt.read_cached(entry)[1]["check_images"] == "sample"
    torch_model = load_model(imagenet_ckpt, "torch", "cpu")
    logits = {"torch": torch_model.predict(photos)}
    for runtime in ("auto", "onnx"):
        model = load_model(imagenet_ckpt, runtime, "cpu", threads=2)
        assert model.runtime == "onnx" and model.device.type == "cpu"
        assert model.note.startswith("compiled ONNX from the cache")
        logits[runtime] = model.predict(photos)
    for runtime in ("auto", "onnx"):
        assert (logits[runtime].argmax(1) == logits["torch"].argmax(1)).all()
        assert np.abs(logits[runtime] - logits["torch"]).max() < 1e-3 * (1 + np.abs(logits["torch"]).max())
    assert torch_model.runtime == "torch" and torch_model.parameters == 4_652_008
    assert load_model(imagenet_ckpt, "auto", "cpu").parameters == torch_model.parameters
    assert load_model(imagenet_ckpt, "auto", "cpu").predict(photos[:0]).shape == (0, 1000)
    assert prepare_runtime(imagenet_ckpt, "auto", use_gpu=True) == ("torch", "torch on cuda")
    assert prepare_runtime(imagenet_ckpt, "torch", use_gpu=False) == ("torch", "torch on cpu")


def test_compile_cache_is_reused_and_keyed_by_the_checkpoint(tiny_ckpt, cache_dir):
    first = load_model(tiny_ckpt, "auto", "cpu")
    assert first.note.startswith("compiled to ONNX in ") and ", cached" in first.note
    (entry,) = cache_entries(cache_dir)
    model_file = os.path.join(cache_dir, "onnx", entry, "model.onnx")
    mtime = os.stat(model_file).st_mtime_ns
    second = load_model(tiny_ckpt, "auto", "cpu")
    assert second.note.startswith("compiled ONNX from the cache") and os.stat(model_file).st_mtime_ns == mtime
    # Other weights, another architecture or other preprocessing: another entry.
    meta = read_meta(tiny_ckpt)
    assert onnxrt.cache_key(meta) == entry
    for change in (
        {"weights_sha256": "0" * 64},
        {"architecture": "resnet18"},
        {"preprocessing": {**meta["preprocessing"], "image_size": 64}},
    ):
        assert onnxrt.cache_key({**meta, **change}) != entry
    # A damaged entry is never used: it is compiled again.
    with open(model_file, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 64)
    assert onnxrt.read_cached(entry) is None
    assert load_model(tiny_ckpt, "auto", "cpu").note.startswith("compiled to ONNX in ")
    assert onnxrt.read_cached(entry) is not None


def test_a_model_that_fails_to_compile_falls_back_to_torch(imagenet_ckpt, photos, cache_dir, monkeypatch, capsys):
    def broken_exporter(*args, **kwargs):
        raise RuntimeError("Unsupported: data-dependent control flow in forward")

    monkeypatch.setattr(onnxrt, "export_onnx", broken_exporter)
    model = load_model(imagenet_ckpt, "auto", "cpu")
    assert model.runtime == "torch" and model.note.startswith("fell back to torch: compiling efficientnet_lite0")
    (line,) = capsys.readouterr().out.splitlines()
    assert "compiling efficientnet_lite0 to ONNX failed (RuntimeError: Unsupported: data-dependent" in line
    assert line.endswith("; running on torch instead")
    assert model.predict(photos[:2]).shape == (2, 1000)
    with pytest.raises(DistclsError, match="to ONNX failed .*; use --runtime torch") as exc_info:
        load_model(imagenet_ckpt, "onnx", "cpu")
    assert "\n" not in str(exc_info.value)
    assert prepare_runtime(imagenet_ckpt, "auto", use_gpu=False)[0] == "torch"
    assert cache_entries(cache_dir) == []


def test_a_graph_that_disagrees_is_never_used(tiny_ckpt, cache_dir, monkeypatch):
    monkeypatch.setattr(onnxrt, "LOGIT_TOLERANCE", -1.0)  # any difference at all counts as disagreement
    model = load_model(tiny_ckpt, "auto", "cpu")
    assert model.runtime == "torch" and "disagrees with torch on the check images" in model.note
    assert cache_entries(cache_dir) == []


def test_export_runs_only_on_its_own_runtime(tiny_ckpt, tmp_path):
    photos_dir = tmp_path / "photos"
    photos_dir.mkdir()
    for i, data in enumerate(make_photos(4)):
        (photos_dir / f"{i}.jpg").write_bytes(data)
    out = str(tmp_path / "onnx-export")
    run_export(ExportConfig(checkpoint=tiny_ckpt, out=out, sample=str(photos_dir), sample_size=4))
    assert load_model(out, "auto", "cpu").runtime == "onnx"
    assert load_model(out, "onnx", "cpu").note.startswith("ONNX export")
    with pytest.raises(DistclsError, match="is a onnx export, which runs only on onnx; pass --runtime auto or onnx"):
        load_model(out, "torch", "cpu")

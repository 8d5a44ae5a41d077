"""Hostile images through every path: training ingest (skipped and counted), labeling (an error row) and
serving (422 JSON, the replica keeps serving), with decompression bombs refused in bounded memory.

One matrix, `HOSTILE`, of real files as a bucket might hold them: bombs whose headers declare huge sizes
(PNG, JPEG, GIF, and a PNG with a real zlib stream of zeros), truncated files, zero width/height headers,
wrong extensions, an empty object, and the awkward-but-good ones (animated GIF, 16-bit PNG, CMYK JPEG).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter

import numpy as np
import pytest
import requests
from PIL import Image

from distcls import storage
from distcls.bench import imagenet_checkpoint
from distcls.config import LabelConfig, ServeConfig, TrainConfig
from distcls.datasets import ErrorTally, build_dataset, load_labeled_index
from distcls.images import ImageDecodeError
from distcls.transforms import PreprocessSpec, preprocess_bytes
from tests.conftest import alive_replicas, encode, jpeg_bomb, png_bomb

BUCKET = "s3://hostile-test"
BOMBS = ("bomb_header.png", "bomb_header.jpg", "bomb_header.gif", "bomb_zlib.png")
IMAGENET_CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_zeros(width: int, height: int) -> bytes:
    """A real RGB PNG whose IDAT really inflates to width*height*3 bytes of zeros (~200 KB on disk)."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (width * 3 + 1)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def with_size(data: bytes, width: int, height: int) -> bytes:
    """The same real file with its header's size rewritten (PNG IHDR, JPEG SOF0 or GIF screen)."""
    out = bytearray(data)
    if data.startswith(b"\x89PNG"):
        out[16:24] = struct.pack(">II", width, height)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    elif data.startswith(b"GIF"):
        out[6:10] = struct.pack("<HH", width, height)
    else:
        i = out.index(b"\xff\xc0")
        out[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(out)


@pytest.fixture(scope="module")
def hostile(photo, good_images) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the error kind it must give, "" for an image that must decode)."""
    rgb = Image.fromarray(photo)
    png, jpeg, gif = encode(rgb, "PNG"), encode(rgb, "JPEG", quality=90), encode(rgb.resize((64, 48)), "GIF")
    return {
        "bomb_header.png": (png_bomb(100_000, 100_000), "too_large"),  # 30 GB of RGB declared
        "bomb_header.jpg": (jpeg_bomb(photo, 60_000, 60_000), "too_large"),  # 10.8 GB
        "bomb_header.gif": (with_size(gif, 65_535, 65_535), "too_large"),  # 12.9 GB
        "bomb_zlib.png": (png_of_zeros(8_200, 8_200), "too_large"),  # 202 MB inflated: over our limit only
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "zero_width.png": (with_size(png, 0, 300), "corrupt"),
        "zero_height.jpg": (with_size(jpeg, 451, 0), "corrupt"),
        "text_named.jpg": (b"name,label\ncat.jpg,cat\n" * 40, "not_image"),
        "empty.jpg": (b"", "empty"),
        "png_named.jpg": (png, ""),
        "animated.gif": (good_images["anim.gif"], ""),
        "sixteen_bit.png": (good_images["sixteen.png"], ""),
        "cmyk.jpg": (good_images["cmyk.jpg"], ""),
        "rgb.jpg": (jpeg, ""),
    }


def expected_kinds(hostile: dict, names=None) -> Counter:
    return Counter(kind for name, (_, kind) in hostile.items() if kind and (names is None or name in names))


def test_one_preprocessing_path_refuses_or_decodes_each(hostile):
    spec = PreprocessSpec(image_size=64)
    for name, (data, kind) in hostile.items():
        for train in (False, True):
            if not kind:
                x = preprocess_bytes(data, spec, train=train)
                assert x.dtype == np.uint8 and x.shape[0] == 3 and x.std() > 5, name
                continue
            with pytest.raises(ImageDecodeError) as info:
                preprocess_bytes(data, spec, train=train)
            assert info.value.kind == kind, (name, str(info.value))
    with pytest.raises(ImageDecodeError, match=r"starts like a PNG but its header is invalid"):
        preprocess_bytes(hostile["zero_width.png"][0], spec)
    with pytest.raises(ImageDecodeError, match=r"declares 10000000000 pixels, which exceeds the limit of 64000000"):
        preprocess_bytes(hostile["bomb_header.png"][0], spec)


MEMORY_PROBE = r"""
import json, sys
from distcls.transforms import PreprocessSpec, preprocess_bytes
from distcls.images import ImageDecodeError
spec = PreprocessSpec(image_size=224)
# VmHWM: this process's own peak RSS. (getrusage's ru_maxrss keeps the parent's peak across fork+exec,
# which under a big pytest process hides everything below it.)
peak = lambda: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
preprocess_bytes(open(sys.argv[1], "rb").read(), spec)  # warm up: lazy imports and buffers of a good decode
preprocess_bytes(open(sys.argv[1], "rb").read(), spec, train=True)
out = {"baseline": peak()}
for path in sys.argv[2:]:
    data = open(path, "rb").read()
    kinds = []
    for train in (False, True):
        try:
            preprocess_bytes(data, spec, train=train)
            kinds.append("")
        except ImageDecodeError as exc:
            kinds.append(exc.kind)
    out[path] = {"kinds": kinds, "peak": peak()}
print(json.dumps(out))
"""


def test_bombs_are_refused_in_bounded_memory(hostile, tmp_path):
    """A fresh process decodes each bomb with the one preprocessing function; its peak RSS must not grow
    by more than 50 MB, against 0.2-30 GB declared. Time is bounded only by a generous timeout."""
    (tmp_path / "good.jpg").write_bytes(hostile["rgb.jpg"][0])
    for name in BOMBS:
        (tmp_path / name).write_bytes(hostile[name][0])
    # The control: a real 4000x4000 PNG under the limit is decoded for real (48 MB), so the probe can see it.
    (tmp_path / "control.png").write_bytes(png_of_zeros(4_000, 4_000))
    paths = [str(tmp_path / name) for name in BOMBS]
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "good.jpg"), *paths,
                           str(tmp_path / "control.png")],
                          capture_output=True, text=True, timeout=180, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, path in zip(BOMBS, paths):
        assert out[path]["kinds"] == ["too_large", "too_large"], (name, out[path])
        grown = out[path]["peak"] - out["baseline"]
        print(f"{name}: {len(hostile[name][0])} bytes, peak RSS +{grown / 1e6:.1f} MB")
        assert grown < 50e6, f"{name} grew the decoder's peak RSS by {grown / 1e6:.0f} MB"
    control = out[str(tmp_path / "control.png")]
    print(f"control 4000x4000 PNG (48 MB decoded): peak RSS +{(control['peak'] - out['baseline']) / 1e6:.1f} MB")
    assert control["kinds"] == ["", ""] and control["peak"] - out["baseline"] > 40e6, control


@pytest.fixture(scope="module")
def hostile_prefix(s3_server, hostile, good_images, photo) -> dict:
    """s3://hostile-test/<id>/ with train/{a,b}/ (the whole matrix split over both classes, plus more good
    photos), val/{a,b}/ (good photos and two hostile ones) and label/ (the matrix as it is)."""
    root = f"{BUCKET}/{os.urandom(4).hex()}"
    storage.ensure_bucket(root)
    names = list(hostile)
    items = [(f"{root}/label/{name}", data) for name, (data, _) in hostile.items()]
    items += [(f"{root}/train/{'ab'[i % 2]}/{name}", hostile[name][0]) for i, name in enumerate(names)]
    for i in range(8):  # more real photos per class, so that every step has good images
        shifted = Image.fromarray(np.roll(photo, 37 * i, axis=1))
        items.append((f"{root}/train/{'ab'[i % 2]}/photo{i}.jpg", encode(shifted.resize((120, 80)), "JPEG")))
        if i < 4:
            items.append((f"{root}/val/{'ab'[i % 2]}/photo{i}.jpg", encode(shifted.resize((90, 60)), "JPEG")))
    val_bad = ["bomb_header.jpg", "truncated.png"]
    items += [(f"{root}/val/b/{name}", hostile[name][0]) for name in val_bad]
    storage.write_many(items)
    return {"root": root, "val_bad": val_bad}


def test_training_ingest_skips_and_counts_each_kind(ray_local, hostile, hostile_prefix):
    """The Ray Data pipeline training reads from (S3, decode tasks, train-time base squares)."""
    root = hostile_prefix["root"]
    index = load_labeled_index(f"{root}/train")
    assert len(index) == len(hostile) + 8
    tally = ErrorTally()
    good = 0
    for batch in build_dataset(index, PreprocessSpec(image_size=32), train=True).iter_batches(
            batch_size=8, batch_format="numpy"):
        good += len(tally.drop_errors(batch)["path"])
    print(f"\ntraining ingest: {good} good rows, skipped {tally.count} by kind {dict(tally.by_kind)}")
    assert tally.by_kind == expected_kinds(hostile)
    assert good == 8 + sum(1 for _, kind in hostile.values() if not kind)


@pytest.mark.slow
def test_training_run_skips_and_reports_hostile_images(ray_local, hostile, hostile_prefix):
    """A real `run_training` (Ray Train, 1 worker, 1 epoch) over the same folders: it finishes, and its
    metrics count every hostile object of the training and validation data as skipped."""
    from distcls.train.trainer import run_training

    root = hostile_prefix["root"]
    result = run_training(TrainConfig(data=f"{root}/train", val_data=f"{root}/val", image_size=32, batch_size=8,
                                      num_workers=1, epochs=1, storage=f"{root}/runs", name="hostile"))
    (epoch,) = result["epochs"]
    print(f"\ntraining: skipped {epoch['skipped_train']} train + {epoch['skipped_val']} val objects, "
          f"val_samples {epoch['val_samples']}, train_loss {epoch['train_loss']:.3f}")
    assert epoch["skipped_train"] == sum(expected_kinds(hostile).values())
    assert epoch["skipped_val"] == len(hostile_prefix["val_bad"])
    assert epoch["val_samples"] == 4
    assert np.isfinite(epoch["train_loss"]) and storage.exists(f"{result['checkpoint']}/model.safetensors")


@pytest.fixture(scope="module")
def imagenet_ckpt(s3_server):
    return imagenet_checkpoint(BUCKET)  # <BUCKET>/ck/imagenet, written once


def test_labeling_writes_an_error_row_per_hostile_object(ray_local, hostile, hostile_prefix, imagenet_ckpt):
    import io

    import pyarrow.parquet as pq

    from distcls.label import existing_parts, run_labeling

    root = hostile_prefix["root"]
    out = f"{root}/labels"
    summary = run_labeling(LabelConfig(checkpoint=imagenet_ckpt, input=f"{root}/label", output=out,
                                       cpus_per_replica=0.5), progress=False)
    print(f"\nlabeling: {summary['labeled']} rows, errors by kind {summary['errors_by_kind']}")
    assert summary["total"] == summary["labeled"] == len(hostile)
    assert summary["errors_by_kind"] == dict(expected_kinds(hostile))
    rows = [r for p in existing_parts(out) for r in pq.read_table(io.BytesIO(storage.read_bytes(p))).to_pylist()]
    by_path = {r["path"]: r for r in rows}
    assert len(rows) == len(by_path) == len(hostile)
    for name, (_, kind) in hostile.items():
        row = by_path[f"{root}/label/{name}"]
        if kind:
            assert row["label"] is None and row["score"] is None and row["error"].startswith(kind + ": "), row
        else:
            assert row["error"] is None and row["label"] and 0 < row["score"] <= 1, row
    assert by_path[f"{root}/label/rgb.jpg"]["label"] in IMAGENET_CATS
    assert by_path[f"{root}/label/png_named.jpg"]["label"] in IMAGENET_CATS  # the content decides, not the name


@pytest.fixture(scope="module")
def serve_url(ray_local, imagenet_ckpt):
    from ray import serve

    from distcls.s3server import free_port
    from distcls.serving import application

    port = free_port()
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    cfg = ServeConfig(checkpoint=imagenet_ckpt, min_replicas=1, max_replicas=1, cpus_per_replica=0.5, port=port)
    serve.run(application(cfg), name="hostile", route_prefix="/hostile", logging_config=quiet)
    yield f"http://127.0.0.1:{port}/hostile"
    serve.delete("hostile")
    serve.shutdown()


def test_serving_answers_4xx_and_the_replica_keeps_serving(serve_url, hostile):
    url = f"{serve_url}/v1/classify"
    cat = hostile["rgb.jpg"][0]
    assert requests.post(url, data=cat, headers={"Content-Type": "image/jpeg"}, timeout=120).status_code == 200
    before = set(alive_replicas("hostile"))
    assert len(before) == 1
    for name, (data, kind) in hostile.items():
        ctype = "image/png" if name.endswith(".png") else "image/gif" if name.endswith(".gif") else "image/jpeg"
        r = requests.post(url, data=data, headers={"Content-Type": ctype}, timeout=120)
        if kind:
            assert r.status_code == 422, (name, r.status_code, r.text)
            assert r.json()["error"]["kind"] == kind and r.json()["error"]["message"], (name, r.json())
        else:
            assert r.status_code == 200, (name, r.text)
            assert r.json()["predictions"][0]["label"], name
        after = requests.post(url, data=cat, headers={"Content-Type": "image/jpeg"}, timeout=120)
        assert after.status_code == 200 and after.json()["predictions"][0]["label"] in IMAGENET_CATS, name
    # All the bombs in one multipart request: one 422 naming every bad image, then a good answer.
    files = [("images", (name, hostile[name][0], "application/octet-stream")) for name in ("rgb.jpg", *BOMBS)]
    r = requests.post(url, files=files, timeout=120)
    assert r.status_code == 422 and r.json()["error"]["bad_images"] == [1, 2, 3, 4], r.text
    assert requests.post(url, data=cat, headers={"Content-Type": "image/jpeg"}, timeout=120).status_code == 200
    assert set(alive_replicas("hostile")) == before  # the same replica process answered everything: none crashed

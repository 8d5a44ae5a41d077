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
from distcls.checkpoint import from_pretrained
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
        out[i + 5 : i + 9] = struct.pack(">HH", height, width)
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
import ctypes, json, resource, sys
from distcls.transforms import PreprocessSpec, preprocess_bytes
from distcls.images import ImageDecodeError
spec = PreprocessSpec(image_size=224)
# VmHWM: this process's own peak RSS. (getrusage's ru_maxrss keeps the parent's peak across fork+exec,
# which under a big pytest process hides everything below it.)
status = lambda key: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                          if line.startswith(key + ":"))
def start_peak():
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so each file gets its own
    # peak; where that is refused, peaks stay cumulative from the baseline (still an upper bound).
    # malloc_trim first: freed pages left resident would hide the next file's allocations.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmHWM")
    except OSError:
        return out["baseline"]
preprocess_bytes(open(sys.argv[1], "rb").read(), spec)  # warm up: lazy imports and buffers of a good decode
preprocess_bytes(open(sys.argv[1], "rb").read(), spec, train=True)
out = {"baseline": status("VmHWM")}
# A regression that asks for tens of GB gets MemoryError here instead of taking the machine down.
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
cap = status("VmSize") + (4 << 30)
resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
for path in sys.argv[2:]:
    data = open(path, "rb").read()
    kinds, start = [], start_peak()
    for train in (False, True):
        try:
            preprocess_bytes(data, spec, train=train)
            kinds.append("")
        except ImageDecodeError as exc:
            kinds.append(exc.kind)
        except BaseException as exc:  # reported, so that the test names what went wrong
            kinds.append(f"{type(exc).__name__}: {exc}")
    out[path] = {"kinds": kinds, "grown": status("VmHWM") - start}
print(json.dumps(out))
"""


def probe_memory(tmp_path, files: dict[str, bytes], warmup: bytes) -> dict[str, dict]:
    """name -> {"kinds": [eval, train], "grown": peak RSS growth in bytes} from one fresh process that runs
    preprocess_bytes on each file, in the order given."""
    (tmp_path / "warmup.jpg").write_bytes(warmup)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "warmup.jpg"), *(str(tmp_path / name) for name in files)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=os.getcwd(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: out[str(tmp_path / name)] for name in files}


def test_bombs_are_refused_in_bounded_memory(hostile, tmp_path):
    """A fresh process decodes each bomb with the one preprocessing function; its peak RSS must not grow
    by more than 50 MB, against 0.2-30 GB declared. Time is bounded only by a generous timeout."""
    # The control: a real 4000x4000 PNG under the limit is decoded for real (48 MB), so the probe can see it.
    files = {name: hostile[name][0] for name in BOMBS} | {"control.png": png_of_zeros(4_000, 4_000)}
    out = probe_memory(tmp_path, files, warmup=hostile["rgb.jpg"][0])
    for name in BOMBS:
        assert out[name]["kinds"] == ["too_large", "too_large"], (name, out[name])
        print(f"{name}: {len(hostile[name][0])} bytes, peak RSS +{out[name]['grown'] / 1e6:.1f} MB")
        assert out[name]["grown"] < 50e6, f"{name} grew the decoder's peak RSS by {out[name]['grown'] / 1e6:.0f} MB"
    control = out["control.png"]
    print(f"control 4000x4000 PNG (48 MB decoded): peak RSS +{control['grown'] / 1e6:.1f} MB")
    assert control["kinds"] == ["", ""] and control["grown"] > 40e6, control


def test_extreme_aspect_ratios_and_sixteen_bit_stay_in_bounded_memory(hostile, tmp_path):
    """Resizing the short side of a 2000x1 PNG to 256 once built a 512000x256 image (+540 MB for an 86-byte
    file); 100000x1 asked for ~20 GB. Both now decode, train and eval, in a few MB. A 4000x4000 16-bit PNG
    (tens of KB) took 320 MB through int64 copies; the 16-bit path now stays near the source plus its RGB."""
    red = (200, 30, 30)
    gradient16 = np.arange(4_000, dtype=np.uint16)[None, :] * 16 + np.arange(4_000, dtype=np.uint16)[:, None]
    files = {
        "wide_2000x1.png": encode(Image.new("RGB", (2_000, 1), red), "PNG"),
        "wide_100000x1.png": encode(Image.new("RGB", (100_000, 1), red), "PNG"),
        "tall_1x100000.png": encode(Image.new("RGB", (1, 100_000), red), "PNG"),
        "wide_65500x1.jpg": encode(Image.new("RGB", (65_500, 1), red), "JPEG"),
        "sixteen_4000x4000.png": encode(Image.fromarray(gradient16), "PNG"),
        "sixteen_be_4000x4000.tif": encode(
            Image.frombytes("I;16B", (4_000, 4_000), b"\x9c\x40" * 16_000_000), "TIFF", compression="tiff_deflate"
        ),
    }
    out = probe_memory(tmp_path, files, warmup=hostile["rgb.jpg"][0])
    for name, result in out.items():
        print(f"{name}: {len(files[name])} bytes, peak RSS +{result['grown'] / 1e6:.1f} MB")
        assert result["kinds"] == ["", ""], (name, result)
        # 16-bit: the 32 MB source, its 16 MB 8-bit copy and the 64 MB RGB(X) image; nothing 8 bytes a pixel.
        bound = 150e6 if name.startswith("sixteen") else 20e6
        assert result["grown"] < bound, f"{name} grew the decoder's peak RSS by {result['grown'] / 1e6:.0f} MB"


OUT_OF_MEMORY_PROBE = r"""
import json, resource, sys
import numpy as np
from distcls.datasets import load_images
from distcls.images import ImageDecodeError
from distcls.transforms import PreprocessSpec, preprocess_bytes
spec = PreprocessSpec(image_size=64)
status = lambda key: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                          if line.startswith(key + ":"))
load_images({"path": np.asarray([sys.argv[1]], dtype=object)}, spec)  # warm up: imports, thread pool
# 150 MB more address space than the process has: an 8000x8000 image needs 256 MB as RGB.
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + 150_000_000, resource.getrlimit(resource.RLIMIT_AS)[1]))
out = {}
try:
    preprocess_bytes(open(sys.argv[2], "rb").read(), spec)
    out["preprocess"] = "decoded"
except ImageDecodeError as exc:
    out["preprocess"] = str(exc)
batch = load_images({"path": np.asarray([sys.argv[2], sys.argv[1]], dtype=object)}, spec)
out["rows"] = [str(e) for e in batch["error"]]
print(json.dumps(out))
"""


def test_out_of_memory_is_an_error_row_not_a_crash(hostile, tmp_path):
    """A real MemoryError (an address-space limit below what an image under the pixel limit needs) is the
    image's `too_large` error, in preprocess_bytes and as the labeling/training pipeline's error row; the
    next image in the batch still decodes."""
    (tmp_path / "good.jpg").write_bytes(hostile["rgb.jpg"][0])
    (tmp_path / "big.png").write_bytes(encode(Image.new("L", (8_000, 8_000), 90), "PNG"))  # 64 M pixels: allowed
    proc = subprocess.run(
        [sys.executable, "-c", OUT_OF_MEMORY_PROBE, str(tmp_path / "good.jpg"), str(tmp_path / "big.png")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=os.getcwd(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nunder an address-space limit: {out}")
    assert out["preprocess"].startswith("too_large: decoding it needs more memory than this process could get")
    assert out["rows"][0].startswith("too_large: ") and out["rows"][1] == "", out["rows"]


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
    for batch in build_dataset(index, PreprocessSpec(image_size=32), train=True).iter_batches(batch_size=8, batch_format="numpy"):
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
    result = run_training(
        TrainConfig(
            data=f"{root}/train",
            val_data=f"{root}/val",
            image_size=32,
            batch_size=8,
            num_workers=1,
            epochs=1,
            storage=f"{root}/runs",
            name="hostile",
        )
    )
    (epoch,) = result["epochs"]
    print(
        f"\ntraining: skipped {epoch['skipped_train']} train + {epoch['skipped_val']} val objects, "
        f"val_samples {epoch['val_samples']}, train_loss {epoch['train_loss']:.3f}"
    )
    assert epoch["skipped_train"] == sum(expected_kinds(hostile).values())
    assert epoch["skipped_val"] == len(hostile_prefix["val_bad"])
    assert epoch["val_samples"] == 4
    assert np.isfinite(epoch["train_loss"]) and storage.exists(f"{result['checkpoint']}/model.safetensors")


@pytest.fixture(scope="module")
def imagenet_ckpt(s3_server):
    storage.ensure_bucket(BUCKET)
    from_pretrained(f"{BUCKET}/ck/imagenet")
    return f"{BUCKET}/ck/imagenet"


def test_labeling_writes_an_error_row_per_hostile_object(ray_local, hostile, hostile_prefix, imagenet_ckpt):
    import io

    import pyarrow.parquet as pq

    from distcls.label import existing_parts, run_labeling

    root = hostile_prefix["root"]
    out = f"{root}/labels"
    summary = run_labeling(
        LabelConfig(checkpoint=imagenet_ckpt, input=f"{root}/label", output=out, cpus_per_replica=0.5), progress=False
    )
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

    from distcls.serving import application
    from distcls.tools.s3server import free_port

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


def empty_b64_flood(limit_bytes: int = 10_000_000) -> tuple[bytes, int]:
    """The largest JSON body under `limit_bytes` made of {"b64":""} items, and how many items it holds."""
    count = (limit_bytes - 32) // 11
    return b'{"images":[' + b",".join([b'{"b64":""}'] * count) + b'],"top_k":1}', count


def test_json_image_count_is_checked_before_parsing():
    """10 MB of {"b64": ""} items once became 909,089 parsed objects (+174 MB, ~3 s on the event loop)
    before the count check. Now the count is read from the bytes first: refused with almost no allocation."""
    import base64
    import tracemalloc

    from distcls.serving import RequestError, parse_json_images

    flood, count = empty_b64_flood()
    floods = {
        "b64 items": flood,
        "empty lists": b'{"images":[' + b",".join([b"[]"] * 2_000_000) + b"]}",
        "numbers": b'{"images":[' + b",".join([b"0"] * 3_000_000) + b"]}",
        "nesting": b"[" * 5_000_000,
    }
    for name, body in floods.items():
        tracemalloc.start()
        with pytest.raises(RequestError) as info:
            parse_json_images(body, max_images=64)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{name}: {len(body) / 1e6:.1f} MB body refused with {info.value.status} after {peak / 1e3:.0f} KB")
        assert (info.value.status, info.value.kind) == (413, "too_many_images"), (name, info.value.message)
        assert peak < 1e6, f"{name}: parsing allocated {peak / 1e6:.0f} MB before refusing"
    with pytest.raises(RequestError, match=rf"^{count} images in one request; the limit is 64 "):
        parse_json_images(flood, max_images=64)
    with pytest.raises(RequestError, match=r"^65 images in one request; the limit is 64 "):
        parse_json_images(json.dumps({"images": [{"b64": ""}] * 65}).encode(), max_images=64)
    with pytest.raises(RequestError, match=r"nested too deeply") as info:  # under the value cap, over Python's
        parse_json_images(b'{"images": ' + b"[" * 3_000 + b"]" * 3_000 + b"}", max_images=1_000)
    assert info.value.status == 400
    # At the limit, extra keys per image and all: accepted, decoded in order.
    doc = {"images": [{"b64": base64.b64encode(bytes([i])).decode(), "name": f"{i}.jpg"} for i in range(64)], "top_k": 3}
    assert parse_json_images(json.dumps(doc).encode(), max_images=64) == ([bytes([i]) for i in range(64)], 3)


def test_serving_refuses_a_json_flood_with_the_documented_error(serve_url, hostile):
    import base64

    url = f"{serve_url}/v1/classify"
    before = set(alive_replicas("hostile"))
    flood, count = empty_b64_flood()
    r = requests.post(url, data=flood, headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code == 413, r.text
    assert r.json() == {
        "error": {
            "kind": "too_many_images",
            "message": f"{count} images in one request; the limit is 64 (server flag --max-images-per-request)",
        }
    }
    doc = {"images": [{"b64": base64.b64encode(hostile["rgb.jpg"][0]).decode()}] * 2, "top_k": 2}
    r = requests.post(url, json=doc, timeout=120)
    assert r.status_code == 200 and [p["label"] in IMAGENET_CATS for p in r.json()["predictions"]] == [True, True]
    assert set(alive_replicas("hostile")) == before


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_bounded_resize_matches_torchvision(photo, interpolation):
    """Ordinary shapes take torchvision's Resize + CenterCrop bit for bit; shapes whose resized image would
    pass RESIZE_BUDGET_PIXELS are resampled from the source region instead, within one level of it."""
    from torchvision import transforms as T

    from distcls.transforms import RESIZE_BUDGET_PIXELS, base_transform, eval_transform, resized_size

    spec = PreprocessSpec(image_size=224, interpolation=interpolation)
    mode = T.InterpolationMode(interpolation)
    for size, bounded in [((451, 300), False), ((37, 500), False), ((3_000, 40), True), ((9, 2_000), True), ((2_000, 3), True)]:
        img = Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR)
        assert (np.prod(resized_size(*size, spec.resize_size)) > RESIZE_BUDGET_PIXELS) == bounded, size
        for crop, ours in ((spec.image_size, eval_transform(img, spec)), (spec.resize_size, base_transform(img, spec))):
            reference = T.Compose([T.Resize(spec.resize_size, interpolation=mode), T.CenterCrop(crop), T.PILToTensor()])(
                img
            ).numpy()
            diff = np.abs(ours.astype(int) - reference).max()
            assert diff <= (1 if bounded else 0), (size, crop, diff)

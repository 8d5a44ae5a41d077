"""Shared fixtures: one S3 server on loopback and one local Ray instance per test session, real images."""

from __future__ import annotations

import io
import os
import struct
import tempfile
import zlib

import numpy as np
import pytest
from PIL import Image

from distcls import storage
from distcls.tools.s3server import S3Server, restore_env, use_server_env

RAY_TEST_CPUS = 4  # logical CPUs for the shared local Ray: training workers + data tasks on a 2-core box
# One ONNX compile cache for the session (not the user's ~/.cache), set before Ray starts so every worker,
# actor and replica shares it: a checkpoint used by several tests compiles once.
os.environ["DISTCLS_CACHE_DIR"] = tempfile.mkdtemp(prefix="distcls-test-cache-")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (real HTTP); this process and every Ray worker point at it."""
    server = S3Server(port=0).start()
    previous = use_server_env(server)
    yield server
    server.stop()
    restore_env(previous)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray instance for the session, started after the S3 env is set so workers inherit it."""
    import ray

    from distcls.runtime import init_ray

    init_ray(num_cpus=RAY_TEST_CPUS)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photo shipped by scikit-image (Chelsea the cat, 300x451 RGB)."""
    from skimage import data

    return data.chelsea()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny valid-looking PNG whose header declares width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_bomb(photo: np.ndarray, width: int = 60000, height: int = 60000) -> bytes:
    """A real JPEG whose SOF0 header is rewritten to declare a huge size."""
    data = bytearray(encode(Image.fromarray(photo), "JPEG", quality=80))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture(scope="session")
def good_images(photo) -> dict[str, bytes]:
    """Real images in several formats, modes and sizes, all decodable."""
    rgb = Image.fromarray(photo)
    grey = rgb.convert("L")
    rgba = rgb.convert("RGBA")
    arr16 = np.asarray(grey, dtype=np.uint16) * 257
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    frames = [rgb.resize((64, 48)), grey.resize((64, 48)).convert("RGB")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return {
        "rgb.jpg": encode(rgb, "JPEG", quality=90),
        "grey.png": encode(grey, "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "palette.png": encode(rgb.convert("P"), "PNG"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "sixteen.png": encode(Image.fromarray(arr16), "PNG"),
        "exif_rotated.jpg": encode(rgb, "JPEG", exif=exif),
        "small.webp": encode(rgb.resize((40, 30)), "WEBP"),
        "anim.gif": gif.getvalue(),
        "tiny.bmp": encode(rgb.resize((7, 5)), "BMP"),
    }


@pytest.fixture(scope="session")
def bad_images(photo) -> dict[str, tuple[bytes, str]]:
    """Objects that are not usable images, with the error kind each must produce."""
    jpeg = encode(Image.fromarray(photo), "JPEG", quality=90)
    return {
        "corrupt.jpg": (b"\xff\xd8\xff\xe0" + os.urandom(2000), "corrupt"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "truncated"),
        "empty.png": (b"", "empty"),
        "notes.png": (b"these are some notes, not an image\n" * 20, "not_image"),
        "bomb.png": (png_bomb(), "too_large"),
        "bomb.jpg": (jpeg_bomb(photo), "too_large"),
    }


def alive_replicas(app: str, deployment: str = "ImageClassifier") -> dict[int, object]:
    """PID -> actor state of each live Ray Serve replica of `app`'s `deployment`, on this process's Ray
    instance (the address is explicit: other Ray instances may run on the same machine)."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("state", "=", "ALIVE")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return {a.pid: a for a in actors if a.class_name == f"ServeReplica:{app}:{deployment}"}


def tiny_fashion_mnist(bucket: str, train_per_class: int = 8, val_per_class: int = 4) -> dict[str, str]:
    """The tests' Fashion-MNIST (real images) under `bucket`: a few training images per class from the train
    split, a few validation images per class from the test split. -> {"train": URI, "val": URI}."""
    from distcls.tools.config import FashionMnistConfig
    from distcls.tools.fmnist import write_fashion_mnist

    write_fashion_mnist(
        FashionMnistConfig(out=f"{bucket}/fm", limit_per_class=train_per_class, splits=("train",)), progress=False
    )
    write_fashion_mnist(
        FashionMnistConfig(out=f"{bucket}/fmval", limit_per_class=val_per_class, splits=("test",)), progress=False
    )
    return {"train": f"{bucket}/fm/train", "val": f"{bucket}/fmval/test"}


def make_checkpoint(
    uri: str,
    classes: int | list[str] = 10,
    model: str = "efficientnet_lite0",
    weights: str = "bundled",
    image_size: int = 32,
    seed: int | None = None,
) -> str:
    """The tests' one way to write a fine-tuned-style checkpoint: `model` with a head for `classes` (a count,
    named class0.., or the names). ImageNet checkpoints come from distcls.checkpoint.from_pretrained."""
    import torch

    from distcls.checkpoint import save_checkpoint
    from distcls.models import create_model

    names = [f"class{i}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    if seed is not None:
        torch.manual_seed(seed)
    storage.ensure_bucket(uri)
    save_checkpoint(uri, create_model(model, len(names), weights, image_size=image_size).eval(), names)
    return uri


def tiny_train_config(fm: dict, storage: str, name: str, **kw):
    """The tests' small training run on `tiny_fashion_mnist` data: 32 px, batches of 8, 2 workers, 2 epochs."""
    from distcls.config import TrainConfig

    base = dict(
        data=fm["train"], val_data=fm["val"], image_size=32, batch_size=8, num_workers=2, storage=storage, name=name, epochs=2
    )
    return TrainConfig(**{**base, **kw})


def label_rows(paths: list[str], model: str = "m", **extra):
    """A table of `distcls label` output rows (every row labeled "x"), in the label job's own schema;
    `extra` adds columns (embedding, thumb) and then the schema is the one with embeddings."""
    import pyarrow as pa

    from distcls.label import output_schema

    n = len(paths)
    columns = {
        "path": paths,
        "label": ["x"] * n,
        "score": pa.array([1.0] * n, pa.float32()),
        "topk_labels": [["x"]] * n,
        "topk_scores": pa.array([[1.0]] * n, pa.list_(pa.float32())),
        "margin": pa.array([1.0] * n, pa.float32()),
        "entropy": pa.array([0.0] * n, pa.float32()),
        "ood_score": pa.array([-10.0] * n, pa.float32()),
        "error": pa.array([None] * n, pa.string()),
        "model": [model] * n,
        "labeled_at": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
        **extra,
    }
    return pa.table(columns, schema=output_schema(embeddings=bool(extra)))

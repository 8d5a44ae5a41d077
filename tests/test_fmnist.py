"""The Fashion-MNIST writer, reading Debian's official IDX files, into the loopback S3 server."""

import gzip
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from distcls import DistclsError, storage
from distcls.tools.config import FASHION_MNIST_DEFAULT_DIR, FashionMnistConfig
from distcls.tools.fmnist import CLASS_NAMES, existing_copy, load_split, parse_idx, write_fashion_mnist

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DEFAULT_DIR), reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)"
)


def test_official_files_load_with_expected_shapes():
    images, labels = load_split(FASHION_MNIST_DEFAULT_DIR, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


def test_cli_writes_limit_per_class_into_a_new_bucket(s3_server):
    """The issue's 'done when' command, as a separate process talking HTTP to the server."""
    out = "s3://fmnist-check/data"
    result = subprocess.run(
        [sys.executable, "-m", "distcls.cli", "data", "fashion-mnist", "--out", out, "--limit-per-class", "20"],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr
    for split in ("train", "test"):
        files = storage.list_files(f"{out}/{split}")
        assert len(files) == 200 and all(f.endswith(".png") for f in files)
        classes = {f[len(out) + len(split) + 2 :].split("/")[0] for f in files}
        assert classes == set(CLASS_NAMES)
    marker = existing_copy(out)
    assert marker["counts"]["train"] == {name: 20 for name in CLASS_NAMES}


def test_pngs_hold_the_official_pixels(tmp_path):
    out = str(tmp_path / "fm")
    write_fashion_mnist(FashionMnistConfig(out=out, limit_per_class=2, splits=("test",)), progress=False)
    images, labels = load_split(FASHION_MNIST_DEFAULT_DIR, "test")
    first_bag = int(np.flatnonzero(labels == CLASS_NAMES.index("bag"))[0])
    png = np.asarray(Image.open(f"{out}/test/bag/{first_bag}.png"))
    np.testing.assert_array_equal(png, images[first_bag])


def test_source_flag_accepts_raw_idx_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in os.listdir(FASHION_MNIST_DEFAULT_DIR):
        with gzip.open(os.path.join(FASHION_MNIST_DEFAULT_DIR, name)) as f, open(src / name[:-3], "wb") as g:
            shutil.copyfileobj(f, g)
    summary = write_fashion_mnist(FashionMnistConfig(out=str(tmp_path / "o"), limit_per_class=1, source=str(src)), progress=False)
    assert summary["total"] == 20


def test_damaged_source_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in os.listdir(FASHION_MNIST_DEFAULT_DIR):
        shutil.copy(os.path.join(FASHION_MNIST_DEFAULT_DIR, name), src / name)
    with gzip.open(src / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x02\x01\x02")
    with pytest.raises(DistclsError, match="does not match the official t10k-labels-idx1-ubyte"):
        write_fashion_mnist(FashionMnistConfig(out=str(tmp_path / "o"), source=str(src), splits=("test",)))
    assert not os.path.exists(tmp_path / "o" / "fashion-mnist.json")  # no marker: not complete


def test_parse_idx_rejects_garbage():
    with pytest.raises(DistclsError, match="not a uint8 IDX file"):
        parse_idx(b"hello world", "x")
    with pytest.raises(DistclsError, match="has 10 bytes, expected 12"):
        parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x04\x01\x02", "x")


def test_missing_source_folder():
    with pytest.raises(DistclsError, match="source folder /nonexistent/fm does not exist"):
        write_fashion_mnist(FashionMnistConfig(out="/tmp/unused", source="/nonexistent/fm"))

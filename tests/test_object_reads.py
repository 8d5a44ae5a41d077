"""Reads of image objects (objects.read_object): only under a root when one is given, only regular files
(a FIFO never blocks, a device is never read), never past the byte limit (on S3 judged before the body);
and `distcls review`, which reads what a labels file names, on such inputs: real files, FIFOs, symlinks, the
real S3 server and the real CLI in a process of its own (SIGTERM included)."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distcls import storage
from distcls.datasets import decode_sample, load_images
from distcls.label.manifest import Source
from distcls.label.parts import output_schema
from distcls.label.plan import StoredPlan
from distcls.objects import ObjectReadError, read_object
from distcls.transforms import PreprocessSpec
from tests.conftest import encode

DISTCLS = str(Path(sys.executable).with_name("distcls"))
SPEC = PreprocessSpec(image_size=32)


def png(color: tuple[int, int, int], size: int = 48) -> bytes:
    return encode(Image.new("RGB", (size, size), color), "PNG")


def read_in_thread(uri: str, timeout: float = 5.0, **kw):
    """read_object in a daemon thread: (result or exception, seconds); a read still blocked after `timeout`
    fails the test instead of hanging it."""
    out: list = []
    start = time.monotonic()

    def run() -> None:
        try:
            out.append(read_object(uri, **kw))
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert out, f"read_object({uri!r}) still blocked after {timeout} s"
    return out[0], time.monotonic() - start


@pytest.fixture
def tree(tmp_path):
    """root/ with a photo, a FIFO named x.png and /dev/zero linked as z.png; outside/ with a secret image."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a.png").write_bytes(png((0, 200, 0)))
    os.mkfifo(root / "x.png")
    os.symlink("/dev/zero", root / "z.png")
    (outside / "secret.png").write_bytes(png((255, 0, 0)))
    os.symlink(outside / "secret.png", root / "escape.png")
    return root, outside


def test_fifo_is_refused_at_once_and_never_blocks(tree):
    root, _ = tree
    result, took = read_in_thread(str(root / "x.png"))
    assert isinstance(result, ObjectReadError) and result.kind == "not_a_file" and took < 1.0
    batch = load_images({"path": np.asarray([str(root / "x.png"), str(root / "a.png")], dtype=object)}, SPEC)
    assert batch["error"][0].startswith("not_a_file: ") and batch["error"][1] == ""


def test_a_device_behind_a_symlink_is_refused(tree):
    root, _ = tree
    result, _ = read_in_thread(str(root / "z.png"))
    assert isinstance(result, ObjectReadError) and result.kind == "not_a_file"
    result, _ = read_in_thread("/dev/zero", root="/")
    assert isinstance(result, ObjectReadError) and result.kind == "not_a_file"


def test_an_object_over_the_limit_is_too_large(tree):
    root, _ = tree
    path = str(root / "a.png")
    size = os.path.getsize(path)
    assert read_object(path, max_bytes=size) == Path(path).read_bytes()
    with pytest.raises(ObjectReadError, match="over the") as exc:
        read_object(path, max_bytes=size - 1)
    assert exc.value.kind == "too_large"
    batch = load_images({"path": np.asarray([path], dtype=object)}, SPEC, max_bytes=size - 1)
    assert batch["error"][0].startswith("too_large: ")
    assert decode_sample([path], SPEC, max_bytes=size - 1) is None
    assert decode_sample([path], SPEC, max_bytes=size).shape == (1, 3, 32, 32)
    proc_file, _ = read_in_thread("/proc/self/status")  # st_size 0: read on to EOF, still within the limit
    assert isinstance(proc_file, bytes) and b"Pid:" in proc_file


def test_paths_outside_the_root_are_never_read(tree):
    root, outside = tree
    assert read_object(str(root / "a.png"), root=str(root)) == (root / "a.png").read_bytes()
    os.symlink(root / "a.png", root / "inside-link.png")
    assert read_object(str(root / "inside-link.png"), root=str(root)) == (root / "a.png").read_bytes()
    for uri in (
        str(root / "escape.png"),  # a symlink out of the root
        str(root / ".." / "outside" / "secret.png"),
        f"file://{outside}/secret.png",
        str(outside / "missing.png"),  # the same answer whether it exists or not
        str(root) + "2/a.png",  # a sibling that shares the root's name as a prefix
        "s3://bucket/root/a.png",
    ):
        with pytest.raises(ObjectReadError) as exc:
            read_object(uri, root=str(root))
        assert exc.value.kind == "outside_root", uri
    assert read_object(str(outside / "secret.png"), root=str(outside)) == (outside / "secret.png").read_bytes()


def test_s3_object_over_the_limit_is_refused_without_reading_its_body(s3_server):
    storage.ensure_bucket("s3://reads")
    big = os.urandom(4 << 20)
    storage.write_bytes("s3://reads/imgs/big.png", big)
    storage.write_bytes("s3://reads/imgs/small.png", b"x" * 1000)
    bodies = []

    def keep_body(parsed, **_):
        bodies.append(parsed["Body"])

    events = storage.s3_client().meta.events
    events.register("after-call.s3.GetObject", keep_body)
    try:
        with pytest.raises(ObjectReadError) as exc:
            read_object("s3://reads/imgs/big.png", max_bytes=1 << 20)
    finally:
        events.unregister("after-call.s3.GetObject", keep_body)
    assert exc.value.kind == "too_large" and "4.0 MB" in str(exc.value)
    assert len(bodies) == 1 and bodies[0]._amount_read == 0  # the GET's body was never read
    assert read_object("s3://reads/imgs/small.png", max_bytes=1000, root="s3://reads/imgs") == b"x" * 1000
    assert read_object("s3://reads/imgs/big.png") == big
    for uri in ("s3://reads/other/small.png", "s3://reads/imgs/../imgs/small.png", "s3://reads2/imgs/small.png"):
        with pytest.raises(ObjectReadError, match="outside"):
            read_object(uri, root="s3://reads/imgs")


# --- review ------------------------------------------------------------------------------------------------


def write_labels(folder: Path, paths: list[str], source_input: str | None) -> str:
    """A labels folder as `distcls label` writes it: one part, and _plan/_plan.json naming the source."""
    n = len(paths)
    rows = {
        "path": paths,
        "label": ["cat"] * n,
        "score": [0.5] * n,
        "topk_labels": [["cat", "dog"]] * n,
        "topk_scores": [[0.5, 0.4]] * n,
        "margin": [0.01 * (i + 1) for i in range(n)],  # rank = order given
        "entropy": [0.6] * n,
        "ood_score": [-3.0] * n,
        "error": [None] * n,
        "model": ["m"] * n,
        "labeled_at": [None] * n,
    }
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pydict(rows, schema=output_schema()), folder / "part-00000.parquet")
    StoredPlan.start(str(folder), Source(input=source_input), [])
    return str(folder)


def cards(index_html: str) -> dict[str, str]:
    """path -> the data URI of its card's thumbnail."""
    found = re.findall(r'<img src="(data:image/jpeg;base64,[^"]+)".*?<small class="path">([^<]*)</small>', index_html)
    return {path: src for src, path in found}


def tile_colour(data_uri: str) -> tuple[int, ...]:
    img = Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))).convert("RGB")
    return tuple(int(v) for v in np.asarray(img).reshape(-1, 3).mean(axis=0))


def test_review_reads_only_under_the_plans_source(tree, tmp_path):
    from distcls.cli import main

    root, outside = tree
    paths = [str(root / "a.png"), str(outside / "secret.png"), str(outside / "missing.png"), str(root / "x.png")]
    paths += [str(root / "escape.png"), str(root / "z.png")]
    labels = write_labels(tmp_path / "labels", paths, str(root))
    out = tmp_path / "review"
    assert main(["review", "--labels", labels, "--out", str(out), "--n", "10"]) == 0
    page = cards((out / "index.html").read_text())
    assert set(page) == set(paths)
    assert tile_colour(page[str(root / "a.png")])[1] > 150  # the green photo, read
    secret = page[str(outside / "secret.png")]
    outside_tiles = {page[str(p)] for p in (outside / "missing.png", root / "escape.png", root / "z.png")}
    assert outside_tiles == {secret}  # one "not read / outside root" tile: existence is not told
    assert tile_colour(secret)[0] < 230  # a grey tile, never the red secret
    fifo = page[str(root / "x.png")]  # "not read / not a file"
    assert fifo != secret and max(tile_colour(fifo)) - min(tile_colour(fifo)) < 10
    assert len(pq.read_table(out / "review.parquet")) == len(paths)

    wide = tmp_path / "wide"  # --root widens it: the secret is read
    assert main(["review", "--labels", labels, "--out", str(wide), "--root", str(tmp_path)]) == 0
    assert tile_colour(cards((wide / "index.html").read_text())[str(outside / "secret.png")])[0] > 200


def test_review_tile_for_a_path_outside_the_root():
    from distcls.plots import thumbnail

    for path in ("/etc/hostname", "/nonexistent/a.png"):
        assert thumbnail(path, root="/nonexistent-root") == (None, "not read\noutside root")


def test_review_without_a_plan_reads_nothing(tree, tmp_path):
    from distcls.config import ReviewConfig
    from distcls.curate.review import run_review

    root, _ = tree
    labels = write_labels(tmp_path / "labels", [str(root / "a.png")], None)
    result = run_review(ReviewConfig(labels=labels, out=str(tmp_path / "out")))
    assert result["not_read"] == 1 and result["root"] is None


# --- the real CLI in a process of its own --------------------------------------------------------------------


def test_cli_review_with_a_fifo_finishes(tree, tmp_path):
    root, _ = tree
    labels = write_labels(tmp_path / "labels", [str(root / "x.png"), str(root / "a.png")], str(root))
    result = subprocess.run(
        [DISTCLS, "review", "--labels", labels, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "review: 2 of 2 rows" in result.stdout and (tmp_path / "out" / "index.html").exists()


def test_sigterm_stops_cli_review_while_a_read_hangs(tmp_path):
    """An S3 endpoint that accepts connections and never answers: each GET waits out botocore's 60 s read
    timeout, 5 times. SIGTERM must stop the command within 10 s all the same."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        server.settimeout(90)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        labels = write_labels(tmp_path / "labels", ["s3://hang/imgs/a.png", "s3://hang/imgs/b.png"], "s3://hang/imgs")
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        proc = subprocess.Popen(
            [DISTCLS, "review", "--labels", labels, "--out", str(tmp_path / "out")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            held, _ = server.accept()  # a GET is on its way and will get no answer
            time.sleep(1.0)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=10)
            took = time.monotonic() - start
            held.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 143 and "terminated" in stderr, stderr
    assert took < 10

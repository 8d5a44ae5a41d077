"""The storage module against the local disk and the loopback S3 server over real HTTP."""

import os
import subprocess
import sys

import botocore.exceptions
import pytest

from distcls import DistclsError, storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, s3_server):
    if request.param == "local":
        return str(tmp_path / "root")
    uri = f"s3://storage-test/{os.urandom(4).hex()}"
    storage.ensure_bucket(uri)
    return uri


def test_write_read_list(root):
    storage.write_bytes(f"{root}/a/1.PNG", b"one")
    storage.write_text(f"{root}/a/b/2.txt", "two")
    storage.write_bytes(f"{root}/c.jpg", b"three")
    assert storage.read_bytes(f"{root}/a/1.PNG") == b"one"
    assert storage.read_text(f"{root}/a/b/2.txt") == "two"
    assert storage.list_files(root) == [f"{root}/a/1.PNG", f"{root}/a/b/2.txt", f"{root}/c.jpg"]
    assert storage.list_files(root, [".png", ".jpg"]) == [f"{root}/a/1.PNG", f"{root}/c.jpg"]
    assert storage.exists(f"{root}/c.jpg") and not storage.exists(f"{root}/nope")


def test_write_many_counts_and_reports_progress(root):
    seen = []
    n = storage.write_many(((f"{root}/m/{i}.bin", bytes([i])) for i in range(100)), workers=8, on_done=seen.append)
    assert n == 100 and sum(seen) == 100
    assert len(storage.list_files(f"{root}/m")) == 100
    assert storage.read_bytes(f"{root}/m/42.bin") == bytes([42])


def test_local_write_is_atomic(tmp_path):
    target = tmp_path / "x.json"
    storage.write_text(str(target), "old")
    storage.write_text(str(target), "new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["x.json"]  # no temporary file left behind


def test_missing_prefix_and_bucket(s3_server):
    with pytest.raises(DistclsError, match=r"s3://storage-test/does-not-exist does not exist"):
        storage.list_files("s3://storage-test/does-not-exist")
    with pytest.raises(DistclsError, match=r"bucket of s3://no-such-bucket-x/k does not exist; create it"):
        storage.read_bytes("s3://no-such-bucket-x/k")


def test_ensure_bucket_creates_it(s3_server):
    storage.ensure_bucket("s3://fresh-bucket-1/some/prefix")
    storage.write_text("s3://fresh-bucket-1/some/prefix/x", "y")
    assert storage.read_text("s3://fresh-bucket-1/some/prefix/x") == "y"


def test_bad_uris():
    with pytest.raises(DistclsError, match="unsupported URI scheme 'ftp'"):
        storage.split_uri("ftp://host/x")
    with pytest.raises(DistclsError, match="names no bucket"):
        storage.split_uri("s3://")
    with pytest.raises(DistclsError, match="invalid bucket name"):
        storage.ensure_bucket("s3://ab/x")


def test_access_denied_is_one_clear_line():
    # A real botocore ClientError, as S3 sends it for a forbidden key.
    exc = botocore.exceptions.ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
    err = storage.explain_error("s3://private/k", exc)
    assert str(err) == "storage: access denied to s3://private/k; grant this identity read/write on it or use another URI"


def test_missing_credentials_message(s3_server, tmp_path):
    """A separate process without credentials (botocore reads them at client creation)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3_server.endpoint_url, AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    code = "from distcls import storage; storage.read_bytes('s3://storage-test/x')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "no credentials for s3://storage-test/x; set AWS_ACCESS_KEY_ID" in result.stderr


def test_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(DistclsError, match=r"cannot reach http://127.0.0.1:9 for s3://b1x/k; start the server"):
        storage.read_bytes("s3://b1x/k")

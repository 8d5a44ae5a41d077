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


def record_syncs(monkeypatch) -> list[tuple[str, str]]:
    """('fsync', path) and ('replace', target) in call order: the real calls, watched through a wrapper
    (the path of an fsynced descriptor is read back from /proc)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads fsynced paths back from /proc")
def test_local_write_is_durable(tmp_path, monkeypatch):
    """Power loss after a write must not leave an empty file: the data is fsynced before the rename, the
    folder after it, and each folder the write created in its parent."""
    events = record_syncs(monkeypatch)
    target = tmp_path / "new" / "deeper" / "part-0.parquet"
    storage.write_bytes(str(target), b"rows")
    tmp_fsync = [i for i, (kind, path) in enumerate(events) if kind == "fsync" and ".tmp-" in path]
    rename = events.index(("replace", str(target)))
    assert len(tmp_fsync) == 1 and tmp_fsync[0] < rename, events  # the data is on disk before the rename
    assert events[tmp_fsync[0]][1].startswith(f"{target}.tmp-")
    after = {path for kind, path in events[rename:] if kind == "fsync"}
    assert str(target.parent) in after, events  # the rename itself is on disk
    created = {path for kind, path in events[:rename] if kind == "fsync"}
    assert {str(tmp_path), str(tmp_path / "new")} <= created, events  # new folders' entries too
    assert target.read_bytes() == b"rows" and os.listdir(target.parent) == ["part-0.parquet"]

    events.clear()
    storage.write_text(str(target), "rewritten")  # an existing folder: one file and one folder fsync
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"], events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads fsynced paths back from /proc")
def test_local_checkpoint_write_is_durable(tmp_path, monkeypatch):
    """A checkpoint's files (weights, train state, distcls.json) and the folder that holds them; and a tree
    another library wrote without fsync (Ray Train's copy of a checkpoint into local storage)."""
    from distcls.checkpoint import META, WEIGHTS, save_checkpoint
    from distcls.models import create_model

    events = record_syncs(monkeypatch)
    ckpt = tmp_path / "run" / "checkpoint_1"
    model = create_model("mobilenet_v3_small", 3, "none", image_size=32)
    save_checkpoint(str(ckpt), model, ["a", "b", "c"], files={"train_state.pt": b"state"})
    synced = [path for kind, path in events if kind == "fsync"]
    for name in (WEIGHTS, "train_state.pt", META):
        assert any(p.startswith(f"{ckpt / name}.tmp-") for p in synced), (name, synced)
    assert str(ckpt) in synced and str(tmp_path / "run") in synced

    copied = tmp_path / "copy" / "checkpoint_2"
    copied.mkdir(parents=True)
    for name in os.listdir(ckpt):
        (copied / name).write_bytes((ckpt / name).read_bytes())
    events.clear()
    storage.sync_local_tree(str(copied))
    expected = {str(copied / name) for name in os.listdir(ckpt)} | {str(copied), str(copied.parent)}
    assert {path for _, path in events} == expected


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
    env.update(
        AWS_ENDPOINT_URL=s3_server.endpoint_url,
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    code = "from distcls import storage; storage.read_bytes('s3://storage-test/x')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "no credentials for s3://storage-test/x; set AWS_ACCESS_KEY_ID" in result.stderr


def test_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(DistclsError, match=r"cannot reach http://127.0.0.1:9 for s3://b1x/k; start the server"):
        storage.read_bytes("s3://b1x/k")

"""URIs -> filesystems: local paths, file://, s3:// (any S3-compatible server), gs://.

S3 honours the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_DEFAULT_REGION / AWS_REGION, AWS_PROFILE). No Ray in this module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import fsspec

from distcls import DistclsError

# botocore's standard mode: throttling (503 SlowDown), 500s and dropped connections are retried with
# jittered exponential backoff; permanent errors (403 AccessDenied, 404) fail at once. 5 attempts: at a
# 5% fault rate one request in 3*10^6 still fails; more would also make an unreachable endpoint take
# half a minute (instead of ~8 s) to report.
RETRIES = {"max_attempts": 5, "mode": "standard"}


def split_uri(uri: str) -> tuple[str, str]:
    """'s3://b/k' -> ('s3', 'b/k'); 'file:///x' and '/x' -> ('file', '/x'); relative paths are made absolute."""
    if not uri:
        raise DistclsError("storage: an empty URI was given; pass a local path, file://, s3:// or gs:// URI")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "file", os.path.abspath(os.path.expanduser(uri))
    scheme = scheme.lower()
    if scheme == "file":
        return "file", os.path.abspath(rest)
    if scheme in ("s3", "s3a", "gs", "gcs"):
        scheme = {"s3a": "s3", "gcs": "gs"}.get(scheme, scheme)
        rest = rest.strip("/")
        if not rest:
            raise DistclsError(f"storage: {uri!r} names no bucket; write it as {scheme}://BUCKET/PREFIX")
        return scheme, rest
    raise DistclsError(f"storage: unsupported URI scheme {scheme!r} in {uri!r}; use a local path, file://, s3:// or gs://")


def join_uri(uri: str, *parts: str) -> str:
    """Join path parts onto a URI without touching its scheme."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return os.path.join(uri, *parts)
    return f"{scheme}://" + posixpath.join(rest.rstrip("/") or "/", *parts)


def to_uri(scheme: str, path: str) -> str:
    return path if scheme == "file" else f"{scheme}://{path}"


def absolute_uri(uri: str) -> str:
    """A local path made absolute (processes such as Ray Tune's trials run elsewhere); other URIs as given."""
    return to_uri(*split_uri(uri))


def s3_options() -> dict:
    """s3fs arguments from the standard AWS environment variables (read at call time)."""
    opts: dict = {"use_listings_cache": False}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    # The region comes from botocore's own reading of AWS_DEFAULT_REGION / AWS_REGION / the profile.
    # Credentials are left to botocore's own chain (env, profile, instance role), but they are part of
    # the cache key so that changing them in one process is honoured.
    opts["config_kwargs"] = {"retries": dict(RETRIES), "connect_timeout": 5}
    opts["_cache_key"] = (os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    return opts


_S3_CACHE: dict[str, fsspec.AbstractFileSystem] = {}


def get_filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a URI to an fsspec filesystem and the path inside it."""
    scheme, path = split_uri(uri)
    if scheme == "file":
        return fsspec.filesystem("file"), path
    if scheme == "s3":
        opts = s3_options()
        key = repr(sorted(opts.items()))
        if key not in _S3_CACHE:
            opts.pop("_cache_key")
            _S3_CACHE[key] = fsspec.filesystem("s3", skip_instance_cache=True, **opts)
        return _S3_CACHE[key], path
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        raise DistclsError(f"storage: {uri!r} needs gcsfs; install it with `pip install gcsfs`") from None
    return fsspec.filesystem("gs"), path


def get_pyarrow_filesystem(uri: str):
    """(pyarrow.fs.FileSystem, path) for libraries that take a pyarrow filesystem (Ray Data, Parquet)."""
    import pyarrow.fs as pafs

    fs, path = get_filesystem(uri)
    if split_uri(uri)[0] == "file":
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _client_error_code(exc: BaseException) -> str | None:
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
    return None


def explain_error(uri: str, exc: BaseException) -> DistclsError:
    """Turn a storage exception into one line naming the URI and the fix."""
    if isinstance(exc, DistclsError):
        return exc
    name = type(exc).__name__
    code = _client_error_code(exc) or ""
    text = f"{name} {code} {exc}"
    if "NoCredentials" in text or "Unable to locate credentials" in text:
        return DistclsError(
            f"storage: no credentials for {uri}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return DistclsError(f"storage: credentials rejected for {uri}; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if "AccessDenied" in text or isinstance(exc, PermissionError) or "Forbidden" in text:
        return DistclsError(f"storage: access denied to {uri}; grant this identity read/write on it or use another URI")
    if "InvalidBucketName" in text or "bucket is not valid" in text:
        return DistclsError(f"storage: invalid bucket name in {uri}; use 3-63 lowercase letters, digits, '-' or '.'")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return DistclsError(f"storage: bucket of {uri} does not exist; create it or fix the URI")
    if "EndpointConnectionError" in text or "Could not connect" in text or isinstance(exc, ConnectionError):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
        return DistclsError(f"storage: cannot reach {endpoint} for {uri}; start the server or fix AWS_ENDPOINT_URL")
    if isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404"):
        return DistclsError(f"storage: {uri} does not exist; check the path")
    if isinstance(exc, IsADirectoryError):
        return DistclsError(f"storage: {uri} is a folder, not a file")
    return DistclsError(f"storage: {name} on {uri}: {exc}".splitlines()[0])


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except DistclsError:
        raise
    except Exception as exc:
        raise explain_error(uri, exc) from exc


def exists(uri: str) -> bool:
    fs, path = get_filesystem(uri)
    with storage_errors(uri):
        return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    scheme, path = split_uri(uri)
    with storage_errors(uri):
        if scheme == "s3":
            # The per-object hot path (every image read): boto3 costs ~40% of s3fs's CPU per GET.
            return get_object(path)
        fs, path = get_filesystem(uri)
        return fs.cat_file(path)


def get_object(path: str, read: Callable[[dict], bytes] | None = None) -> bytes:
    """GET bucket/key. botocore retries a failed request, but not a body that breaks off midway (a reset
    or a short read while streaming): those are retried here, with the same kind of backoff. `read` turns
    the GET response into the bytes (default: the whole body); objects.read_object passes one that refuses
    an object over its limit from the response's Content-Length, before any of its body is read."""
    import botocore.exceptions
    import urllib3.exceptions

    bucket, _, key = path.partition("/")
    broken = (
        botocore.exceptions.IncompleteReadError,
        botocore.exceptions.ResponseStreamingError,
        botocore.exceptions.ReadTimeoutError,
        urllib3.exceptions.ProtocolError,
        ConnectionError,
    )
    for attempt in range(RETRIES["max_attempts"]):
        try:
            response = s3_client().get_object(Bucket=bucket, Key=key)
            return read(response) if read is not None else response["Body"].read()
        except broken:
            if attempt + 1 == RETRIES["max_attempts"]:
                raise
            time.sleep(random.random() * min(20.0, 2.0**attempt))
    raise AssertionError("unreachable")


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: readers see the old object, or the new one, never half of it.

    Local files go to a temporary name in the same folder, are fsynced and renamed (see
    write_local_durably); S3/GCS PUTs are atomic.
    """
    scheme, path = split_uri(uri)
    fs, path = get_filesystem(uri)
    with storage_errors(uri):
        if scheme == "file":
            write_local_durably(path, data)
        elif scheme == "s3":
            bucket, _, key = path.partition("/")
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        else:
            fs.pipe_file(path, data)


def write_local_durably(path: str, data: bytes) -> None:
    """Temporary file in the same folder, fsync, rename, fsync the folder: after a crash or power loss the
    path holds the old bytes or the new ones, never an empty or partial file (rename alone does not
    promise that: the data may still be in the page cache when the rename reaches the disk)."""
    folder = os.path.dirname(path) or "."
    make_folders_durably(folder)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_folder(folder)


def make_folders_durably(folder: str) -> None:
    """os.makedirs, then fsync the parent of each folder it created, so the new entries survive a crash."""
    created = []
    probe = os.path.abspath(folder)
    while not os.path.isdir(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(folder, exist_ok=True)
    for new in reversed(created):
        fsync_folder(os.path.dirname(new))


def sync_local_tree(folder: str) -> None:
    """fsync every file and folder under a local `folder` and its entry in the parent: for trees that other
    code wrote without fsync (Ray Train copies checkpoints into local storage that way)."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_folder(root)
    fsync_folder(os.path.dirname(os.path.abspath(folder)))


def fsync_folder(folder: str) -> None:
    """Make a rename or a new entry in `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows: folders cannot be opened (NTFS makes renames durable itself)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot sync a folder
            raise
    finally:
        os.close(fd)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_many(items: Iterable[tuple[str, bytes]], workers: int = 16, on_done: Callable[[int], None] | None = None) -> int:
    """Write many small objects concurrently (threads hide per-request latency); returns the count."""
    count = 0
    pending: list = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for uri, data in items:
            pending.append(pool.submit(write_bytes, uri, data))
            if len(pending) >= workers * 8:
                count += _drain(pending, on_done)
        count += _drain(pending, on_done)
    return count


_BOTO: dict = {}


def s3_client():
    """A thread-safe boto3 S3 client for the current AWS environment (cached per endpoint/credentials).

    Used for single-object GET/PUT, the per-image hot path: botocore's sync client costs about 40% of
    the CPU per request that s3fs's async stack does. Listing and filesystem operations use s3fs.
    """
    import boto3
    import botocore.config

    key = repr(sorted(s3_options().items()))
    if key not in _BOTO:
        cfg = botocore.config.Config(max_pool_connections=64, connect_timeout=5, retries=dict(RETRIES))
        _BOTO[key] = boto3.session.Session().client("s3", config=cfg)
    return _BOTO[key]


def _drain(pending: list, on_done: Callable[[int], None] | None) -> int:
    for fut in pending:
        fut.result()
    n = len(pending)
    if on_done and n:
        on_done(n)
    pending.clear()
    return n


def list_files(uri: str, extensions: Iterable[str] | None = None) -> list[str]:
    """Every file under a prefix, recursively, as full URIs in sorted order.

    `extensions` (e.g. {'.png', '.jpg'}) filters case-insensitively.
    """
    return sorted(iter_files(uri, extensions))


def iter_files(uri: str, extensions: Iterable[str] | None = None) -> Iterator[str]:
    scheme, _ = split_uri(uri)
    fs, path = get_filesystem(uri)
    exts = tuple(e.lower() for e in extensions) if extensions else None
    with storage_errors(uri):
        if not fs.exists(path):
            raise DistclsError(f"storage: {uri} does not exist; check the path (nothing to list)")
        if not fs.isdir(path):
            raise DistclsError(f"storage: {uri} is a file, not a folder or prefix")
        for _root, _dirs, files in fs.walk(path, detail=True):
            for full, info in ((f["name"], f) for f in files.values()):
                if info.get("type") == "directory":
                    continue
                if exts and not full.lower().endswith(exts):
                    continue
                yield to_uri(scheme, full if scheme == "file" else full.lstrip("/"))


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an s3:// URI when it is missing (no-op for local paths)."""
    scheme, path = split_uri(uri)
    if scheme == "file":
        os.makedirs(path, exist_ok=True)
        return
    fs, _ = get_filesystem(uri)
    bucket = path.split("/", 1)[0]
    with storage_errors(f"{scheme}://{bucket}"):
        if not fs.exists(bucket):
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            # us-east-1 is the one region that must not be named as a LocationConstraint.
            fs.mkdir(bucket, **({"region_name": region} if region and region != "us-east-1" else {}))


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = get_filesystem(uri)
    with storage_errors(uri):
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

"""Reading image objects: the bytes of one image (what label, review, evaluate and training read), within
limits that a hostile path list cannot get around. Only under a root when one is given, only regular files
(never a FIFO, device or socket, and never blocking), never more than --max-object-mb; anything else is an
ObjectReadError whose `kind` (not_a_file, too_large, outside_root) becomes the row's error.
"""

from __future__ import annotations

import errno
import os
import stat

from distcls import DistclsError, storage

DEFAULT_MAX_OBJECT_BYTES = 256 << 20  # --max-object-mb's default
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class ObjectReadError(DistclsError):
    """An image object that was not read, by `kind`: not_a_file, too_large or outside_root. Callers make it
    an error row, `row` ("kind: message")."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def row(self) -> str:
        return f"{self.kind}: {self}"


def max_object_bytes(mb: float | None) -> int:
    """--max-object-mb -> bytes; None is the default (256 MB)."""
    return DEFAULT_MAX_OBJECT_BYTES if mb is None else int(mb * (1 << 20))


def too_large(uri: str, size: int | None, limit: int) -> ObjectReadError:
    what = f"is {size / 2**20:.1f} MB" if size is not None else "is larger than that"
    return ObjectReadError("too_large", f"{uri} {what}, over the {limit / 2**20:g} MB limit; raise --max-object-mb to read it")


def read_object(uri: str, max_bytes: int | None = DEFAULT_MAX_OBJECT_BYTES, root: str | None = None) -> bytes:
    """The bytes of one image object (what label, review, evaluate and training read), within limits that a
    hostile path list cannot get around (ObjectReadError otherwise):
    - with `root`, a URI outside it is never read (a local path after resolving its symlinks);
    - only regular files: a FIFO, device or socket is refused before it is opened, and the file is opened
      non-blocking and checked again, so nothing blocks;
    - never more than `max_bytes` (None: the default): a bigger object is refused from its size before its
      bytes are read (on S3 from the GET's Content-Length, the body left unread)."""
    limit = max_object_bytes(None) if max_bytes is None else max_bytes
    scheme, path = storage.split_uri(uri)
    if scheme == "file":
        path = os.path.realpath(path)
    if root is not None:
        check_under_root(uri, scheme, path, root)
    with storage.storage_errors(uri):
        if scheme == "file":
            return read_local(path, limit, uri)
        if scheme == "s3":
            return storage.get_object(path, read=lambda response: read_body(response, limit, uri))
        fs, path = storage.get_filesystem(uri)
        size = fs.info(path).get("size")
        if size is not None and size > limit:
            raise too_large(uri, size, limit)
        with fs.open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise too_large(uri, None, limit)
        return data


def check_under_root(uri: str, scheme: str, path: str, root: str) -> None:
    """ObjectReadError outside_root unless (scheme, path) lies under `root` (local paths already resolved)."""
    root_scheme, base = storage.split_uri(root)
    if root_scheme == "file":
        base = os.path.realpath(base)
        inside = path == base or path.startswith(base.rstrip(os.sep) + os.sep)
    else:  # a key with . or .. segments may be normalised on its way (a proxy, another S3 server): refused
        dotted = any(part in (".", "..") for part in path.split("/"))
        inside = not dotted and (path == base or path.startswith(base.rstrip("/") + "/"))
    if root_scheme != scheme or not inside:
        raise ObjectReadError("outside_root", f"{uri} is outside {root}; only objects under the root are read (see --root)")


def read_local(path: str, limit: int, uri: str) -> bytes:
    """A resolved local path: regular files only, never blocking, at most `limit` bytes."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # before opening: opening a device can act on its own
        raise ObjectReadError("not_a_file", f"{uri} is not a regular file (a FIFO, device, socket or folder)")
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # replaced by a symlink, or a socket, since the check
            raise ObjectReadError("not_a_file", f"{uri} changed while it was read, or is not a regular file") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ObjectReadError("not_a_file", f"{uri} is not a regular file (it changed while it was read)")
        if st.st_size > limit:
            raise too_large(uri, st.st_size, limit)
        parts = [f.read(st.st_size + 1)]  # +1 sees a file that grew since fstat, or reports size 0 (/proc)
        total = len(parts[0])
        while st.st_size < total <= limit:
            parts.append(f.read(min(1 << 20, limit + 1 - total)))
            if not parts[-1]:
                break
            total += len(parts[-1])
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(data) > limit:
        raise too_large(uri, None, limit)
    return data


def read_body(response: dict, max_bytes: int | None, uri: str) -> bytes:
    """A GET response's body, refused unread when its Content-Length is over max_bytes (None: no limit)."""
    body = response["Body"]
    if max_bytes is None:
        return body.read()
    size = response.get("ContentLength")
    if size is not None and size > max_bytes:
        body.close()  # the connection is dropped, not drained
        raise too_large(uri, size, max_bytes)
    data = body.read() if size is not None else body.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(uri, None, max_bytes)
    return data

"""Confinement: the paths a labeling job may read. Nothing in a manifest or in OUTPUT/_plan is trusted: every
path is confined (`confine`, vectorised on the Arrow column) to the job's root (`source_root`) before it can
be read: --input; without it an S3 Inventory's sourceBucket, or the scheme and bucket of a manifest's first
path. A path outside gets an `outside_input` error row.
"""

from __future__ import annotations

import posixpath

import numpy as np

from distcls import DistclsError, storage
from distcls.label.manifest import Source, iter_manifest, manifest_listers, read_inventory

OUTSIDE = "outside_input"
DOT_SEGMENT = r"/\.\.?(/|$)"  # a `.` or `..` segment: such paths are normalised (in Python) before the check


def source_root(source: Source) -> str | None:
    """The prefix every path of the job must be under: --input; without it, an S3 Inventory's sourceBucket,
    or the scheme and bucket of a manifest's first path (any local path when that is local: one scheme); None
    when a manifest holds no path. An inventory with an --input outside its sourceBucket is refused. Cheap:
    the driver reads manifest.json, or a key list's first batch."""
    inventory = bool(source.manifest) and source.manifest.endswith("manifest.json")
    bucket = read_inventory(source.manifest)[4] if inventory else None
    if source.input:
        root = storage.to_uri(*storage.split_uri(source.input))
        if bucket and not root_prefix(root).startswith(f"s3://{bucket}/"):
            raise DistclsError(
                f"label: --input {source.input} is outside the S3 Inventory's sourceBucket s3://{bucket} "
                f"({source.manifest}); give an --input under s3://{bucket}, or leave --input out"
            )
        return root
    if bucket:
        return f"s3://{bucket}"
    listers = manifest_listers(source.manifest)
    first = next((p for lister in listers for p in iter_manifest(lister.uris[0], lister.format, None)), None)
    if first is None:
        return None
    scheme, path = storage.split_uri(first)
    return "/" if scheme == "file" else f"{scheme}://{path.split('/', 1)[0]}"


def root_prefix(root: str) -> str:
    """What every path under `root` starts with: 's3://b/in/' for s3://b/in, '/data/in/' for a local root."""
    scheme, path = storage.split_uri(root)
    return path.rstrip("/") + "/" if scheme == "file" else f"{scheme}://{path}/"


def paths_under_root(paths, root: str) -> np.ndarray:
    """Which of `paths` (an Arrow string column) are under `root`, segment by segment (s3://b/in does not
    admit s3://b/input2/x), as a bool array. Arrow compute does the work; the rare path with a `.` or `..`
    segment is normalised (with duplicate slashes) in Python and must stay below the root too. A local root
    admits absolute paths and file:// URIs only (a relative path would resolve against a worker's folder)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    paths = pa.chunked_array([paths]) if isinstance(paths, pa.Array) else paths
    prefix = root_prefix(root)
    if storage.split_uri(root)[0] == "file":
        paths = pc.replace_substring_regex(paths, pattern="^file://", replacement="", max_replacements=1)
    ok = np.array(pc.fill_null(pc.starts_with(paths, prefix), False).to_numpy(zero_copy_only=False), dtype=bool)
    dotted = np.asarray(pc.fill_null(pc.match_substring_regex(paths, DOT_SEGMENT), False).to_numpy(zero_copy_only=False))
    rows = np.flatnonzero(ok & dotted.astype(bool))
    for i, path in zip(rows, paths.take(pa.array(rows, pa.int64())).to_pylist(), strict=True):
        ok[i] = posixpath.normpath("r/" + path[len(prefix) :]).startswith("r/")  # `r`: the root itself
    return ok


def confine(table, root: str | None):
    """(path, error) rows -> the same rows, those not under `root` with an `outside_input` error instead (a row
    with an error is never read). `root` None (--allow-any-path) confines nothing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if root is None or not len(table):
        return table
    outside = ~paths_under_root(table.column("path"), root)
    if not outside.any():
        return table
    message = f"{OUTSIDE}: not under {root}, where this job's paths must be; not read (--allow-any-path reads it)"
    error = pc.if_else(pa.array(outside), message, table.column("error").combine_chunks())
    return table.set_column(table.schema.get_field_index("error"), "error", error)

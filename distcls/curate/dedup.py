"""`distcls dedup`: near-duplicate groups inside a labeled bucket, and leakage between two (train vs test).

Input: what `distcls label --embeddings` writes: `embedding` (the model's pooled features, float16) and
`thumb` (a 16x16 grey thumbnail of the model input). Two steps:
1. Candidates: for every image its K_NEIGHBOURS nearest images by cosine similarity of the embeddings, kept
   when at least --threshold (0.6). A fine-tuned classifier's features put different photos of similar
   things close (measured: distinct Fashion-MNIST images reach 0.976) and a resized, re-encoded copy can
   fall to 0.70, so the embedding alone cannot decide; it finds who to compare.
2. Confirmation: a candidate pair is a near-duplicate when the Pearson correlation of the two thumbnails is
   at least --pixel-corr (0.997): re-encoded and resized copies measured >= 0.998, distinct images <= 0.996.
   Without thumbnails (labels written before they existed), the embedding threshold alone decides.
Groups are the connected components of the pairs. With --against, only pairs across the two sets count.

Search cost (N embeddings of dimension d): up to EXACT_MAX, exact blocked search (blocks of rows times all
rows, float32 matrix products, top-K per row): N^2 d multiply-adds, a block of similarities in memory
(about 800 MB). Beyond: a faiss inverted-file index (IndexIVFFlat, inner product on normalised vectors),
4*sqrt(N) lists, NPROBE searched per query: about N^2 d NPROBE / (4 sqrt(N)) multiply-adds plus k-means;
approximate (a neighbour in a list not probed is missed). Output in --out: pairs.parquet (a, b,
similarity, thumb_correlation), groups.parquet (group, path, label), dedup.json (counts, method,
thresholds, seconds) and contact_sheet.png (the largest groups, one row each).
"""

from __future__ import annotations

import io
import json
import math
import time

import numpy as np

from distcls import DistclsError, storage
from distcls.config import DedupConfig

EXACT_MAX = 200_000
NPROBE = 16
TRAIN_PER_LIST = 16
K_NEIGHBOURS = 16


def load_embeddings(uri: str) -> tuple[list[str], list[str | None], np.ndarray, np.ndarray | None]:
    """(paths, labels, unit-norm float32 embeddings, thumbnails (N, 256) uint8 or None) of a labels folder's
    good rows. Rows whose embedding holds a NaN or an infinity are left out (and counted on stdout); a
    folder with embeddings of two sizes (a rerun with another model) is refused."""
    import pyarrow.compute as pc

    from distcls.label import read_labels

    table = read_labels(uri)
    if "embedding" not in table.column_names:
        raise DistclsError(f"dedup: {uri} has no `embedding` column; label it with `distcls label --embeddings` (a new --output)")
    table = table.filter(pc.and_(pc.is_null(table["error"]), pc.invert(pc.is_null(table["embedding"]))))
    if table.num_rows == 0:
        raise DistclsError(f"dedup: {uri} has no rows with an embedding")
    d = check_one_size(uri, table)
    flat = table["embedding"].combine_chunks()
    vectors = np.asarray(flat.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        print(f"dedup: {int((~finite).sum())} row(s) of {uri} have a NaN or infinite embedding; left out", flush=True)
        table, vectors = table.filter(pa_mask(finite)), vectors[finite]
        if table.num_rows == 0:
            raise DistclsError(f"dedup: {uri} has no rows with a finite embedding")
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    thumbs = None
    if "thumb" in table.column_names and table["thumb"].null_count == 0:
        raw = b"".join(table["thumb"].to_pylist())
        thumbs = np.frombuffer(raw, dtype=np.uint8).reshape(table.num_rows, -1)
    return table["path"].to_pylist(), table["label"].to_pylist(), vectors, thumbs


def pa_mask(keep: np.ndarray):
    import pyarrow as pa

    return pa.array(keep, type=pa.bool_())


def check_one_size(uri: str, table) -> int:
    """The embeddings' one dimension; two sizes in one folder come from two models, whose features cannot be
    compared: refused, naming a model of each size."""
    import pyarrow.compute as pc

    sizes = np.asarray(pc.list_value_length(table["embedding"]).to_numpy(zero_copy_only=False))
    found = np.unique(sizes)
    if len(found) == 1 and found[0] > 0:
        return int(found[0])
    if len(found) == 1:
        raise DistclsError(f"dedup: {uri} has empty embeddings; label it again with `distcls label --embeddings`")
    models = table["model"].to_pylist() if "model" in table.column_names else [None] * table.num_rows
    first = {int(n): models[int(np.argmax(sizes == n))] for n in found[:2]}
    (d1, m1), (d2, m2) = first.items()
    raise DistclsError(
        f"dedup: {uri} mixes {d1}-d embeddings (model {m1}) and {d2}-d ones (model {m2}), the rows of two labeling "
        "runs with different models; label again into a new --output with one model and dedup that"
    )


def block_rows(n: int) -> int:
    """Rows per block so that a block of similarities stays near 800 MB."""
    return int(max(64, min(4096, 2e8 // max(1, n))))


def exact_pairs(a: np.ndarray, b: np.ndarray | None, threshold: float, k: int = K_NEIGHBOURS):
    """For every row of `a`, its k nearest rows of `b` (or of `a`, itself excluded) with similarity >=
    threshold: (i, j, similarity), each pair once inside one set."""
    same = b is None
    b = a if same else b
    k = min(k, len(b) - (1 if same else 0))
    out_i, out_j, out_s = [], [], []
    step = block_rows(len(b))
    for start in range(0, len(a), step):
        sims = a[start : start + step] @ b.T
        rows = np.arange(start, start + len(sims))
        if same:
            sims[np.arange(len(sims)), rows] = -np.inf
        if k <= 0:
            continue
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_s = np.take_along_axis(sims, top, axis=1)
        keep = top_s >= threshold
        out_i.append(np.repeat(rows[:, None], k, axis=1)[keep])
        out_j.append(top[keep])
        out_s.append(top_s[keep])
    return unique_pairs(out_i, out_j, out_s, same)


def unique_pairs(out_i, out_j, out_s, same: bool):
    cat = np.concatenate
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, sims = cat(out_i).astype(np.int64), cat(out_j).astype(np.int64), cat(out_s).astype(np.float32)
    if same:  # (i, j) and (j, i) are one pair
        i, j = np.minimum(i, j), np.maximum(i, j)
        _, first = np.unique(i * (j.max() + 1 if len(j) else 1) + j, return_index=True)
        i, j, sims = i[first], j[first], sims[first]
    return i, j, sims


def ivf_pairs(a: np.ndarray, b: np.ndarray | None, threshold: float, k: int = K_NEIGHBOURS):
    """Approximate: each vector of `a` against an IVF index of `b` (or of `a`), k neighbours each."""
    import faiss

    same = b is None
    base = a if same else b
    nlist = max(16, int(4 * math.sqrt(len(base))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(base.shape[1]), base.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10  # k-means: TRAIN_PER_LIST points per list, 10 rounds (the index's cost, not its recall)
    index.cp.min_points_per_centroid = 1
    rng = np.random.default_rng(0)
    index.train(base[rng.choice(len(base), size=min(len(base), nlist * TRAIN_PER_LIST), replace=False)])
    index.add(base)
    index.nprobe = NPROBE
    kk = k + (1 if same else 0)
    out_i, out_j, out_s = [], [], []
    for start in range(0, len(a), 65536):
        sims, nbrs = index.search(a[start : start + 65536], kk)
        rows = np.repeat(np.arange(start, start + len(sims))[:, None], kk, axis=1)
        keep = (sims >= threshold) & (nbrs >= 0)
        if same:
            keep &= nbrs != rows  # never an image with itself
        out_i.append(rows[keep])
        out_j.append(nbrs[keep])
        out_s.append(sims[keep])
    return unique_pairs(out_i, out_j, out_s, same)


def find_pairs(a: np.ndarray, b: np.ndarray | None, threshold: float, method: str = "auto"):
    n = len(a) + (0 if b is None else len(b))
    chosen = method if method != "auto" else ("exact" if n <= EXACT_MAX else "ivf")
    fn = exact_pairs if chosen == "exact" else ivf_pairs
    return (*fn(a, b, threshold), chosen)


def thumb_correlation(ta: np.ndarray, tb: np.ndarray) -> np.ndarray:
    """Pearson correlation of paired thumbnails (rows of ta with rows of tb)."""
    x = ta.astype(np.float32) - ta.mean(axis=1, keepdims=True)
    y = tb.astype(np.float32) - tb.mean(axis=1, keepdims=True)
    return (x * y).sum(axis=1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-6)


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union-find over n nodes with edges (i, j): the component id (smallest member) of each node."""
    parent = np.arange(n)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(i.tolist(), j.tolist()):
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return np.array([root(x) for x in range(n)])


def run_dedup(cfg: DedupConfig) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    paths, labels, vecs, thumbs = load_embeddings(cfg.embeddings)
    other = load_embeddings(cfg.against) if cfg.against else None
    if other is not None and other[2].shape[1] != vecs.shape[1]:
        raise DistclsError(
            f"dedup: {cfg.embeddings} has {vecs.shape[1]}-d embeddings and {cfg.against} {other[2].shape[1]}-d; "
            "both must come from the same model"
        )
    i, j, sims, method = find_pairs(vecs, None if other is None else other[2], cfg.threshold, cfg.method)
    candidates = len(i)
    other_thumbs = thumbs if other is None else other[3]
    confirmed = thumbs is not None and other_thumbs is not None and cfg.pixel_corr is not None
    corr = np.full(len(i), np.nan, dtype=np.float32)
    if confirmed and len(i):
        corr = thumb_correlation(thumbs[i], other_thumbs[j])
        keep = corr >= cfg.pixel_corr
        i, j, sims, corr = i[keep], j[keep], sims[keep], corr[keep]
    all_paths = paths + (other[0] if other else [])
    all_labels = labels + (other[1] if other else [])
    jj = j + (len(paths) if other else 0)
    comp = components(len(all_paths), i, jj)
    members: dict[int, list[int]] = {}
    for node in np.unique(np.concatenate([i, jj])).tolist():
        members.setdefault(int(comp[node]), []).append(node)
    groups = sorted(members.values(), key=lambda g: (-len(g), all_paths[g[0]]))
    pairs = pa.table(
        {
            "a": [all_paths[x] for x in i.tolist()],
            "b": [all_paths[x] for x in jj.tolist()],
            "similarity": sims,
            "thumb_correlation": corr,
        }
    )
    rows = [(g, all_paths[m], all_labels[m]) for g, group in enumerate(groups) for m in group]
    group_table = pa.table({"group": [r[0] for r in rows], "path": [r[1] for r in rows], "label": [r[2] for r in rows]})
    for name, table in (("pairs.parquet", pairs), ("groups.parquet", group_table)):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(storage.join_uri(cfg.out, name), buf.getvalue())
    summary = {
        "embeddings": cfg.embeddings,
        "against": cfg.against,
        "images": len(paths),
        "against_images": len(other[0]) if other else 0,
        "dimension": int(vecs.shape[1]),
        "threshold": cfg.threshold,
        "pixel_corr": cfg.pixel_corr if confirmed else None,
        "method": method,
        "candidates": int(candidates),
        "pairs": int(len(i)),
        "groups": len(groups),
        "images_in_groups": int(sum(len(g) for g in groups)),
        "seconds": round(time.perf_counter() - started, 2),
    }
    storage.write_text(storage.join_uri(cfg.out, "dedup.json"), json.dumps(summary, indent=2))
    from distcls.curate.review import default_root

    roots = (default_root(cfg.embeddings), default_root(cfg.against) if cfg.against else None)
    roots_of = [roots[0]] * len(paths) + [roots[1]] * (len(all_paths) - len(paths))
    storage.write_bytes(storage.join_uri(cfg.out, "contact_sheet.png"), groups_sheet(groups, all_paths, roots_of))
    return summary


def groups_sheet(
    groups: list[list[int]], paths: list[str], roots: list[str | None], max_groups: int = 20, max_members: int = 8
) -> bytes:
    """The largest groups, one row of thumbnails each; a path is read only under its labels folder's root (the
    input its _plan.json names), as `distcls review` reads them."""
    from PIL import Image

    from distcls.plots import NO_ROOT, THUMB, map_interruptible, thumbnail, tile

    shown = [g[:max_members] for g in groups[:max_groups]]
    members = [m for g in shown for m in g]
    thumbs = iter(map_interruptible(lambda m: thumbnail(paths[m], roots[m]) if roots[m] else (None, NO_ROOT), members, 16))
    cell = THUMB + 8
    sheet = Image.new("RGB", (max(1, max((len(g) for g in shown), default=1)) * cell, max(1, len(shown)) * cell), "white")
    for r, g in enumerate(shown):
        for c, _ in enumerate(g):
            thumb, why = next(thumbs)
            img = tile(thumb, why)
            sheet.paste(img, (c * cell + 4, r * cell + 4))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()

"""`distcls review`: the labeled rows most worth a person's look, as Parquet, a contact sheet and a web page.

Rows are ranked by how doubtful the model was (`--by`): margin (smallest first: two classes nearly tied),
entropy (highest first), ood (highest energy first: least like the training data) or score (lowest
calibrated top-1 probability first). `--per-class` takes the N most doubtful rows of each predicted label
instead of N overall. Rows with an `error` have no prediction and are left out.

Output in --out: review.parquet (the chosen rows, ranked, with `rank`), contact_sheet.png (thumbnails with
label and score, in rank order; the first plots.SHEET_MAX rows) and index.html (every chosen row; thumbnails
inlined, so the page opens from disk with no access to the bucket). Images are read and decoded with the
same limits as labeling; one that cannot be read gets a grey tile saying so.

Only objects under `--root` are read (default: the input that the labels' own _plan.json names): a labels
file can name any path, and the page would carry its thumbnail. A row outside the root, or one that is not a
regular file or is over --max-object-mb, gets a "not read" tile; outside the root its text is the same
whether the object exists or not.
"""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np

from distcls import DistclsError, objects, storage
from distcls.config import ReviewConfig
from distcls.plots import NO_ROOT, NOT_READ, contact_sheet, thumbnails, tile

ORDER = {  # --by -> (column, ascending)
    "margin": ("margin", True),
    "entropy": ("entropy", False),
    "ood": ("ood_score", False),
    "score": ("score", True),
}


def ranked_rows(table, by: str, n: int, per_class: bool):
    """The review rows: good rows sorted by `by` (ties by path), the first n overall or per label."""
    import pyarrow.compute as pc

    column, ascending = ORDER[by]
    if column not in table.column_names:
        raise DistclsError(
            f"review: the labels have no `{column}` column (written by an older distcls); label them again, or pass --by score"
        )
    good = table.filter(pc.is_null(table["error"]))
    if good.num_rows == 0:
        return good
    order = [(column, "ascending" if ascending else "descending"), ("path", "ascending")]
    good = good.sort_by(order)
    if not per_class:
        return good.slice(0, n)
    labels = good["label"].to_pylist()
    seen: dict[str, int] = {}
    keep = []
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= n:
            keep.append(i)
    return good.take(keep).sort_by(order)


def default_root(labels: str) -> str | None:
    """The input that the labels folder's _plan.json names (what `distcls label` listed), or None."""
    from distcls.label.plan import PLAN_DIR, PLAN_META

    uri = storage.join_uri(labels, PLAN_DIR, PLAN_META)
    try:
        source = json.loads(objects.read_object(uri, 1 << 20)).get("source") or {}  # bounded, never blocks
    except (DistclsError, ValueError, AttributeError):
        return None
    root = source.get("input")
    return root if isinstance(root, str) and root else None


def data_uri(thumb: np.ndarray | None, why: str) -> str:
    buf = io.BytesIO()
    tile(thumb, why).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def page(rows: list[dict], thumbs: list, cfg: ReviewConfig) -> str:
    """index.html: a card per row (thumbnail, rank, label, score, top-k, path); plain HTML and CSS."""
    column = ORDER[cfg.by][0]
    cards = []
    for row, (thumb, why) in zip(rows, thumbs):
        topk = ", ".join(
            f"{html.escape(str(lab))} {sc:.2f}" for lab, sc in zip(row.get("topk_labels") or [], row.get("topk_scores") or [])
        )
        cards.append(
            f'<figure class="card" data-rank="{row["rank"]}"><img src="{data_uri(thumb, why)}" alt="">'
            f"<figcaption><b>{row['rank']}. {html.escape(str(row['label']))}</b> {row['score']:.3f}"
            f"<br>{column} {row[column]:.3f}<br><small>{topk}</small>"
            f'<br><small class="path">{html.escape(str(row["path"]))}</small></figcaption></figure>'
        )
    title = f"distcls review: {len(rows)} rows by {cfg.by}" + (" per class" if cfg.per_class else "")
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:1em}.grid{display:flex;flex-wrap:wrap;gap:8px}"
        ".card{width:180px;margin:0;border:1px solid #ccc;padding:4px}.card img{max-width:100%}"
        ".path{color:#777;word-break:break-all}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>labels: <code>{html.escape(cfg.labels)}</code></p>"
        f'<div class="grid">{"".join(cards)}</div></body></html>\n'
    )


def run_review(cfg: ReviewConfig) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distcls.label import read_labels

    table = read_labels(cfg.labels)
    if table.num_rows == 0:
        raise DistclsError(f"review: {cfg.labels} holds no label rows; point --labels at a `distcls label` --output")
    chosen = ranked_rows(table, cfg.by, cfg.n, cfg.per_class)
    chosen = chosen.append_column("rank", pa.array(np.arange(1, chosen.num_rows + 1, dtype=np.int32)))
    rows = chosen.to_pylist()
    root = cfg.root if cfg.root is not None else default_root(cfg.labels)
    if root is None:  # nothing to judge paths by: no thumbnail is read
        thumbs = [(None, NO_ROOT) for _ in rows]
    else:
        thumbs = thumbnails([r["path"] for r in rows], root, objects.max_object_bytes(cfg.max_object_mb))
    buf = io.BytesIO()
    pq.write_table(chosen, buf)
    storage.write_bytes(storage.join_uri(cfg.out, "review.parquet"), buf.getvalue())
    storage.write_bytes(storage.join_uri(cfg.out, "contact_sheet.png"), contact_sheet(rows, thumbs, ORDER[cfg.by][0]))
    storage.write_text(storage.join_uri(cfg.out, "index.html"), page(rows, thumbs, cfg))
    unreadable = sum(1 for thumb, _ in thumbs if thumb is None)
    not_read = sum(1 for thumb, why in thumbs if thumb is None and why.startswith(NOT_READ))
    return {"rows": len(rows), "of": table.num_rows, "unreadable": unreadable, "not_read": not_read, "root": root, "out": cfg.out}

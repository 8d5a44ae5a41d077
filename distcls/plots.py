"""Figures and image sheets as PNG bytes, headless: the one place that sets matplotlib up (reports, curves,
benchmarks), and the thumbnails and contact sheets that review, dedup and find-label-issues write.

Text is drawn as written: class names, model names and paths are data, and matplotlib would otherwise read
`$...$` in them as math text (raising on `$\\foo$`) and, with `text.usetex` set in a matplotlibrc, run LaTeX
on every label. `png_bytes` turns both off for every text of the figure before it is laid out.

Thumbnails are read with objects.read_object's limits (only under a root when one is given, regular files,
--max-object-mb); an image that is not read or cannot be decoded gets a grey tile saying why.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Callable

import numpy as np

from distcls import DistclsError, objects
from distcls.images import ImageDecodeError, decode_image

THUMB = 112  # px, the longer side
NOT_READ = "not read"  # a tile's first line for an object that was refused (outside --root, not a file, too large)
NO_ROOT = f"{NOT_READ}\nno --root"  # the tile when no root is known: nothing is read
SHEET_COLUMNS = 10
SHEET_MAX = 200


def subplots(*args, **kwargs):
    """plt.subplots on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def plain_text(fig) -> None:
    """Every text of `fig` (titles, axis labels, tick labels, legends, annotations) drawn literally: no math
    text, no LaTeX."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        text.set_parse_math(False)
        text.set_usetex(False)


def png_bytes(fig) -> bytes:
    """The figure, laid out, as PNG bytes (100 dpi); the figure is closed, also when drawing it fails."""
    import matplotlib.pyplot as plt

    try:
        plain_text(fig)
        fig.tight_layout()
        plain_text(fig)  # tick labels the layout created
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buf.getvalue()


# ---- image sheets: thumbnails and contact sheets ----------------------------------------------------------


def thumbnail(path: str, root: str | None = None, max_bytes: int | None = None) -> tuple[np.ndarray | None, str]:
    """(RGB thumbnail, "") or (None, the tile's text) for one image URI (read only under `root` when given)."""
    try:
        img = decode_image(objects.read_object(path, max_bytes, root=root), draft_size=(THUMB * 2, THUMB * 2))
    except ImageDecodeError as exc:
        return None, f"unreadable\n{exc.kind}"
    except objects.ObjectReadError as exc:
        return None, f"{NOT_READ}\n{exc.kind.replace('_', ' ')}"
    except DistclsError as exc:
        return None, "unreadable\n" + str(exc).split(";")[0][:60]
    img.thumbnail((THUMB, THUMB))
    return np.asarray(img.convert("RGB")), ""


def thumbnails(
    paths: list[str], root: str | None = None, max_bytes: int | None = None, workers: int = 16
) -> list[tuple[np.ndarray | None, str]]:
    """thumbnail() of each path, read by `workers` threads (with `root`: only under it)."""
    return map_interruptible(lambda p: thumbnail(p, root, max_bytes), paths, workers)


def map_interruptible(fn: Callable, items: list, workers: int) -> list:
    """[fn(x) for x in items] on daemon threads: Ctrl-C or SIGTERM stops the caller at once, even while a
    read hangs (a ThreadPoolExecutor would wait for it on the way out, and again at exit)."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(len(items)):
        todo.put(i)
    results: list = [None] * len(items)
    failed: list[BaseException] = []

    def work() -> None:
        while not failed:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as exc:  # handed to the caller
                failed.append(exc)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(max(1, min(workers, len(items))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]
    return results


def tile(thumb: np.ndarray | None, why: str):
    from PIL import Image, ImageDraw

    if thumb is not None:
        return Image.fromarray(thumb)
    img = Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
    ImageDraw.Draw(img).text((6, THUMB // 2 - 6), why[:40], fill=(60, 60, 60))
    return img


def contact_sheet(rows: list[dict], thumbs: list, column: str) -> bytes:
    """A PNG grid: each cell the thumbnail, then rank, label and score, and the row's `column` value."""
    from PIL import Image, ImageDraw

    cells = list(zip(rows, thumbs))[:SHEET_MAX]
    cols = min(SHEET_COLUMNS, max(1, len(cells)))
    cell_w, cell_h = THUMB + 16, THUMB + 44
    sheet = Image.new("RGB", (cols * cell_w, max(1, -(-len(cells) // cols)) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (row, (thumb, why)) in enumerate(cells):
        x, y = (i % cols) * cell_w + 8, (i // cols) * cell_h + 4
        img = tile(thumb, why)
        sheet.paste(img, (x + (THUMB - img.width) // 2, y + (THUMB - img.height) // 2))
        draw.text((x, y + THUMB + 2), f"{row['rank']}. {str(row['label'])[:16]}", fill="black")
        draw.text((x, y + THUMB + 16), f"{row['score']:.2f}  {column} {row[column]:.2f}", fill=(90, 90, 90))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()

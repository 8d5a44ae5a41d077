"""Figures as PNG bytes, headless: the one place that sets matplotlib up (reports, curves, benchmarks).

Text is drawn as written: class names, model names and paths are data, and matplotlib would otherwise read
`$...$` in them as math text (raising on `$\\foo$`) and, with `text.usetex` set in a matplotlibrc, run LaTeX
on every label. `png_bytes` turns both off for every text of the figure before it is laid out.
"""

from __future__ import annotations

import io


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

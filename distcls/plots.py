"""Figures as PNG bytes, headless: the one place that sets matplotlib up (reports, curves, benchmarks)."""

from __future__ import annotations

import io


def subplots(*args, **kwargs):
    """plt.subplots on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def png_bytes(fig) -> bytes:
    """The figure, laid out, as PNG bytes (100 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()

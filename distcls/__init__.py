"""distcls: fine-tune, evaluate, label and serve pretrained image classifiers on Ray."""

__version__ = "0.1.0"


class DistclsError(Exception):
    """A user-facing error: one line saying what went wrong, where, and what to do.

    The CLI prints it without a traceback and exits non-zero.
    """

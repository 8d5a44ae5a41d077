"""distcls: fine-tune, evaluate, label and serve pretrained image classifiers on Ray.

The public API is this package's names (below), `distcls.config` (one dataclass per command),
`distcls.storage` (URIs: local paths, s3://, gs://...), `distcls.cli` and `distcls.tools`. Each name is
imported on first use, so `import distcls` stays light (no torch, no Ray). jobs/ and cluster/ use only
these (tests/test_architecture.py checks it).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"


class DistclsError(Exception):
    """A user-facing error: one line saying what went wrong, where, and what to do.

    The CLI prints it without a traceback and exits non-zero.
    """


_API = {  # public name -> (module, attribute)
    "run_training": ("distcls.train.trainer", "run_training"),
    "run_distillation": ("distcls.train.distill", "run_distillation"),
    "run_evaluation": ("distcls.evaluate", "run_evaluation"),
    "run_labeling": ("distcls.label", "run_labeling"),
    "read_labels": ("distcls.label", "read_labels"),
    "label_status": ("distcls.label", "label_status"),
    "run_export": ("distcls.export", "run_export"),
    "run_compare": ("distcls.compare", "run_compare"),
    "start_serving": ("distcls.serving", "start"),
    "load_model": ("distcls.infer.api", "load_model"),
    "from_pretrained": ("distcls.checkpoint", "from_pretrained"),
    "read_checkpoint_meta": ("distcls.checkpoint", "read_meta"),
    "init_ray": ("distcls.runtime", "init_ray"),
}

__all__ = ["DistclsError", "__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'distcls' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value

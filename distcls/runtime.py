"""Connecting to Ray: RAY_ADDRESS when set, else a local instance. Storage settings travel along;
credentials never do (see FORWARDED_ENV)."""

from __future__ import annotations

import logging
import os
import signal
import threading

# The settings (never credentials) that make storage URIs resolve the same on every node as on the driver.
# Ray logs a runtime env at INFO and its jobs API returns it, so keys, secrets and tokens stay out of it:
# each node takes them from its own environment, instance role or pod secret (cluster/README.md). A local
# instance's workers inherit the driver's environment, credentials included.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS",  # the path of a key file on each node, not the key
    "DISTCLS_DATA_DIR",
    "DISTCLS_CACHE_DIR",  # where checkpoints compiled to ONNX are cached (infer/onnxrt.py)
    "DISTCLS_TRUST_TORCHSCRIPT", "DISTCLS_TRUSTED_MODELS",  # which TorchScript exports may run (export.py)
)


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def init_ray(num_cpus: int | None = None, address: str | None = None, quiet: bool = True) -> None:
    """ray.init once: the cluster at `address` / RAY_ADDRESS, else a local instance (num_cpus logical CPUs)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {
        "logging_level": logging.WARNING if quiet else logging.INFO,
        "log_to_driver": True,
    }
    # Inside `ray job submit` the job's runtime env (--runtime-env-json) already reaches every worker, and
    # Ray refuses a second env_vars field; elsewhere, forward the storage variables to the workers.
    if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        kwargs["runtime_env"] = {"env_vars": forwarded_env()}
    sigterm = signal.getsignal(signal.SIGTERM)
    if quiet:  # notices that are not errors: the token-auth banner, Data's "progress bars disabled" and per-run INFO
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # Ray Data re-reads it whenever it sets up its logging
        for name in ("ray._private.authentication.authentication_token_setup", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # At least 4 logical CPUs even on a 2-core laptop: two training workers hold one each, and Ray
        # Data's decode tasks need room beside them or the pipeline stalls. The dashboard process also
        # serves the State API that Ray Train's controller polls, so it stays on.
        ray.init(num_cpus=num_cpus or max(os.cpu_count() or 1, 4), **kwargs)
    keep_sigterm_handler(sigterm)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet


def keep_sigterm_handler(handler) -> None:
    """Put back the caller's SIGTERM handler (the CLI's) after ray.init replaced it: Ray's own exits at
    once, leaving agent processes behind, and its C++ one prints a stack trace first."""
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)

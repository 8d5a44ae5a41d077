"""Connecting to Ray: RAY_ADDRESS when set, else a local instance. Storage credentials travel along."""

from __future__ import annotations

import logging
import os

# The variables that make storage URIs resolve the same on every node as on the driver.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS", "DISTCLS_DATA_DIR",
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
    if address:
        ray.init(address=address, **kwargs)
    else:
        # At least 4 logical CPUs even on a 2-core laptop: two training workers hold one each, and Ray
        # Data's decode tasks need room beside them or the pipeline stalls. The dashboard process also
        # serves the State API that Ray Train's controller polls, so it stays on.
        ray.init(num_cpus=num_cpus or max(os.cpu_count() or 1, 4), **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet

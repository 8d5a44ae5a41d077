"""`distcls rollout set` and `distcls rollout status`: a running endpoint's traffic split, over its HTTP API.

`rollout set` POSTs the new weights to the endpoint's admin route (POST /admin/rollout, with the admin token
from DISTCLS_ADMIN_TOKEN), which applies them as a new Ingress user_config through Serve, then waits until
GET /v1/rollout reports them. `rollout status` prints GET /v1/rollout (API token from DISTCLS_API_TOKEN when
set) as a table: per variant traffic, latency and answers, and each variant's agreement with the primary.
No Ray here: only HTTP.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from distcls import DistclsError
from distcls.config.serve import RolloutSetConfig, RolloutStatusConfig
from distcls.serving.auth import ADMIN_TOKEN_ENV
from distcls.serving.auth import TOKEN_ENV as API_TOKEN_ENV


def call(url: str, token_env: str, body: dict | None = None, timeout: float = 60) -> dict:
    """GET (or POST `body` as JSON) `url` with the bearer token in `token_env`; -> the JSON answer, or a one-line error."""
    headers = {"Content-Type": "application/json"}
    token = os.environ.get(token_env, "").strip()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise DistclsError(f"rollout: {url} answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DistclsError(f"rollout: cannot reach {url} ({getattr(exc, 'reason', exc)}); is the endpoint running?") from None


def run_rollout_set(cfg: RolloutSetConfig) -> dict:
    """Apply new weights through the admin route; wait until the endpoint routes by them; -> GET /v1/rollout."""
    if not os.environ.get(ADMIN_TOKEN_ENV, "").strip():
        raise DistclsError(f"rollout set: {ADMIN_TOKEN_ENV} is not set; set it to the endpoint's admin token")
    base = cfg.url.rstrip("/")
    body = {"weights": cfg.weights}
    if cfg.shadow_fraction is not None:
        body["shadow_fraction"] = cfg.shadow_fraction
    applied = call(f"{base}/admin/rollout", ADMIN_TOKEN_ENV, body)
    deadline = time.monotonic() + cfg.wait_s
    while True:
        status = call(f"{base}/v1/rollout", API_TOKEN_ENV)
        if status.get("weights") == applied["weights"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    status["applied"] = applied
    return status


def print_rollout_set(cfg: RolloutSetConfig, status: dict) -> int:
    applied = status["applied"]
    now = ", ".join(f"{n} {w:g}" for n, w in applied["weights"].items())
    in_effect = status.get("weights") == applied["weights"]
    print(f"rollout: weights {now} applied ({applied['applied']} config, through Serve)")
    late = f"  NOT yet reported by the endpoint after {cfg.wait_s:g}s; check `distcls rollout status`"
    print("  in effect" if in_effect else late)
    return 0 if in_effect else 1


def run_rollout_status(cfg: RolloutStatusConfig) -> dict:
    return call(f"{cfg.url.rstrip('/')}/v1/rollout", API_TOKEN_ENV)


def format_status(status: dict) -> str:
    """GET /v1/rollout as two tables: the variants, then each against the primary on mirrored requests."""
    weights = status.get("weights") or {}
    head = f"{'variant':<14} {'role':<8} {'weight':>6} {'requests':>9} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8} {'score':>6}"
    lines = [head + "  top labels"]
    for name, v in status["variants"].items():
        top = ", ".join(f"{label} {n}" for label, n in list(v["labels"].items())[:3])
        lines.append(
            f"{name:<14} {v['role']:<8} {weights.get(name, 0):>6g} {v['requests']:>9} {v['errors']:>7} "
            f"{fmt(v['p50_ms']):>8} {fmt(v['p99_ms']):>8} {fmt(v['mean_score']):>6}  {top}"
        )
    if status.get("comparison"):
        lines.append("")
        head = f"{'vs ' + status['primary']:<14} {'images':>7} {'agreement':>9} {'score d':>8} {'dropped':>7} {'errors':>6}"
        lines.append(head + "  top disagreements")
        for name, c in status["comparison"].items():
            pairs = ", ".join(f"{d['primary']}->{d['variant']} {d['count']}" for d in c["top_disagreements"])
            lines.append(
                f"{name:<14} {c['images']:>7} {fmt(c['agreement']):>9} {fmt(c['mean_score_delta']):>8} "
                f"{c['mirrors_dropped']:>7} {c['mirror_errors']:>6}  {pairs}"
            )
    return "\n".join(lines)


def fmt(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, int) else f"{value:.4g}"


def print_rollout_status(cfg: RolloutStatusConfig, status: dict) -> None:
    print(json.dumps(status, indent=2) if cfg.json else format_status(status))

"""`distcls serve`: a checkpoint as an autoscaling HTTP endpoint on Ray Serve.

- `auth`: the API token (DISTCLS_API_TOKEN) and the Host check; no Ray.
- `http`: request bodies and their limits, the three input forms (raw, multipart, JSON), admission, the
  JSON errors; no Ray.
- `ingress`: the `Ingress` deployment, the HTTP API's routes (FastAPI), routing each request to a variant;
  `web`: the FastAPI app and its JSON error handlers; `v2`: the Open Inference Protocol's routes (KServe V2,
  wire format in `oip`); `multi` and `catalog`: the models of a `--models` endpoint.
- `classifier`: the `ImageClassifier` deployment, batched predictions; its checkpoint (or --models prefix,
  multiplexed) is its `user_config`.
- `variants`: the routing rule (`pick_variant`: weights, sticky keys, forced variants); no Ray.
- `shadow`, `stats`, `recorder`: mirrored requests, the live comparison, the `RolloutRecorder` deployment
  (and the rollout log); `admin`: live weight changes through Serve; `page`: the page's rollout section.
- `app`: the application (`build_app`, the import path of `serve deploy` and a RayService), `serve_config`,
  `start`, `run_serve`, `stop_app`.

The names below load their module on first use: `import distcls.serving` imports neither Ray nor FastAPI,
and `distcls.serving:build_app` resolves as before.
"""

import importlib

EXPORTS = {  # module -> the names it gives `distcls.serving`
    "distcls.serving.app": (
        "INGRESS_HEADROOM",
        "application",
        "build_app",
        "run_serve",
        "serve_config",
        "start",
        "stop_app",
    ),
    "distcls.serving.auth": (
        "TOKEN_ENV",
        "check_auth",
        "check_bearer",
        "check_host",
        "env_token",
        "host_names",
        "host_of",
        "is_loopback",
        "token_digest",
        "warn_no_auth",
    ),
    "distcls.serving.classifier": ("ImageClassifier",),
    "distcls.serving.http": ("Admission", "RequestError", "parse_json_images", "read_body", "read_images"),
    "distcls.serving.ingress": ("Ingress", "api"),
    "distcls.serving.recorder": ("RolloutRecorder",),
    "distcls.serving.variants": ("KEY_HEADER", "VARIANT_HEADER", "pick_variant"),
}
MODULE_OF = {name: module for module, names in EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name not in MODULE_OF:
        raise AttributeError(f"module 'distcls.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *MODULE_OF])


__all__ = sorted(MODULE_OF)

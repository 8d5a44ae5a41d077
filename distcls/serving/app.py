"""The Serve application: built from a ServeConfig, deployed, printed as a config file, taken down.

`application` binds the `Ingress` in front of an autoscaling classifier deployment per variant (the primary,
`main`, is `ImageClassifier`; a variant NAME is `ImageClassifier-NAME`, shadows too) and, with variants, the
`RolloutRecorder`; the weights are the Ingress's user_config. `build_app` is the import path (`distcls.serving:build_app`) that
`serve deploy` and a KubeRay RayService use, and `serve_config` prints the config that names it. `start`
deploys on the Ray cluster, `run_serve` is `distcls serve` (deploy, print, serve until stopped), `stop_app`
takes the application down.
"""

import dataclasses
import logging
import os
import time

from ray import serve

from distcls import DistclsError
from distcls.config import ServeConfig, load_config, to_dict
from distcls.config.serve import PRIMARY, VariantSpec
from distcls.serving.auth import TOKEN_ENV, admin_token_sha256, check_auth, env_token, host_names
from distcls.serving.classifier import ImageClassifier
from distcls.serving.ingress import Ingress
from distcls.serving.recorder import RolloutRecorder

# Requests an Ingress replica takes beyond its own admission limit (health checks, the page, /v1/model, and
# /v1/classify requests on their way to a JSON 503), so that Ray's proxy never has to queue or refuse them.
INGRESS_HEADROOM = 64
APP_ARGS_EXCLUDED = ("port", "name", "detach")  # `host` stays: build_app decides on auth by it


def autoscaling_delays(cfg: ServeConfig) -> dict:
    """The classifier's autoscaling timing: how fast it follows load up, down and to zero."""
    delays = {
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
        "look_back_period_s": cfg.look_back_period_s,
    }
    if cfg.downscale_to_zero_delay_s is not None:
        delays["downscale_to_zero_delay_s"] = cfg.downscale_to_zero_delay_s
    return delays


def classifier_name(variant: str) -> str:
    """A variant's deployment name: the primary keeps `ImageClassifier` (what cluster/kuberay overrides)."""
    return "ImageClassifier" if variant == PRIMARY else f"ImageClassifier-{variant}"


def replica_settings(cfg: ServeConfig, spec: VariantSpec) -> dict:
    """The variant's replica settings: its own where it has them, else the primary's (--min-replicas...)."""
    high = spec.max_replicas if spec.max_replicas is not None else cfg.max_replicas
    return {
        "min_replicas": spec.min_replicas if spec.min_replicas is not None else min(cfg.min_replicas, high),
        "max_replicas": high,
        "runtime": spec.runtime or cfg.runtime,
        "num_gpus": spec.num_gpus if spec.num_gpus is not None else cfg.num_gpus,
        "cpus_per_replica": spec.cpus_per_replica if spec.cpus_per_replica is not None else cfg.cpus_per_replica,
    }


def bind_classifier(cfg: ServeConfig, spec: VariantSpec | None = None):
    """The autoscaling classifier deployment of one variant (default: the primary), its checkpoint as `user_config`."""
    spec = spec or VariantSpec(PRIMARY, cfg.checkpoint)
    own = replica_settings(cfg, spec)
    return ImageClassifier.options(
        name=classifier_name(spec.name),
        ray_actor_options={"num_cpus": own["cpus_per_replica"], "num_gpus": own["num_gpus"]},
        autoscaling_config={
            "min_replicas": own["min_replicas"],
            "max_replicas": own["max_replicas"],
            "initial_replicas": max(1, own["min_replicas"]),
            "target_ongoing_requests": cfg.target_ongoing_requests,
            **autoscaling_delays(cfg),
        },
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        user_config=classifier_config(cfg, spec),
        health_check_period_s=10,
    ).bind(
        max_batch_size=cfg.max_batch_size,
        batch_wait_timeout_s=cfg.batch_wait_timeout_s,
        max_concurrent_batches=cfg.max_concurrent_batches,
        threads=max(1, int(own["cpus_per_replica"])),
        runtime=own["runtime"],
        unknown=cfg.unknown,
        max_models_per_replica=cfg.max_models_per_replica,
    )


def classifier_config(cfg: ServeConfig, spec: VariantSpec) -> dict:
    """A classifier deployment's user_config: its checkpoint, or the --models prefix it serves by id."""
    return {"models": cfg.models} if cfg.models else {"checkpoint": spec.checkpoint}


def ingress_config(cfg: ServeConfig) -> dict:
    """The Ingress's user_config: the weights every replica routes by and the share of requests mirrored."""
    return {"weights": cfg.initial_weights(), "shadow_fraction": cfg.shadow_fraction}


def rollout_args(cfg: ServeConfig, specs: list[VariantSpec]) -> dict:
    """The Ingress's variant arguments: the other A/B variants' and the shadows' deployments, the recorder."""
    if len(specs) == 1:
        return {}
    roles = {s.name: "shadow" if s.shadow else "primary" if s.name == PRIMARY else "variant" for s in specs}
    return {
        "variants": {s.name: bind_classifier(cfg, s) for s in specs[1:] if not s.shadow} or None,
        "shadows": {s.name: bind_classifier(cfg, s) for s in specs if s.shadow} or None,
        "recorder": RolloutRecorder.options(name="RolloutRecorder").bind(PRIMARY, roles, cfg.rollout_log),
        "deployments": {s.name: classifier_name(s.name) for s in specs},
        "mirror_queue": cfg.shadow_queue,
        "log_pairs": bool(cfg.rollout_log),
    }


def application(cfg: ServeConfig, token_sha256: str | None = None, declarative: bool = False, admin_sha256: str | None = None):
    """The Serve application for `cfg` (a bound Ingress in front of an autoscaling classifier per variant);
    `declarative`: built by build_app (`serve deploy`, a RayService), where the Host check is --allowed-hosts
    only; `admin_sha256`: the admin token's digest (None: POST /admin/rollout is off)."""
    specs = cfg.variant_specs()
    classifier = bind_classifier(cfg, specs[0])
    running = sum(cfg.max_ongoing_requests * replica_settings(cfg, s)["max_replicas"] for s in specs if not s.shadow)
    return Ingress.options(
        name="Ingress",
        ray_actor_options={"num_cpus": 0.5},
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": 4 * cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s,
            "look_back_period_s": cfg.look_back_period_s,
        },
        # Admission is the Ingress's own (JSON 503s). Ray's limits sit above it, the proxy's queue included
        # (it also holds requests while their replica is being chosen): only a flood of more concurrent
        # requests than both together reaches them, and gets Ray's plain-text 503.
        max_ongoing_requests=running + cfg.max_queued_requests + INGRESS_HEADROOM,
        max_queued_requests=running + cfg.max_queued_requests + INGRESS_HEADROOM,
        user_config=ingress_config(cfg),
    ).bind(
        classifier,
        max_request_bytes=int(cfg.max_request_mb * 1e6),
        max_images=cfg.max_images_per_request,
        default_top_k=cfg.top_k,
        token_sha256=token_sha256,
        max_running=running,
        max_waiting=cfg.max_queued_requests,
        host_names=host_names(cfg, token_sha256, declarative),
        admin_sha256=admin_sha256,
        model_name=cfg.name,
        models=cfg.models,
        send_batch=cfg.max_batch_size,
        **rollout_args(cfg, specs),
    )


def build_app(args: dict):
    """Ray Serve application builder (`import_path: distcls.serving:build_app`); `args` are ServeConfig
    fields. The API token comes from DISTCLS_API_TOKEN where the app is built, never from the config; args
    without a `host` count as a public address, so such an app needs the token or `no_auth: true`."""
    cfg = load_config(ServeConfig, overrides={"host": "0.0.0.0", **args})
    token_sha256 = check_auth(cfg, env_token())
    if cfg.models:
        check_models(cfg)
    elif len(cfg.variant_specs()) > 1:  # class names compared where the app is built (one model: nothing to compare)
        check_variants(cfg)
    return application(cfg, token_sha256, declarative=True, admin_sha256=admin_token_sha256(token_sha256))


def check_variants(cfg: ServeConfig, verify: bool = False) -> list[dict]:
    """Every variant's checkpoint metadata (verified, weights included, with `verify`); refuses, before anything
    starts, one that cannot be read and one whose class names differ from the primary's (agreement would be
    meaningless) unless --allow-different-classes."""
    from distcls.checkpoint import read_meta
    from distcls.infer import verify_model

    metas = []
    for spec in cfg.variant_specs():
        try:
            metas.append(verify_model(spec.checkpoint) if verify else read_meta(spec.checkpoint))
        except DistclsError as exc:
            raise DistclsError(f"serve: variant {spec.name} ({spec.checkpoint}) cannot be served: {exc}") from None
    primary = metas[0]["class_names"]
    for spec, meta in zip(cfg.variant_specs()[1:], metas[1:]):
        if meta["class_names"] != primary and not cfg.allow_different_classes:
            raise DistclsError(
                f"serve: variant {spec.name} ({spec.checkpoint}) has other class names than {PRIMARY} "
                f"({len(meta['class_names'])} vs {len(primary)} classes, or another order); its agreement with {PRIMARY} "
                "would be meaningless: serve a checkpoint of the same classes, or pass --allow-different-classes"
            )
    return metas


def check_models(cfg: ServeConfig) -> list[str]:
    """The model ids under --models; refuses, before anything starts, a prefix without any checkpoint."""
    from distcls.serving.catalog import list_models

    ids = list_models(cfg.models)
    if not ids:
        raise DistclsError(
            f"serve: no checkpoint under --models {cfg.models}; each model is a folder there holding distcls.json "
            "(e.g. PREFIX/cats-v2/distcls.json, served as model `cats-v2`)"
        )
    return ids


def serve_config(cfg: ServeConfig) -> dict:
    """A Ray Serve config file (`serve deploy`, a RayService's serveConfigV2) for this configuration.

    The checkpoint is also the classifier's `user_config` override: change only that value and Serve
    reloads the model inside the running replicas. Changing `args` (the checkpoint there included) gives
    the application a new code version, so Serve replaces every replica (also without failed requests).
    """
    args = config_args(cfg)
    deployments = [{"name": classifier_name(s.name), "user_config": classifier_config(cfg, s)} for s in cfg.variant_specs()]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [
            {
                "name": cfg.name,
                "route_prefix": "/",
                "import_path": "distcls.serving:build_app",
                "args": args,
                "deployments": [*deployments, {"name": "Ingress", "user_config": ingress_config(cfg)}],
            }
        ],
    }


def config_args(cfg: ServeConfig) -> dict:
    """build_app's args for `cfg`: its fields, the variants and shadows as one `variants:` list and the weights
    as one NAME=W string (the same application however the flags named them)."""
    args = {k: v for k, v in to_dict(cfg).items() if k not in APP_ARGS_EXCLUDED}
    specs = cfg.variant_specs()
    if len(specs) == 1:
        return args
    entries = []
    for s in specs[1:]:
        own = {k: getattr(s, k) for k in ("min_replicas", "max_replicas", "runtime", "num_gpus", "cpus_per_replica")}
        entries.append(
            {
                "name": s.name,
                "checkpoint": s.checkpoint,
                **({"shadow": True} if s.shadow else {}),
                **{k: v for k, v in own.items() if v is not None},
            }
        )
    weights = ",".join(f"{name}={w:g}" for name, w in cfg.initial_weights().items())
    return {**args, "variant": [], "shadow": [], "variants": entries, "weights": weights}


def start(cfg: ServeConfig, route_prefix: str = "/", token: str | None = None, access_log: bool = False) -> str:
    """Deploy on the Ray cluster (RAY_ADDRESS, else a local instance); returns the endpoint's base URL."""
    from distcls.checkpoint import read_meta
    from distcls.infer import prepare_runtime
    from distcls.runtime import init_ray
    from distcls.scores import Calibration, resolve_unknown

    token_sha256 = check_auth(cfg, token if token is not None else env_token())
    admin_sha256 = admin_token_sha256(token_sha256)
    if cfg.models:
        check_models(cfg)
    else:
        check_variants(cfg)
        resolve_unknown(cfg.unknown, Calibration.of(read_meta(cfg.checkpoint)), "serve")  # refused here, before Ray
        # Compile once here (replicas on this machine read the cache); after a fallback replicas go straight to torch.
        runtime, note = prepare_runtime(cfg.checkpoint, cfg.runtime, cfg.num_gpus > 0)
        print(f"serve: runtime {runtime} ({note})", flush=True)
        if runtime == "torch" and cfg.runtime != "torch":
            cfg = dataclasses.replace(cfg, runtime="torch")
    init_ray()
    logging_config = {"log_level": "INFO" if access_log else "WARNING", "enable_access_log": access_log}
    # This process's Serve logger (set to INFO when ray.serve is imported) said "Started Serve", "Connecting
    # to existing Serve app" and "Application ready" on every start; `distcls serve` prints its own lines.
    logging.getLogger("ray.serve").setLevel(logging.INFO if access_log else logging.WARNING)
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=logging_config)
    serve.run(
        application(cfg, token_sha256, admin_sha256=admin_sha256),
        name=cfg.name,
        route_prefix=route_prefix,
        logging_config=logging_config,
    )
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{route_prefix.rstrip('/')}"


def run_serve(cfg: ServeConfig) -> None:
    """`distcls serve`: deploy, print where it listens, serve until Ctrl-C or SIGTERM, then take the app down
    (cli.main prints the one line that says why and shuts down the Ray instance it started)."""
    from distcls.infer import verify_model

    if cfg.models:
        ids = check_models(cfg)
        meta = None
    else:
        meta = verify_model(cfg.checkpoint)  # a bad or tampered checkpoint fails here, in one line, before Ray
        check_variants(cfg, verify=True)
    if cfg.detach and not os.environ.get("RAY_ADDRESS"):
        raise DistclsError(
            "serve: --detach needs a running cluster (RAY_ADDRESS, or run it with "
            "`ray job submit`); a local Ray instance would stop when this command ends"
        )
    url = start(cfg)
    auth = (
        f"on ({TOKEN_ENV})"
        if os.environ.get(TOKEN_ENV)
        else "OFF (--no-auth)"
        if cfg.no_auth
        else f"off: loopback only (set {TOKEN_ENV} to require a token)"
    )
    if meta is None:
        shown = ", ".join(ids[:8]) + (" ..." if len(ids) > 8 else "")
        print(f"serving {len(ids)} models under {cfg.models} ({shown}) at {url}/", flush=True)
        print(f"  POST {url}/v1/models/ID/classify   GET {url}/v1/models   POST {url}/v2/models/ID/infer", flush=True)
        print(f"  at most {cfg.max_models_per_replica} models per replica (least recently used evicted)", flush=True)
    else:
        print(
            f"serving {meta['architecture']} ({len(meta['class_names'])} classes, "
            f"model {meta['weights_sha256'][:12]}...) at {url}/",
            flush=True,
        )
        print(f"  POST {url}/v1/classify   GET {url}/v1/model   GET {url}/healthz   page: {url}/", flush=True)
        print(f"  Open Inference Protocol: POST {url}/v2/models/{cfg.name}/infer   GET {url}/v2/models/{cfg.name}", flush=True)
    for line in rollout_lines(cfg, url):
        print(line, flush=True)
    print(
        f"  replicas {cfg.min_replicas}..{cfg.max_replicas}, batch <= {cfg.max_batch_size}, auth {auth}; "
        + ("deployed; `serve status` shows it, `serve shutdown` removes it" if cfg.detach else "Ctrl-C stops it"),
        flush=True,
    )
    if cfg.detach:
        return
    try:
        while True:
            time.sleep(3600)
    finally:
        stop_app(cfg.name)


def rollout_lines(cfg: ServeConfig, url: str) -> list[str]:
    """What `distcls serve` says about the variants: weights, shadows, where to watch and change them."""
    specs = cfg.variant_specs()
    if len(specs) == 1:
        return []
    from distcls.serving.auth import ADMIN_TOKEN_ENV

    weights = ", ".join(f"{n} {w:g}" for n, w in cfg.initial_weights().items())
    shadows = [s.name for s in specs if s.shadow]
    admin = "on" if os.environ.get(ADMIN_TOKEN_ENV) else f"off (set {ADMIN_TOKEN_ENV})"
    return [
        f"  variants: {weights}" + (f"; shadows {', '.join(shadows)} ({cfg.shadow_fraction:g} of requests)" if shadows else ""),
        f"  GET {url}/v1/rollout (`distcls rollout status --url {url}`); POST {url}/admin/rollout {admin}",
    ]


def stop_app(name: str) -> None:
    """Take the application down; on a cluster (RAY_ADDRESS) also Serve, if no other application runs on
    it. A local instance goes with Ray itself (cli.main), so nothing else is needed there."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO lines while stopping
    serve.delete(name)
    if os.environ.get("RAY_ADDRESS") and not serve.status().applications:
        serve.shutdown()


def print_serve_config(cfg: ServeConfig) -> None:
    """Print the Ray Serve config (serve deploy, RayService serveConfigV2) for these flags."""
    import yaml

    from distcls.infer.modelfile import trust_env
    from distcls.serving.auth import is_loopback, warn_no_auth

    if cfg.no_auth and not is_loopback(cfg.host):
        warn_no_auth(cfg)
    doc = serve_config(cfg)
    if trust_env():  # --trust-torchscript / DISTCLS_TRUSTED_MODELS must reach the replicas where they run
        doc["applications"][0]["runtime_env"] = {"env_vars": trust_env()}
    print("# Ray Serve config for distcls: `serve deploy FILE`, or a KubeRay RayService's serveConfigV2.")
    print("# The API token is read from DISTCLS_API_TOKEN on the cluster, never from this file; on a host other")
    print("# than loopback the application refuses to start without it, unless no_auth is true.")
    print(yaml.safe_dump(doc, sort_keys=False), end="")

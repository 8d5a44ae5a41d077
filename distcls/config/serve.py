"""`distcls serve` / `serve-config`'s config: the online endpoint on Ray Serve, its variants (traffic splits and
shadows) and `distcls rollout`'s config.

`variant_specs` turns --checkpoint, --variant, --shadow, --weights and a YAML `variants:` list into one list of
`VariantSpec` (the primary, `main`, first); `parse_weights` reads NAME=W,... Both are pure: the serving package
and the config checks share them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from distcls.config.infer import RUNTIMES, ReplicaFields, check_unknown
from distcls.config.options import Config, ConfigError, Problems, opt

PRIMARY = "main"
VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
# The keys of one entry of a YAML `variants:` list; replica settings left out are the primary's.
VARIANT_KEYS = (
    "name",
    "checkpoint",
    "weight",
    "shadow",
    "min_replicas",
    "max_replicas",
    "runtime",
    "num_gpus",
    "cpus_per_replica",
)


@dataclass(frozen=True)
class VariantSpec:
    """One classifier deployment of the application: the primary (`main`), an A/B variant (weight >= 0) or a
    shadow (mirrored, never answers). Replica settings that are None are the primary's."""

    name: str
    checkpoint: str
    weight: float = 0.0
    shadow: bool = False
    min_replicas: int | None = None
    max_replicas: int | None = None
    runtime: str | None = None
    num_gpus: float | None = None
    cpus_per_replica: float | None = None
    extra: dict = field(default_factory=dict, compare=False)  # unknown keys, refused by check_variant


def parse_pairs(items, what: str) -> list[tuple[str, str]]:
    """NAME=VALUE items (each may hold several, comma-separated) -> [(name, value)]."""
    pairs = []
    for item in items:
        for part in (p.strip() for p in str(item).split(",")):
            if not part:
                continue
            name, eq, value = part.partition("=")
            if not eq or not name.strip() or not value.strip():
                raise ConfigError(f"{what} {part!r}: expected NAME=VALUE, e.g. new=90")
            pairs.append((name.strip(), value.strip()))
    return pairs


def parse_weights(text: str | dict, names: list[str], what: str = "--weights") -> dict[str, float]:
    """NAME=W,... (or a mapping) -> a weight for every A/B variant in `names` (the primary first). The primary
    takes what the others leave of 100 when it is not named; a variant not named gets 0. Refuses unknown names,
    negative or non-numeric weights and a total that is not positive."""
    given = dict(text) if isinstance(text, dict) else dict(parse_pairs([text], what))
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(f"{what}: unknown variant(s) {', '.join(unknown)}; the variants are {', '.join(names)}")
    weights = {}
    for name, raw in given.items():
        try:
            weights[name] = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: {name}={raw!r} is not a number") from None
        if not weights[name] >= 0 or weights[name] == float("inf"):
            raise ConfigError(f"{what}: {name}={raw} must be a finite number >= 0")
    if names[0] not in weights:
        rest = sum(weights.values())
        if rest > 100:
            raise ConfigError(
                f"{what}: the variants' weights sum to {rest:g}, over 100, and {names[0]} takes what they leave of "
                f"100; lower them or give {names[0]}'s weight too (e.g. {names[0]}=0)"
            )
        weights[names[0]] = 100 - rest
    if not sum(weights.values()) > 0:
        raise ConfigError(f"{what}: the weights sum to 0; give at least one variant a positive weight")
    return {name: weights.get(name, 0.0) for name in names}


@dataclass
class ServeConfig(ReplicaFields):
    """`distcls serve` / `serve-config`: the online endpoint on Ray Serve."""

    command = "serve"

    checkpoint: str = opt("", help="checkpoint directory URI (change it on a running app to switch models)")
    models: str | None = opt(
        None,
        help="instead of --checkpoint: serve every checkpoint folder under this prefix, by folder name "
        "(/v1/models/{id}/classify, /v2/models/{id}/infer or the serve_multiplexed_model_id header), loaded on first use",
    )
    max_models_per_replica: int = opt(3, min=1, help="with --models: most models one classifier replica holds (LRU evicted)")
    host: str = opt("127.0.0.1", help="address the HTTP proxy binds; 0.0.0.0 exposes it to the network")
    port: int = opt(8000, help="HTTP port")
    min_replicas: int = opt(1, min=0, help="fewest classifier replicas (autoscaling lower bound)")
    max_replicas: int = opt(4, help="most classifier replicas (autoscaling upper bound)")
    target_ongoing_requests: float = opt(8.0, gt=0, help="autoscaling target: in-flight requests per replica")
    upscale_delay_s: float = opt(30.0, min=0, help="autoscaling: seconds of load above target before adding replicas")
    downscale_delay_s: float = opt(
        600.0,
        min=0,
        help="autoscaling: seconds of load below target before removing replicas "
        "(also the idle time before scaling to zero with --min-replicas 0)",
    )
    look_back_period_s: float = opt(
        30.0, help="autoscaling: seconds of request metrics each decision averages (more than Ray Serve's 10 s metrics interval)"
    )
    downscale_to_zero_delay_s: float | None = opt(
        None,
        min=0,
        help="autoscaling: seconds at 1 replica without requests "
        "before going to 0 with --min-replicas 0 (default: --downscale-delay-s)",
    )
    max_batch_size: int = opt(32, min=1, help="most images per forward pass (@serve.batch)")
    unknown: str = opt(
        "off",
        help="predictions whose OOD (energy) score is past a threshold get label `unknown` (top-k kept): off, auto "
        "(the calibrated checkpoint's threshold) or a number",
    )
    batch_wait_timeout_s: float = opt(
        0.0,
        min=0,
        help="longest wait for a batch to fill; 0: a forward pass takes what queued while the previous one ran "
        "(batches grow with the load, and a lone request never waits)",
    )
    max_concurrent_batches: int = opt(
        2,
        min=1,
        help="forward passes one classifier replica runs at once (@serve.batch's max_concurrent_batches): 2 keeps "
        "its cores busy while the previous batch's answers go out and the next one is gathered",
    )
    cpus_per_replica: float = opt(1.0, gt=0, help="CPUs (and torch threads) per classifier replica")
    max_request_mb: float = opt(10.0, gt=0, help="largest request body in MB; bigger bodies get 413")
    max_images_per_request: int = opt(64, min=1, help="most images in one request")
    top_k: int = opt(5, min=1, help="default number of labels per prediction (requests may ask for another)")
    max_ongoing_requests: int = opt(64, min=1, help="requests one classifier replica works on at once")
    max_queued_requests: int = opt(256, help="requests queued per caller before answering 503")
    name: str = opt("distcls", help="Serve application name")
    detach: bool = opt(
        False,
        help="deploy on the cluster (RAY_ADDRESS) and return instead of serving until "
        "Ctrl-C; the application keeps running (for `ray job submit` and scripts)",
    )
    no_auth: bool = opt(
        False,
        help="serve without a token on a --host other than loopback (warned on stderr); "
        "without this flag such a host needs DISTCLS_API_TOKEN",
    )
    allowed_hosts: tuple[str, ...] = opt(
        (),
        help="Host header names accepted besides the bind address and localhost (comma-separated); checked on a "
        "loopback bind without a token (against DNS rebinding), and always when given",
    )
    variant: tuple[str, ...] = opt(
        (),
        help="another checkpoint served next to --checkpoint (the primary, named `main`) as NAME=URI, its own "
        "autoscaling deployment; repeat the flag for more; --weights splits the traffic",
    )
    weights: str | None = opt(
        None,
        help="traffic split NAME=W,... e.g. main=90,new=10 (the primary takes what the others leave of 100 when it "
        "is not named; a variant not named gets 0: only `X-Distcls-Variant: NAME` reaches it)",
    )
    variants: tuple[dict, ...] = opt(
        (),
        help="YAML only: a list of variants {name, checkpoint, weight, shadow, min_replicas, max_replicas, runtime, "
        "num_gpus, cpus_per_replica}; settings left out are the primary's",
    )
    shadow: tuple[str, ...] = opt(
        (),
        help="NAME=URI: a checkpoint that gets a copy of requests after the primary answered; its answers are "
        "compared (GET /v1/rollout), never returned; repeat the flag for more",
    )
    shadow_fraction: float = opt(
        1.0, min=0, max=1, help="share of requests mirrored (to each shadow, and from an A/B variant to the primary)"
    )
    shadow_queue: int = opt(
        64, min=1, help="mirrored requests waiting per Ingress replica; beyond it mirrors are dropped (and counted)"
    )
    rollout_log: str | None = opt(None, help="URI (a folder) where mirrored pairs are appended as Parquet files")
    allow_different_classes: bool = opt(
        False,
        help="serve variants or shadows whose class names differ from the primary's (agreement is then meaningless)",
    )

    def validate(self, p: Problems) -> None:
        p.check(
            bool(self.checkpoint) != bool(self.models),
            "checkpoint",
            self.checkpoint or None,
            "give one of --checkpoint (one model) or --models (every checkpoint under a prefix)",
        )
        p.check(
            not (self.models and (self.variant or self.shadow or self.variants or self.weights)),
            "models",
            self.models,
            "serves many models by id; variants and shadows need --checkpoint (serve them as separate endpoints)",
        )
        p.check(0 < self.port < 65536, "port", self.port, "must be 1..65535")
        p.check(
            self.max_replicas >= max(1, self.min_replicas),
            "max_replicas",
            self.max_replicas,
            "must be at least 1 and at least --min-replicas",
        )
        p.check(
            self.look_back_period_s > 10,
            "look_back_period_s",
            self.look_back_period_s,
            "must be more than 10 (Ray Serve's metrics interval)",
        )
        check_unknown(p, self.unknown)
        p.check(
            self.max_queued_requests >= 1,
            "max_queued_requests",
            self.max_queued_requests,
            "must be at least 1 (overload answers 503 instead of queueing without bound)",
        )
        p.check(bool(self.name), "name", self.name, "must not be empty")
        try:
            for spec in self.variant_specs()[1:]:
                check_variant(p, spec)
        except ConfigError as exc:
            p.append(str(exc))

    def variant_specs(self) -> list[VariantSpec]:
        """The primary (`main`, --checkpoint) then every variant and shadow (flags, then the YAML list), with
        their weights (--weights over each entry's `weight`)."""
        specs = [VariantSpec(PRIMARY, self.checkpoint)]
        for flag_name, shadow in (("--variant", False), ("--shadow", True)):
            specs += [VariantSpec(n, uri, shadow=shadow) for n, uri in parse_pairs(getattr(self, flag_name[2:]), flag_name)]
        for i, entry in enumerate(self.variants):
            if not isinstance(entry, dict):
                raise ConfigError(f"variants[{i}]: expected a mapping with name and checkpoint, got {entry!r}")
            known = {k: v for k, v in entry.items() if k in VARIANT_KEYS}
            extra = {k: v for k, v in entry.items() if k not in VARIANT_KEYS}
            specs.append(VariantSpec(**{"name": "", "checkpoint": "", **known, "extra": extra}))
        names = [s.name for s in specs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"variant name(s) {', '.join(twice)} given twice (`{PRIMARY}` is --checkpoint's); name each once")
        ab = [s for s in specs if not s.shadow]
        shadowed = [s.name for s in specs if s.shadow and s.weight]
        if shadowed:
            raise ConfigError(f"shadow(s) {', '.join(shadowed)} have a weight; a shadow never answers: drop its weight")
        given = self.weights if self.weights is not None else {s.name: s.weight for s in ab[1:] if s.weight}
        weights = parse_weights(given, [s.name for s in ab])
        return [VariantSpec(**{**s.__dict__, "weight": weights.get(s.name, 0.0)}) for s in specs]

    def initial_weights(self) -> dict[str, float]:
        """The A/B weights the Ingress starts with (its user_config), the primary first."""
        return {s.name: s.weight for s in self.variant_specs() if not s.shadow}


def check_variant(p: Problems, spec: VariantSpec) -> None:
    """One variant's name, checkpoint and replica settings."""
    where = f"variant {spec.name!r}"
    p.check(not spec.extra, "variants", sorted(spec.extra), f"unknown key(s) in {where}; valid ones: {', '.join(VARIANT_KEYS)}")
    p.check(bool(VARIANT_NAME.match(str(spec.name))), "variant", spec.name, "names are 1-32 of a-z 0-9 _ - (lowercase)")
    p.check(bool(spec.checkpoint), "variant", spec.name, "needs a checkpoint (NAME=URI)")
    p.check(spec.runtime is None or spec.runtime in RUNTIMES, "runtime", spec.runtime, f"{where}: one of {', '.join(RUNTIMES)}")
    low, high = spec.min_replicas, spec.max_replicas
    p.check(low is None or (isinstance(low, int) and low >= 0), "min_replicas", low, f"{where}: an integer >= 0")
    p.check(
        high is None or (isinstance(high, int) and high >= max(1, low or 0)),
        "max_replicas",
        high,
        f"{where}: >= 1 and >= min_replicas",
    )
    for name in ("num_gpus", "cpus_per_replica"):
        value = getattr(spec, name)
        p.check(value is None or (isinstance(value, (int, float)) and value >= 0), name, value, f"{where}: a number >= 0")


@dataclass
class RolloutSetConfig(Config):
    """`distcls rollout set`: new traffic weights for a running endpoint (its admin route, DISTCLS_ADMIN_TOKEN)."""

    command = "rollout set"

    url: str = opt(help="the endpoint's base URL, e.g. http://127.0.0.1:8000")
    weights: str = opt(help="the new split NAME=W,... e.g. main=50,new=50 (main takes what the others leave of 100)")
    shadow_fraction: float | None = opt(None, min=0, max=1, help="also set the share of requests mirrored")
    wait_s: float = opt(30.0, min=0, help="seconds to wait until the endpoint reports the new weights")

    def validate(self, p: Problems) -> None:
        p.check(self.url.startswith(("http://", "https://")), "url", self.url, "must start with http:// or https://")


@dataclass
class RolloutStatusConfig(Config):
    """`distcls rollout status`: the variants' traffic and their comparison with the primary, as a table."""

    command = "rollout status"

    url: str = opt(help="the endpoint's base URL, e.g. http://127.0.0.1:8000")
    json: bool = opt(False, help="print GET /v1/rollout's JSON instead of the table")

    def validate(self, p: Problems) -> None:
        p.check(self.url.startswith(("http://", "https://")), "url", self.url, "must start with http:// or https://")

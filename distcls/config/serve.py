"""`distcls serve` / `serve-config`'s config: the online endpoint on Ray Serve."""

from __future__ import annotations

from dataclasses import dataclass

from distcls.config.infer import ReplicaFields, check_unknown
from distcls.config.options import Problems, opt


@dataclass
class ServeConfig(ReplicaFields):
    """`distcls serve` / `serve-config`: the online endpoint on Ray Serve."""

    command = "serve"

    checkpoint: str = opt(help="checkpoint directory URI (change it on a running app to switch models)")
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
    batch_wait_timeout_s: float = opt(0.01, min=0, help="longest wait for a batch to fill")
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

    def validate(self, p: Problems) -> None:
        p.check(bool(self.checkpoint), "checkpoint", self.checkpoint, "is required")
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

"""The rollout's live comparison: per variant traffic and answers, per pair (a variant against the primary on
the same mirrored images) agreement. No Ray.

Ingress replicas turn what they see into events, plain dicts that cross Ray cheaply:
- `{"e": "req", "variant", "ok", "ms", "labels": [...], "scores": [...]}`: one answered request (mirrors too);
- `{"e": "pair", "variant", "primary": [[label, score], ...], "other": [[label, score], ...]}`: one mirrored
  request answered by both the primary and `variant` (images in order);
- `{"e": "drop", "variant"}` / `{"e": "mirror_error", "variant"}`: a mirror not sent (queue full) / failed.
`RolloutStats.add` folds them in; `snapshot` is GET /v1/rollout's body.
"""

from __future__ import annotations

import collections
import time

import numpy as np

LATENCY_WINDOW = 10_000  # latest requests per variant that p50/p99 are taken over
TOP_PAIRS = 5


class VariantStats:
    def __init__(self) -> None:
        self.requests = self.errors = self.images = 0
        self.score_sum = 0.0
        self.latencies_ms: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.labels: collections.Counter[str] = collections.Counter()

    def add(self, event: dict) -> None:
        self.requests += 1
        self.errors += not event["ok"]
        self.latencies_ms.append(float(event["ms"]))
        self.images += len(event.get("labels", ()))
        self.labels.update(event.get("labels", ()))
        self.score_sum += float(sum(event.get("scores", ())))

    def to_dict(self) -> dict:
        ms = np.asarray(self.latencies_ms)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if ms.size else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if ms.size else None,
            "images": self.images,
            "mean_score": round(self.score_sum / self.images, 4) if self.images else None,
            "labels": dict(self.labels.most_common()),
        }


class PairStats:
    """A variant against the primary on the images both classified (mirrored requests)."""

    def __init__(self) -> None:
        self.requests = self.images = self.agree = self.dropped = self.errors = 0
        self.delta_sum = 0.0
        self.disagreements: collections.Counter[tuple[str, str]] = collections.Counter()

    def add_pair(self, primary: list, other: list) -> None:
        self.requests += 1
        for (p_label, p_score), (o_label, o_score) in zip(primary, other):
            self.images += 1
            self.delta_sum += float(o_score) - float(p_score)
            if p_label == o_label:
                self.agree += 1
            else:
                self.disagreements[(p_label, o_label)] += 1

    def to_dict(self) -> dict:
        return {
            "mirrored_requests": self.requests,
            "images": self.images,
            "agreement": round(self.agree / self.images, 4) if self.images else None,
            "mean_score_delta": round(self.delta_sum / self.images, 4) if self.images else None,
            "top_disagreements": [
                {"primary": p, "variant": o, "count": n} for (p, o), n in self.disagreements.most_common(TOP_PAIRS)
            ],
            "mirror_errors": self.errors,
            "mirrors_dropped": self.dropped,
        }


class RolloutStats:
    """Every variant's VariantStats and every non-primary variant's PairStats, fed by events."""

    def __init__(self, primary: str, roles: dict[str, str]):
        self.primary, self.roles, self.started = primary, dict(roles), time.time()
        self.variants = {name: VariantStats() for name in roles}
        self.pairs = {name: PairStats() for name in roles if name != primary}

    def add(self, events: list[dict]) -> None:
        for event in events:
            name, kind = event.get("variant"), event.get("e")
            if name not in self.roles:
                continue
            if kind == "req":
                self.variants[name].add(event)
            elif name in self.pairs and kind == "pair":
                self.pairs[name].add_pair(event["primary"], event["other"])
            elif name in self.pairs and kind == "drop":
                self.pairs[name].dropped += 1
            elif name in self.pairs and kind == "mirror_error":
                self.pairs[name].errors += 1

    def snapshot(self, weights: dict[str, float] | None = None) -> dict:
        return {
            "primary": self.primary,
            "since": self.started,
            "weights": weights,
            "variants": {name: {"role": self.roles[name], **s.to_dict()} for name, s in self.variants.items()},
            "comparison": {name: p.to_dict() for name, p in self.pairs.items()},
        }

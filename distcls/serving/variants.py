"""Which variant answers a request: by weight, sticky by a client's key, or forced by a header. No Ray.

`pick_variant` is THE routing rule (every protocol's routes call it through `Ingress.variant_for`): a request
with `X-Distcls-Variant: NAME` gets that A/B variant; one with `X-Distcls-Key: KEY` gets the variant the key's
sha256 falls on (the same key, the same variant at the same weights); any other a random draw by weight. The
weights are the Ingress deployment's user_config (`check_weights` reads it), so every replica uses the same.
"""

from __future__ import annotations

import hashlib
import math
import random

from distcls.serving.http import RequestError

VARIANT_HEADER = "X-Distcls-Variant"
KEY_HEADER = "X-Distcls-Key"
MAX_KEY_CHARS = 256


def key_point(key: str) -> float:
    """The key's place in [0, 1): the first 8 bytes of its sha256 (stable across processes and restarts)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def pick_variant(weights: dict[str, float], key: str | None = None, forced: str | None = None, rng=random) -> str:
    """The variant for one request: `forced` (X-Distcls-Variant) if it is one, else where `key` (X-Distcls-Key)
    or a random draw falls on the weights' cumulative shares (in the weights' order, zero weights skipped)."""
    if forced is not None:
        if forced not in weights:
            raise RequestError(
                400,
                "unknown_variant",
                f"{VARIANT_HEADER}: {forced[:64]!r} is not a variant of this endpoint; the variants are {', '.join(weights)}",
            )
        return forced
    if key is not None and len(key) > MAX_KEY_CHARS:
        raise RequestError(400, "bad_request", f"{KEY_HEADER} is longer than {MAX_KEY_CHARS} characters; send a shorter key")
    point = key_point(key) if key else rng.random()
    total = sum(weights.values())
    running, last = 0.0, None
    for name, weight in weights.items():
        if weight <= 0:
            continue
        running += weight / total
        last = name
        if point < running:
            return name
    return last  # rounding left the point past the last share


def check_weights(weights, names: list[str]) -> dict[str, float]:
    """A user_config's weights -> {name: weight} over `names` (missing ones 0), or ValueError saying what is wrong."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"weights must be a mapping of variant: weight, got {weights!r}")
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(map(str, unknown))}; the variants are {', '.join(names)}")
    out = {}
    for name in names:
        value = weights.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"weight {name}={value!r} must be a finite number >= 0")
        out[name] = float(value)
    if not sum(out.values()) > 0:
        raise ValueError("the weights sum to 0; give at least one variant a positive weight")
    return out

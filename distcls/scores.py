"""What a prediction's numbers mean: calibrated probabilities, margin, entropy, an out-of-distribution score,
and "unknown". NumPy only (no torch, no Ray): label, serve and evaluate share it.

- Calibration is temperature scaling (Guo et al. 2017): probabilities are softmax(logits / T), with T fitted
  on the validation split by minimising the negative log-likelihood. It changes no prediction (argmax is
  the same), only how much the scores can be trusted. ECE, NLL and Brier measure it.
- The OOD score is the energy score (Liu et al. 2020): -T * logsumexp(logits / T). Higher means further from
  what the model was trained on. The "unknown" threshold is the energy below which a chosen share (95%) of
  the validation images fall; a row above it is labeled `unknown`, its top-k kept.

A checkpoint's `calibration` record (distcls.json) holds the temperature, the threshold and the before /
after figures; a checkpoint without one is "uncalibrated" (T = 1, no threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from distcls import DistclsError

UNKNOWN = "unknown"
KEEP_IN_DISTRIBUTION = 0.95  # share of validation images the auto threshold keeps
ECE_BINS = 15
# The temperatures a calibration may have: a fit searches well inside them, and a record outside them (a
# subnormal T makes every logits / T infinite, every score NaN) is refused when a checkpoint is read.
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-3, 1e3


def recalibrate_hint(meta: dict) -> str:
    """How to replace a bad calibration record: from the model it was calibrated from, when it says which."""
    source = meta.get("calibrated_from")
    model = source.get("model") if isinstance(source, dict) else None
    if isinstance(model, str) and model:
        return f"recalibrate from the model it came from: `distcls calibrate --checkpoint {model} --data VAL --out NEW`"
    return "delete its `calibration` record from distcls.json, then recalibrate with `distcls calibrate`"


@dataclass(frozen=True)
class Calibration:
    """How a model's logits become scores: the fitted temperature and the recorded "unknown" threshold."""

    temperature: float = 1.0
    ood_threshold: float | None = None
    calibrated: bool = False

    @classmethod
    def of(cls, meta: dict, where: str = "") -> Calibration:
        """The calibration a checkpoint's metadata records (uncalibrated without a record); a malformed record,
        or one whose temperature is outside [TEMPERATURE_MIN, TEMPERATURE_MAX] or whose threshold is not finite,
        is refused in one line naming `where` (the distcls.json it came from, when the caller knows it)."""
        record = meta.get("calibration")
        if not isinstance(record, dict):
            return cls()
        source = f"the calibration record in {where}" if where else "the checkpoint's calibration record"
        fix = recalibrate_hint(meta)
        try:
            temperature = float(record["temperature"])
            threshold = record.get("ood_threshold")
            threshold = None if threshold is None else float(threshold)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise DistclsError(f"scores: {source} is malformed ({exc}); {fix}") from None
        if not TEMPERATURE_MIN <= temperature <= TEMPERATURE_MAX:  # NaN fails this too
            raise DistclsError(
                f"scores: {source} has temperature {temperature!r}, outside [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}] "
                f"(scores would be NaN or meaningless); {fix}"
            )
        if threshold is not None and not math.isfinite(threshold):
            raise DistclsError(f"scores: {source} has threshold {threshold!r}, not a finite energy; {fix}")
        return cls(temperature, threshold, True)

    def describe(self) -> str:
        if not self.calibrated:
            return "uncalibrated (softmax of raw logits; `distcls calibrate` fits a temperature)"
        return f"calibrated (temperature {self.temperature:.3f})"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def logsumexp(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature))


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The energy OOD score, -T * logsumexp(logits / T): higher = less like the training data."""
    return -temperature * logsumexp(np.asarray(logits, dtype=np.float64) / temperature)


@dataclass
class Scored:
    """Per-row scores of a batch of logits (N, C)."""

    probs: np.ndarray  # calibrated probabilities (N, C)
    order: np.ndarray  # top-k class indices by descending probability (N, k)
    margin: np.ndarray  # top-1 minus top-2 probability
    entropy: np.ndarray  # of the calibrated distribution, in nats
    ood_score: np.ndarray  # energy
    unknown: np.ndarray  # bool: ood_score above the threshold in use


def score(logits: np.ndarray, calibration: Calibration, top_k: int, threshold: float | None = None) -> Scored:
    """Calibrated probabilities, top-k, margin, entropy and energy of a batch; `unknown` where the energy
    exceeds `threshold` (None: never)."""
    logits = np.asarray(logits, dtype=np.float64)
    t = calibration.temperature
    logp = log_softmax(logits / t)
    probs = np.exp(logp)
    order = np.argsort(-probs, axis=1, kind="stable")[:, : min(top_k, probs.shape[1])]
    sorted2 = -np.sort(-probs, axis=1)[:, :2]
    margin = sorted2[:, 0] - (sorted2[:, 1] if probs.shape[1] > 1 else 0.0)
    entropy = -(probs * logp).sum(axis=1)
    ood = energy(logits, t)
    unknown = ood > threshold if threshold is not None else np.zeros(len(ood), dtype=bool)
    return Scored(probs, order, margin, entropy, ood, unknown)


def resolve_unknown(setting: str | float | None, calibration: Calibration, where: str) -> float | None:
    """--unknown: "off" (None), "auto" (the checkpoint's recorded threshold), or a number (an energy)."""
    if setting is None or str(setting).lower() == "off":
        return None
    if str(setting).lower() == "auto":
        if calibration.ood_threshold is None:
            raise DistclsError(
                f"{where}: --unknown auto needs the threshold a calibrated checkpoint records, and this "
                "one has none; run `distcls calibrate` on it, pass --unknown THRESHOLD, or --unknown off"
            )
        return calibration.ood_threshold
    try:
        value = float(setting)
    except ValueError:
        raise DistclsError(f"{where}: --unknown {setting!r} is not auto, off or a number (an energy score)") from None
    if not math.isfinite(value):
        raise DistclsError(f"{where}: --unknown {setting!r} must be finite")
    return value


# --- fitting and measuring -------------------------------------------------------------------------------


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return float(-np.log(p).mean()) if len(labels) else float("nan")


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of the squared distance between the probabilities and the one-hot label."""
    if not len(labels):
        return float("nan")
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, list]:
    """Equal-width confidence bins: mean confidence, accuracy and count per bin (the reliability diagram)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out: dict[str, list] = {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "confidence": [],
        "accuracy": [],
        "count": [],
    }
    for b in range(bins):
        m = which == b
        out["count"].append(int(m.sum()))
        out["confidence"].append(float(conf[m].mean()) if m.any() else None)
        out["accuracy"].append(float(correct[m].mean()) if m.any() else None)
    return out


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of (share of images) * |accuracy - mean confidence|."""
    if not len(labels):
        return float("nan")
    r = reliability(probs, labels, bins)
    n = len(labels)
    return float(sum(c / n * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"]) if c))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T). The NLL is convex in 1/T, so a golden-section
    search over log(1/T) in [1/100, 100] finds the minimum (to 1e-6 in log space); the result always lies in
    [TEMPERATURE_MIN, TEMPERATURE_MAX]. Non-finite logits (a broken model) are refused."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise DistclsError("calibrate: no labeled images to fit a temperature on")
    bad = int((~np.isfinite(logits)).any(axis=1).sum())
    if bad:
        raise DistclsError(
            f"calibrate: the model gave non-finite logits (NaN or infinity) for {bad} of {len(labels)} images; "
            "its weights are broken (retrain, or use another checkpoint): no temperature fits them"
        )
    picked = logits[np.arange(len(labels)), labels]

    def loss(log_beta: float) -> float:
        beta = math.exp(log_beta)
        return float((logsumexp(logits * beta) - beta * picked).mean())

    lo, hi = math.log(1e-2), math.log(1e2)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > 1e-6:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    t = 1.0 / math.exp((lo + hi) / 2)
    return min(max(t, TEMPERATURE_MIN), TEMPERATURE_MAX)


def fit_calibration(logits: np.ndarray, labels: np.ndarray, keep: float = KEEP_IN_DISTRIBUTION) -> dict:
    """The `calibration` record for distcls.json from validation logits and labels: the temperature, the
    before / after ECE and NLL, and the energy threshold that keeps `keep` of these images."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    t = fit_temperature(logits, labels)
    before, after = probabilities(logits), probabilities(logits, t)
    threshold = float(np.quantile(energy(logits, t), keep))
    return {
        "temperature": t,
        "ece_before": ece(before, labels),
        "ece_after": ece(after, labels),
        "nll_before": nll(before, labels),
        "nll_after": nll(after, labels),
        "brier_before": brier(before, labels),
        "brier_after": brier(after, labels),
        "ood_score": "energy",
        "ood_threshold": threshold,
        "ood_keep": keep,
        "images": int(len(labels)),
        "bins": ECE_BINS,
    }


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling OOD (higher score) from in-distribution: the probability that a
    random OOD image scores above a random in-distribution one (ties count half)."""
    s = np.concatenate([np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)])
    ordered = np.sort(s)
    ranks = (np.searchsorted(ordered, s, side="left") + np.searchsorted(ordered, s, side="right") + 1) / 2
    n_in, n_out = len(in_scores), len(out_scores)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))

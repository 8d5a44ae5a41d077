"""Classification metrics from a confusion matrix: pure numpy, no Ray, no torch needed.

Conventions (as scikit-learn with zero_division=0): rows = true class, columns = predicted class; a
class with no predictions has precision 0; macro averages weight classes equally over classes that
occur in the labels or the predictions; weighted averages weight by support.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows have the true label among the k highest scores."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int((top == np.asarray(labels)[:, None]).any(axis=1).sum())


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support.astype(np.int64),
        "predicted": predicted.astype(np.int64),
    }


def summarize(cm: np.ndarray, class_names: list[str], top5_hits: int | None = None, loss: float | None = None) -> dict:
    """All headline metrics from a confusion matrix (plus top-5 accuracy from the number of top-5 hits, and the
    mean loss, when given)."""
    cm = np.asarray(cm)
    n = int(cm.sum())
    pc = per_class(cm)
    present = (pc["support"] + pc["predicted"]) > 0
    support = pc["support"].astype(np.float64)
    out = {
        "num_samples": n,
        "accuracy": float(np.trace(cm) / n) if n else 0.0,
        "macro_precision": float(pc["precision"][present].mean()) if present.any() else 0.0,
        "macro_recall": float(pc["recall"][present].mean()) if present.any() else 0.0,
        "macro_f1": float(pc["f1"][present].mean()) if present.any() else 0.0,
        "weighted_f1": float((pc["f1"] * support).sum() / support.sum()) if support.sum() else 0.0,
        "per_class": {
            name: {
                "precision": float(pc["precision"][i]),
                "recall": float(pc["recall"][i]),
                "f1": float(pc["f1"][i]),
                "support": int(pc["support"][i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.astype(int).tolist(),
    }
    if top5_hits is not None:
        out["top5_accuracy"] = float(top5_hits / n) if n else 0.0
    if loss is not None:
        out["loss"] = float(loss)
    return out


def balanced_class_weights(counts: list[int] | np.ndarray) -> np.ndarray:
    """n_samples / (n_classes * count_c), as scikit-learn's 'balanced'; 0 for an absent class."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def effective_number_weights(counts: list[int] | np.ndarray, beta: float) -> np.ndarray:
    """Class-balanced loss weights (Cui et al. 2019): (1 - beta) / (1 - beta^n_c), scaled so that the present
    classes' weights sum to their number; 0 for an absent class. beta -> 0 is no weighting, beta -> 1 inverse
    frequency."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    return weights * present.sum() / weights.sum()

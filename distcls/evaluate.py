"""`distcls evaluate`: a model directory (checkpoint or export) over a whole labeled split.

Evaluation runs over the whole split with Ray Data (no sampling): decode/preprocess in tasks, predict in
an actor pool that loads the checkpoint once per actor, aggregate the confusion matrix on the driver.
"""

from __future__ import annotations

import io
import json
import sys

import numpy as np

from distcls import objects, storage
from distcls.checkpoint import checkpoint_id
from distcls.config import EvaluateConfig
from distcls.infer import verify_model
from distcls.infer.labeled import predict_labeled
from distcls.metrics import confusion_matrix, summarize, topk_correct
from distcls.scores import Calibration, brier, ece, nll, probabilities, reliability
from distcls.splits import TEST_SPLITS, open_labeled


def run_evaluation(cfg: EvaluateConfig) -> dict:
    """Write report.json, report.md, confusion_matrix.png, calibration.png and predictions.parquet to cfg.out."""
    meta = verify_model(cfg.checkpoint)  # tampered or incomplete: one line, before Ray starts
    class_names = meta["class_names"]
    data = open_labeled(cfg.data, class_names, TEST_SPLITS, data_names=list(cfg.class_names) or None)
    if data.is_packed:
        print(f"evaluate: {data.source}", flush=True)
    max_bytes = objects.max_object_bytes(cfg.max_object_mb)
    p = predict_labeled(cfg.checkpoint, data, cfg.batch_size, cfg.concurrency, cfg.num_gpus, cfg.runtime, "evaluate", max_bytes)
    k = len(class_names)
    calibration = Calibration.of(meta)
    cm = confusion_matrix(p.labels, p.logits.argmax(1), k) if len(p.labels) else np.zeros((k, k), np.int64)
    raw = probabilities(p.logits) if len(p.labels) else np.zeros((0, k))
    probs = probabilities(p.logits, calibration.temperature) if len(p.labels) else raw
    report = summarize(
        cm,
        class_names,
        top5_hits=topk_correct(p.logits, p.labels, 5) if len(p.labels) else 0,
        loss=nll(raw, p.labels) if len(p.labels) else float("nan"),
    )
    report.update(
        {
            # the scores label and serve report (calibrated when the model is)
            "calibrated": calibration.calibrated,
            "temperature": calibration.temperature,
            "ece": ece(probs, p.labels),
            "nll": nll(probs, p.labels),
            "brier": brier(probs, p.labels),
            "ece_uncalibrated": ece(raw, p.labels),
            "reliability": reliability(probs, p.labels),
            "skipped": p.skipped.count,
            "skipped_by_kind": dict(p.skipped.by_kind),
            "skipped_examples": p.skipped.examples,
            "checkpoint": cfg.checkpoint,
            "model_id": checkpoint_id(meta),
            "data": cfg.data,
            "split": data.split,  # the split read of packed data (None for an ImageFolder or a manifest)
            "runtime": p.runtime,
            "runtime_note": p.note,
            "class_names": class_names,
        }
    )
    rows = {
        "path": p.paths,
        "label": [class_names[i] for i in p.labels],
        "prediction": [class_names[i] for i in p.logits.argmax(1)] if len(p.labels) else [],
        "score": probs.max(1).tolist() if len(p.labels) else [],
    }
    write_reports(cfg.out, report, rows)
    return report


def write_reports(out: str, report: dict, rows: dict) -> None:
    """The records first (report.json, predictions.parquet, report.md), then the figures: a figure that
    cannot be drawn is reported in one line and never costs the records or the other figure."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage.write_text(storage.join_uri(out, "report.json"), json.dumps(report, indent=2))
    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    storage.write_bytes(storage.join_uri(out, "predictions.parquet"), buf.getvalue())
    storage.write_text(storage.join_uri(out, "report.md"), render_markdown(report))
    figures = {
        "calibration.png": lambda: plot_reliability(report),
        "confusion_matrix.png": lambda: plot_confusion(np.asarray(report["confusion_matrix"]), report["class_names"]),
    }
    for name, draw in figures.items():
        try:
            png = draw()
        except Exception as exc:  # matplotlib on data it was not made for: the numbers above are what matters
            print(f"evaluate: {name} not written ({type(exc).__name__}: {first_line(exc)})", file=sys.stderr, flush=True)
            continue
        storage.write_bytes(storage.join_uri(out, name), png)


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


def render_markdown(report: dict) -> str:
    scores = f"calibrated, temperature {report['temperature']:.3f}" if report["calibrated"] else "uncalibrated"
    lines = [
        "# Evaluation report",
        "",
        f"- checkpoint: `{report['checkpoint']}`",
        f"- data: `{report['data']}`" + (f" ({report['split']} split)" if report.get("split") else ""),
        f"- images: {report['num_samples']} evaluated, {report['skipped']} skipped (could not be decoded)",
        f"- scores: {scores} (ECE {report['ece']:.4f}; {report['ece_uncalibrated']:.4f} before calibration)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in ("accuracy", "top5_accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1", "ece", "nll", "brier"):
        if key in report:
            lines.append(f"| {key} | {report[key]:.4f} |")
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, m in report["per_class"].items():
        lines.append(f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |")
    return "\n".join(lines) + "\n"


def plot_confusion(cm: np.ndarray, class_names: list[str]) -> bytes:
    from distcls.plots import png_bytes, subplots

    k = len(class_names)
    size = min(4 + 0.5 * k, 30)
    fig, ax = subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (rows: true class)")
    if k <= 40:
        ax.set_xticks(range(k), class_names, rotation=90)
        ax.set_yticks(range(k), class_names)
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(
                    j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color="white" if cm[i, j] > threshold else "black"
                )
    return png_bytes(fig)


def plot_reliability(report: dict) -> bytes:
    """The reliability diagram: accuracy against mean confidence per confidence bin, with the diagonal."""
    from distcls.plots import png_bytes, subplots

    r = report["reliability"]
    fig, ax = subplots(figsize=(5, 5))
    centers = [(lo + hi) / 2 for lo, hi in zip(r["lower"], r["upper"])]
    accuracy = [a if a is not None else 0.0 for a in r["accuracy"]]
    ax.bar(centers, accuracy, width=r["upper"][0] - r["lower"][0], edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfectly calibrated")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence (top-1 score)",
        ylabel="accuracy",
        title=f"{'Calibrated' if report['calibrated'] else 'Uncalibrated'} scores: ECE {report['ece']:.4f}",
    )
    ax.legend(loc="upper left")
    return png_bytes(fig)

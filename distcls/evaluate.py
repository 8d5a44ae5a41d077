"""`distcls evaluate` and `distcls checkpoint from-pretrained`.

Evaluation runs over the whole split with Ray Data (no sampling): decode/preprocess in tasks, predict in
an actor pool that loads the checkpoint once per actor, aggregate the confusion matrix on the driver.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch

from distcls import storage
from distcls.checkpoint import checkpoint_id
from distcls.config import EvaluateConfig
from distcls.datasets import ErrorTally, build_dataset, decode_sample, load_labeled_index
from distcls.infer import predict_dataset, prepare_runtime, verify_model
from distcls.metrics import confusion_matrix, summarize, topk_correct
from distcls.runtime import init_ray
from distcls.transforms import PreprocessSpec


def run_evaluation(cfg: EvaluateConfig) -> dict:
    """Write report.json, report.md, confusion_matrix.png and predictions.parquet to cfg.out."""
    meta = verify_model(cfg.checkpoint)  # tampered or incomplete: one line, before Ray starts
    class_names = meta["class_names"]
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    index = load_labeled_index(cfg.data, class_names=class_names)
    runtime, note = prepare_runtime(cfg.checkpoint, cfg.runtime, cfg.num_gpus > 0, decode_sample(index.paths, spec))
    print(f"evaluate: runtime {runtime} ({note})", flush=True)
    init_ray()
    ds = predict_dataset(
        build_dataset(index, spec), cfg.checkpoint, cfg.batch_size, cfg.concurrency, cfg.num_gpus, runtime=runtime
    )
    k = len(class_names)
    cm = np.zeros((k, k), dtype=np.int64)
    top5, loss_sum, tally = 0, 0.0, ErrorTally()
    rows: dict[str, list] = {"path": [], "label": [], "prediction": [], "score": []}
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        batch = tally.drop_errors(batch)
        if not len(batch["label"]):
            continue
        logits, labels = np.array(batch["logits"]), np.array(batch["label"])
        cm += confusion_matrix(labels, logits.argmax(1), k)
        top5 += topk_correct(logits, labels, 5)
        loss_sum += float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), reduction="sum"))
        probs = torch.from_numpy(logits).softmax(1).numpy()
        rows["path"] += list(batch["path"])
        rows["label"] += [class_names[i] for i in labels]
        rows["prediction"] += [class_names[i] for i in logits.argmax(1)]
        rows["score"] += probs.max(1).tolist()
    report = summarize(cm, class_names, top5_hits=top5, loss=loss_sum / max(1, cm.sum()))
    report.update(
        {
            "skipped": tally.count,
            "skipped_by_kind": dict(tally.by_kind),
            "skipped_examples": tally.examples,
            "checkpoint": cfg.checkpoint,
            "model_id": checkpoint_id(meta),
            "data": cfg.data,
            "runtime": runtime,
            "runtime_note": note,
            "class_names": class_names,
        }
    )
    write_reports(cfg.out, report, rows)
    return report


def write_reports(out: str, report: dict, rows: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage.write_text(storage.join_uri(out, "report.json"), json.dumps(report, indent=2))
    storage.write_text(storage.join_uri(out, "report.md"), render_markdown(report))
    storage.write_bytes(
        storage.join_uri(out, "confusion_matrix.png"),
        plot_confusion(np.asarray(report["confusion_matrix"]), report["class_names"]),
    )
    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    storage.write_bytes(storage.join_uri(out, "predictions.parquet"), buf.getvalue())


def render_markdown(report: dict) -> str:
    lines = [
        "# Evaluation report",
        "",
        f"- checkpoint: `{report['checkpoint']}`",
        f"- data: `{report['data']}`",
        f"- images: {report['num_samples']} evaluated, {report['skipped']} skipped (could not be decoded)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in ("accuracy", "top5_accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1"):
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

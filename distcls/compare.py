"""`distcls compare`: checkpoints and exports side by side on one labeled test split.

Every model is scored on the same images (decoded once per preprocessing spec, through the one
preprocessing path) and timed the same way: in this process, `threads` torch / onnxruntime threads,
batches of `batch_size` through the inference engine on `--runtime` (the path label and serve take),
`warmup_batches` untimed, then `speed_batches` timed. Output: compare.json, compare.md (the table) and compare.png
(accuracy against images/s, one point per model).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from distcls import DistclsError, storage
from distcls.checkpoint import read_meta
from distcls.config import CompareConfig
from distcls.infer import Predictor, is_export, load_model, model_file_uri
from distcls.metrics import confusion_matrix, summarize
from distcls.splits import TEST_SPLITS, LabeledSplit, limit_batches, open_labeled
from distcls.transforms import PreprocessSpec

COLUMNS = (
    ("name", "model", "{}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("macro_f1", "macro F1", "{:.4f}"),
    ("size_mb", "size MB", "{:.2f}"),
    ("parameters_m", "params M", "{:.2f}"),
    ("images_per_s", "images/s", "{:.1f}"),
    ("kind", "kind", "{}"),
    ("runtime", "runtime", "{}"),
)


def decode_split(data: LabeledSplit, spec: PreprocessSpec, per_class: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(uint8 NCHW images, labels, skipped) for the whole split (packed data: its first `per_class` rows of each
    class, in shard order); undecodable images are skipped."""
    images, labels, skipped = [], [], 0
    batches = data.iter_decoded(spec)
    if data.is_packed:
        batches = limit_batches(batches, per_class, len(data.class_names))
    for batch in batches:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        images.append(batch["image"][ok])
        labels.append(np.asarray(batch["label"], dtype=np.int64)[ok])
        skipped += int((~ok).sum())
    size = spec.image_size
    if not images:
        return np.zeros((0, 3, size, size), np.uint8), np.zeros(0, np.int64), skipped
    return np.concatenate(images), np.concatenate(labels), skipped


def predict(model: Predictor, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([model.predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def images_per_second(model: Predictor, images: np.ndarray, cfg: CompareConfig) -> float:
    """Throughput of the label/serve forward path on batches of the split's own images."""
    reps = int(np.ceil(cfg.batch_size / len(images)))
    batch = np.concatenate([images] * reps)[: cfg.batch_size] if reps > 1 else images[: cfg.batch_size]
    for _ in range(cfg.warmup_batches):
        model.predict(batch)
    started = time.perf_counter()
    for _ in range(cfg.speed_batches):
        model.predict(batch)
    return cfg.speed_batches * len(batch) / (time.perf_counter() - started)


def describe(uri: str, meta: dict) -> tuple[str, str]:
    """(default display name, kind) of a checkpoint or export."""
    size = meta["preprocessing"]["image_size"]
    kind = "pytorch float32"
    if is_export(meta):
        e = meta["export"]
        kind = e["format"] + " " + (e["quantization"] or "float32")
    name = f"{meta['architecture']}@{size} {kind}"
    if "distillation" in meta:
        name += " (distilled)"
    return name, kind


def evaluate_one(uri: str, name: str | None, data: LabeledSplit, cache: dict, cfg: CompareConfig) -> dict:
    model = load_model(uri, cfg.runtime, "cpu", threads=cfg.threads)
    meta = model.meta
    if list(meta["class_names"]) != list(data.class_names):
        raise DistclsError(
            f"compare: {uri} was trained on other classes ({len(meta['class_names'])}: "
            f"{meta['class_names'][:3]}...) than {cfg.data} has ({data.class_names[:3]}...); "
            "compare models of one task on its test split"
        )
    key = json.dumps(meta["preprocessing"], sort_keys=True)
    if key not in cache:
        cache[key] = decode_split(data, PreprocessSpec.from_dict(meta["preprocessing"]), cfg.limit_per_class)
    images, labels, skipped = cache[key]
    logits = predict(model, images, cfg.batch_size)
    summary = summarize(confusion_matrix(labels, logits.argmax(1), len(data.class_names)), data.class_names)
    default_name, kind = describe(uri, meta)
    row = {
        "name": name or default_name,
        "uri": uri,
        "kind": kind,
        "runtime": model.runtime,
        "model_id": meta["weights_sha256"],
        "architecture": meta["architecture"],
        "image_size": meta["preprocessing"]["image_size"],
        "accuracy": summary["accuracy"],
        "macro_f1": summary["macro_f1"],
        "num_samples": summary["num_samples"],
        "skipped": skipped,
        "size_mb": len(storage.read_bytes(model_file_uri(uri))) / 1e6,
        "parameters_m": (model.parameters or 0) / 1e6,
        "images_per_s": images_per_second(model, images, cfg),
    }
    if "distillation" in meta:
        row["distillation"] = meta["distillation"]
    return row


def render_table(rows: list[dict], markdown: bool) -> str:
    cells = [[fmt.format(r[key]) for key, _, fmt in COLUMNS] for r in rows]
    heads = [title for _, title, _ in COLUMNS]
    if markdown:
        lines = [
            "| " + " | ".join(heads) + " |",
            "|" + "|".join("---" if i in (0, 6, 7) else "---:" for i in range(len(heads))) + "|",
        ]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]

    def line(items):
        return "  ".join(s.ljust(w) if i in (0, 6, 7) else s.rjust(w) for i, (s, w) in enumerate(zip(items, widths)))

    return "\n".join([line(heads), line(["-" * w for w in widths]), *map(line, cells)])


def plot(rows: list[dict], title: str) -> bytes:
    from distcls.plots import png_bytes, subplots

    fig, ax = subplots(figsize=(10, 5.5))
    markers = "osD^v<>ph*"
    for i, r in enumerate(rows):  # marker area grows with the size on disk
        ax.scatter(
            r["images_per_s"],
            r["accuracy"],
            s=30 + 15 * r["size_mb"],
            marker=markers[i % len(markers)],
            label=f"{r['name']} ({r['size_mb']:.1f} MB)",
            alpha=0.8,
        )
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set(xlabel="images/s (this machine, same batch and threads for all)", ylabel="test accuracy", title=title)
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    return png_bytes(fig)


def run_compare(cfg: CompareConfig) -> dict:
    """Evaluate and time every model; write compare.json, compare.md, compare.png; return the record."""
    torch.set_num_threads(cfg.threads)
    class_names = read_meta(cfg.models[0])["class_names"]  # the split in the models' class order
    data = open_labeled(cfg.data, class_names, TEST_SPLITS).limit_per_class(cfg.limit_per_class)
    cache: dict = {}
    names = list(cfg.names) or [None] * len(cfg.models)
    if data.is_packed:
        limit = f", at most {cfg.limit_per_class} per class" if cfg.limit_per_class else ""
        print(f"compare: {len(cfg.models)} models on {data.source}{limit}", flush=True)
    else:
        print(f"compare: {len(cfg.models)} models on {len(data)} images of {cfg.data}", flush=True)
    rows = []
    for uri, name in zip(cfg.models, names):
        rows.append(evaluate_one(uri, name, data, cache, cfg))
        r = rows[-1]
        print(f"  {r['name']}: accuracy {r['accuracy']:.4f}, {r['images_per_s']:.1f} images/s", flush=True)
    setup = {
        "data": cfg.data,
        "split": data.split,  # the split read of packed data (None for an ImageFolder or a manifest)
        "images": rows[0]["num_samples"],
        "batch_size": cfg.batch_size,
        "threads": cfg.threads,
        "speed_batches": cfg.speed_batches,
        "warmup_batches": cfg.warmup_batches,
    }
    record = {"setup": setup, "models": rows, "text": render_table(rows, markdown=False)}
    title = f"{cfg.data} ({setup['images']} images), batch {cfg.batch_size}, {cfg.threads} thread(s)"
    md = (
        f"# Model comparison\n\n- data: `{cfg.data}` ({setup['images']} images)\n- speed: batch "
        f"{cfg.batch_size}, {cfg.threads} thread(s), {cfg.warmup_batches} warm-up + {cfg.speed_batches} "
        f"timed batches per model, on this machine\n\n" + render_table(rows, markdown=True)
    )
    storage.write_text(storage.join_uri(cfg.out, "compare.json"), json.dumps(record, indent=2))
    storage.write_text(storage.join_uri(cfg.out, "compare.md"), md)
    storage.write_bytes(storage.join_uri(cfg.out, "compare.png"), plot(rows, title))
    return record

"""`distcls bench trust`: the measurements behind calibrated scores, "unknown", label-error finding and dedup.

- calibration: a demo-sized fine-tune (Fashion-MNIST, 1,000 training images per class, 64 px, 3 epochs;
  calibrated on its 10% validation split at the end of `train`), then ECE of the raw and of the calibrated
  scores on the full 10,000-image test split.
- ood: the same model on the test split against images it never saw: scikit-learn's digits (8x8, scaled up),
  real photos (crops of scikit-image's samples) and uniform noise; AUROC of max-softmax (1 - top-1
  probability) and of the energy score, and the share of test images `--unknown auto` keeps.
- label_issues: 2,000 Fashion-MNIST training images (200 per class), 10% of labels flipped to another class
  (seeded); `find-label-issues` (5 folds); precision and recall of its flags for the flipped images.
- dedup: 5,000 test images plus 50 exact and 50 re-encoded (JPEG q75, resized to 40 px) copies under new
  names; `label --embeddings` then `dedup` at its defaults: recall of the 100 planted pairs and the groups
  that hold no planted pair (false groups).
- dedup_scale: the IVF search on 1,000,000 synthetic 1,280-d embeddings with 1,000 planted near-copies:
  seconds, peak memory and recall.
"""

from __future__ import annotations

import io
import json
import resource
import time

import numpy as np
from PIL import Image

from distcls import storage
from distcls.config import DedupConfig, EvaluateConfig, FindLabelIssuesConfig, LabelConfig, TrainConfig
from distcls.tools.config import FashionMnistConfig

PARTS = ("calibration", "ood", "label_issues", "dedup", "dedup_scale")


def write_png(uri: str, image: np.ndarray) -> tuple[str, bytes]:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return uri, buf.getvalue()


def fine_tune(root: str) -> tuple[str, str]:
    """(checkpoint, test split URI): the demo's recipe on 1,000 images per class."""
    from distcls import run_training
    from distcls.tools.fmnist import write_fashion_mnist

    data = f"{root}/fm1000"
    write_fashion_mnist(FashionMnistConfig(out=data, limit_per_class=1000, splits=("train",)), progress=False)
    write_fashion_mnist(FashionMnistConfig(out=data, limit_per_class=None, splits=("test",)), progress=False)
    result = run_training(
        TrainConfig(
            data=f"{data}/train",
            val_fraction=0.1,
            epochs=3,
            image_size=64,
            batch_size=32,
            num_workers=2,
            storage=f"{root}/runs",
            name=f"trust-{int(time.time())}",
        )
    )
    return result["checkpoint"], f"{data}/test"


def bench_calibration(checkpoint: str, test: str, root: str) -> dict:
    from distcls import run_evaluation
    from distcls.checkpoint import read_meta

    report = run_evaluation(EvaluateConfig(checkpoint=checkpoint, data=test, out=f"{root}/eval", concurrency=2))
    cal = read_meta(checkpoint)["calibration"]
    return {
        "test_images": report["num_samples"],
        "test_accuracy": report["accuracy"],
        "temperature": cal["temperature"],
        "ece_before": report["ece_uncalibrated"],
        "ece_after": report["ece"],
        "nll_after": report["nll"],
        "brier_after": report["brier"],
        "val_ece_before": cal["ece_before"],
        "val_ece_after": cal["ece_after"],
        "val_images": cal["images"],
    }


def ood_sets(root: str) -> dict[str, str]:
    """Folders of images Fashion-MNIST never had: digits, photos, noise (ImageFolder-style, one class)."""
    from sklearn.datasets import load_digits

    from distcls.tools.bench.harness import make_photos

    rng = np.random.default_rng(0)
    digits = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    items = [write_png(f"{root}/ood/digits/x/{i}.png", img) for i, img in enumerate(digits)]
    items += [(f"{root}/ood/photos/x/{i}.jpg", jpg) for i, jpg in enumerate(make_photos(500))]
    items += [write_png(f"{root}/ood/noise/x/{i}.png", rng.integers(0, 256, (28, 28), dtype=np.uint8)) for i in range(500)]
    storage.write_many(items)
    return {name: f"{root}/ood/{name}" for name in ("digits", "photos", "noise")}


def label_scores(checkpoint: str, folder: str, output: str) -> dict[str, np.ndarray]:
    from distcls import read_labels, run_labeling

    run_labeling(LabelConfig(output=output, checkpoint=checkpoint, input=folder, concurrency=(2,)), progress=False)
    rows = read_labels(output, columns=["score", "ood_score", "error"]).to_pydict()
    good = [e is None for e in rows["error"]]
    return {k: np.asarray([v for v, g in zip(rows[k], good) if g], dtype=np.float64) for k in ("score", "ood_score")}


def bench_ood(checkpoint: str, test: str, root: str) -> dict:
    from distcls.checkpoint import read_meta
    from distcls.scores import auroc

    threshold = read_meta(checkpoint)["calibration"]["ood_threshold"]
    inside = label_scores(checkpoint, test, f"{root}/labels/test")
    out: dict = {
        "threshold": threshold,
        "test_images": len(inside["score"]),
        "unknown_auto_keeps": float((inside["ood_score"] <= threshold).mean()),
    }
    for name, folder in ood_sets(root).items():
        s = label_scores(checkpoint, folder, f"{root}/labels/{name}")
        out[name] = {
            "images": len(s["score"]),
            "auroc_max_softmax": auroc(-inside["score"], -s["score"]),
            "auroc_energy": auroc(inside["ood_score"], s["ood_score"]),
            "flagged_unknown": float((s["ood_score"] > threshold).mean()),
        }
    return out


def bench_label_issues(root: str, per_class: int = 200, flip: float = 0.1, folds: int = 5, epochs: int = 5) -> dict:
    from distcls.curate.label_issues import run_find_label_issues
    from distcls.tools.fmnist import CLASS_NAMES, write_fashion_mnist

    data = f"{root}/li"
    write_fashion_mnist(FashionMnistConfig(out=data, limit_per_class=per_class, splits=("train",)), progress=False)
    paths = sorted(p for p in storage.list_files(f"{data}/train") if p.endswith(".png"))
    names = sorted(CLASS_NAMES)
    rng = np.random.default_rng(0)
    flipped = set(rng.choice(len(paths), size=int(flip * len(paths)), replace=False).tolist())
    lines = ["path,label"]
    for i, p in enumerate(paths):
        label = p.split("/")[-2]
        if i in flipped:
            label = names[(names.index(label) + int(rng.integers(1, len(names)))) % len(names)]
        lines.append(f"{p},{label}")
    manifest = f"{root}/li/noisy.csv"
    storage.write_text(manifest, "\n".join(lines) + "\n")
    summary = run_find_label_issues(
        FindLabelIssuesConfig(
            data=manifest,
            out=f"{root}/li/out",
            folds=folds,
            epochs=3,
            image_size=64,
            batch_size=32,
            num_workers=2,
            max_concurrent=1,
        )
    )
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{root}/li/out/label_issues.parquet"))).to_pydict()
    probs = pq.read_table(io.BytesIO(storage.read_bytes(f"{root}/li/out/pred_probs.parquet"))).to_pandas()
    truth = np.array([p in {paths[i] for i in flipped} for p in table["path"]])
    flagged = np.asarray(table["is_issue"], dtype=bool)
    out = {
        "images": len(paths),
        "flipped": int(truth.sum()),
        "flagged": int(flagged.sum()),
        "precision": float((truth & flagged).sum() / max(1, flagged.sum())),
        "recall": float((truth & flagged).sum() / truth.sum()),
        "out_of_sample_accuracy": summary["out_of_sample_accuracy"],
        "seconds": summary["seconds"],
        "folds": folds,
        "epochs": epochs,
    }
    # along the ranking (lowest label quality first): precision where recall first reaches 0.6
    order = np.argsort(np.asarray(table["quality"], dtype=np.float64), kind="stable")
    hits = np.cumsum(truth[order])
    k = int(np.searchsorted(hits, 0.6 * truth.sum())) + 1
    out["ranking_precision_at_recall_0.6"] = float(hits[k - 1] / k)
    # cleanlab's other filters on the same out-of-sample probabilities
    from cleanlab.filter import find_label_issues

    given = np.array([names.index(x) for x in table["given_label"]])
    pred = probs[[f"p_{n}" for n in names]].to_numpy()
    for method in ("prune_by_class", "both", "confident_learning", "predicted_neq_given"):
        f = np.asarray(find_label_issues(given, pred, filter_by=method, n_jobs=1), dtype=bool)
        out[f"filter_{method}"] = {
            "flagged": int(f.sum()),
            "precision": float((truth & f).sum() / max(1, f.sum())),
            "recall": float((truth & f).sum() / truth.sum()),
        }
    return out


def bench_dedup(checkpoint: str, test: str, root: str, n: int = 5000) -> dict:
    from distcls import run_labeling
    from distcls.curate.dedup import run_dedup

    paths = sorted(p for p in storage.list_files(test) if p.endswith(".png"))[:n]
    rng = np.random.default_rng(0)
    picks = rng.choice(len(paths), size=100, replace=False)
    bucket = f"{root}/dd/in"
    items = [(f"{bucket}/img-{i:05d}.png", storage.read_bytes(p)) for i, p in enumerate(paths)]
    planted = set()
    for k, i in enumerate(picks):
        name = f"{bucket}/img-{i:05d}.png"
        if k < 50:
            items.append((f"{bucket}/copy-{k:03d}.png", items[i][1]))
            planted.add(frozenset({name, f"{bucket}/copy-{k:03d}.png"}))
        else:
            img = Image.open(io.BytesIO(items[i][1])).convert("L").resize((40, 40), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=75)
            items.append((f"{bucket}/reenc-{k:03d}.jpg", buf.getvalue()))
            planted.add(frozenset({name, f"{bucket}/reenc-{k:03d}.jpg"}))
    storage.write_many(items)
    started = time.perf_counter()
    run_labeling(
        LabelConfig(output=f"{root}/dd/labels", checkpoint=checkpoint, input=bucket, embeddings=True, concurrency=(2,)),
        progress=False,
    )
    label_s = time.perf_counter() - started
    defaults = DedupConfig(embeddings="x", out="x")
    summary = run_dedup(DedupConfig(embeddings=f"{root}/dd/labels", out=f"{root}/dd/out"))
    import pyarrow.parquet as pq

    groups = pq.read_table(io.BytesIO(storage.read_bytes(f"{root}/dd/out/groups.parquet"))).to_pydict()
    members: dict[int, set] = {}
    for g, p in zip(groups["group"], groups["path"]):
        members.setdefault(g, set()).add(p)
    grouped = [pair for pair in planted if any(pair <= m for m in members.values())]
    false = [sorted(m) for m in members.values() if not any(pair <= m for pair in planted)]
    false_groups = len(false)
    # how different the images of a group without a planted pair are (mean absolute pixel difference, 0-255):
    # a small one means the source itself holds a near-duplicate
    false_detail = [{"paths": [p.rsplit("/", 1)[1] for p in g], "mean_abs_pixel_diff": pixel_diff(g)} for g in false]
    exact = [pair for pair in grouped if any("/copy-" in x for x in pair)]
    return {
        "images": len(items),
        "planted_pairs": len(planted),
        "threshold": defaults.threshold,
        "pixel_corr": defaults.pixel_corr,
        "recall": len(grouped) / len(planted),
        "recall_exact_copies": len(exact) / 50,
        "recall_reencoded": (len(grouped) - len(exact)) / 50,
        "groups": summary["groups"],
        "false_groups": false_groups,
        "false_group_detail": false_detail,
        "label_embeddings_s": label_s,
        "dedup_s": summary["seconds"],
        "method": summary["method"],
    }


def pixel_diff(paths: list[str]) -> float:
    """Mean absolute difference (0-255) between the first image of a group and each other one, grey."""
    grey = [np.asarray(Image.open(io.BytesIO(storage.read_bytes(p))).convert("L"), dtype=np.float32) for p in paths]
    return float(np.mean([np.abs(grey[0] - g).mean() for g in grey[1:] if g.shape == grey[0].shape] or [np.nan]))


def bench_dedup_scale(n: int = 1_000_000, d: int = 1280, planted: int = 1000) -> dict:
    """IVF search on n synthetic unit vectors (clustered, like real embeddings) with `planted` near-copies."""
    from distcls.curate.dedup import ivf_pairs

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(1000, d)).astype(np.float32)
    vecs = centers[rng.integers(0, 1000, n)] + 0.8 * rng.normal(size=(n, d)).astype(np.float32)
    src = rng.choice(n - planted, size=planted, replace=False)
    vecs[n - planted :] = vecs[src] + 0.05 * rng.normal(size=(planted, d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    started = time.perf_counter()
    i, j, _ = ivf_pairs(vecs, None, 0.95)
    seconds = time.perf_counter() - started
    found = {(int(a), int(b)) for a, b in zip(i, j)}
    hits = sum(1 for k, s in enumerate(src) if (int(s), n - planted + k) in found or (n - planted + k, int(s)) in found)
    return {
        "embeddings": n,
        "dimension": d,
        "planted": planted,
        "recall": hits / planted,
        "pairs": len(found),
        "seconds": seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def bench_trust(cfg, root: str) -> dict:
    parts = list(cfg.trust_parts or PARTS)
    out: dict = {}
    checkpoint = test = None
    if {"calibration", "ood", "dedup"} & set(parts):
        checkpoint, test = fine_tune(root)
        out["checkpoint"] = checkpoint
    if "calibration" in parts:
        out["calibration"] = bench_calibration(checkpoint, test, root)
        print(json.dumps({"calibration": out["calibration"]}), flush=True)
    if "ood" in parts:
        out["ood"] = bench_ood(checkpoint, test, root)
        print(json.dumps({"ood": out["ood"]}), flush=True)
    if "dedup" in parts:
        out["dedup"] = bench_dedup(checkpoint, test, root)
        print(json.dumps({"dedup": out["dedup"]}), flush=True)
    if "label_issues" in parts:
        out["label_issues"] = bench_label_issues(root)
        print(json.dumps({"label_issues": out["label_issues"]}), flush=True)
    if "dedup_scale" in parts:
        out["dedup_scale"] = bench_dedup_scale()
        print(json.dumps({"dedup_scale": out["dedup_scale"]}), flush=True)
    return out

"""`distcls bench imbalance | modern | tune`: what the recipe flags, the sweep and the soup buy, each
scored on the whole Fashion-MNIST test split (10,000 images). Measured, never asserted; not part of `all`.

- imbalance: a long-tailed training set (class sizes 1,000 down to 10, ratio 100, sizes given to the
  classes in a seeded order) trained with the same budget four ways: uniform cross-entropy, the balanced
  sampler, the class-balanced loss and the focal loss. Macro F1 and the worst class's recall.
- modern: 1,000 images per class at 64 px, the default flags against candidate recipes (each with the same
  epochs; wall time is printed beside it, since a costlier recipe spends the budget differently).
- tune: 200 images per class: `distcls train` with default flags, `distcls tune` (8 trials, ASHA) and the
  greedy soup of its top trials; test accuracy of the default run, the best trial and the soup.

Every run is the real `distcls train` / `distcls tune` (Ray Train, Ray Tune) on local PNG folders, then
`distcls evaluate` on the test split.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from distcls import storage
from distcls.config import EvaluateConfig, TrainConfig, TuneConfig
from distcls.tools.config import BenchConfig, FashionMnistConfig
from distcls.tools.fmnist import CLASS_NAMES, encode_png, load_split, locate_source
from distcls.tools.recipe_data import write_fashion_mnist_subset

IMBALANCE_VARIANTS = {
    "uniform CE": {},
    "balanced sampler": {"sampler": "balanced"},
    "class-balanced loss": {"loss": "class-balanced"},
    "focal loss": {"loss": "focal"},
}
MODERN_VARIANTS = {
    "default flags": {},
    "ema": {"ema": 0.999},
    "ema + flip": {"ema": 0.999, "augment": "flip"},
    "ema + trivialaugment": {"ema": 0.999, "augment": "trivialaugment"},
}


def long_tail_sizes(head: int, ratio: float, classes: int, seed: int) -> list[int]:
    """Exponential profile head * ratio^(-r/(K-1)) for ranks r = 0..K-1, the ranks dealt to classes in a seeded order."""
    ranks = np.random.default_rng(seed).permutation(classes)
    return [int(round(head * ratio ** (-r / (classes - 1)))) for r in ranks]


def write_long_tail(out: str, head: int, ratio: float, seed: int) -> dict:
    """Fashion-MNIST train images in the long-tailed sizes (a seeded draw per class) and the whole test split."""
    source = locate_source(FashionMnistConfig(out=out))
    sizes = long_tail_sizes(head, ratio, len(CLASS_NAMES), seed)
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        images, labels = load_split(source, split)
        if split == "train":
            rows = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(sizes)])
        else:
            rows = np.arange(len(labels))
        storage.write_many(
            ((storage.join_uri(out, split, CLASS_NAMES[labels[i]], f"{i}.png"), encode_png(images[i])) for i in rows), workers=8
        )
    return {name: n for name, n in zip(CLASS_NAMES, sizes)}


def scored_on_test(checkpoint: str, test: str) -> dict:
    """`distcls evaluate` of a checkpoint on the test split: accuracy, macro F1, worst-class recall."""
    from distcls.evaluate import run_evaluation

    with tempfile.TemporaryDirectory() as d:
        report = run_evaluation(EvaluateConfig(checkpoint=checkpoint, data=test, out=d, batch_size=128, concurrency=2))
    recalls = {name: c["recall"] for name, c in report["per_class"].items()}
    worst = min(recalls, key=recalls.get)
    return {
        "test_accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "worst_class": worst,
        "worst_class_recall": recalls[worst],
        "recall_per_class": recalls,
    }


def train_and_score(flags: dict, data: str, test: str, root: str, name: str, cfg: BenchConfig, epochs: int) -> dict:
    from distcls.train.trainer import run_training

    started = time.perf_counter()
    result = run_training(
        TrainConfig(
            data=data,
            model=cfg.recipe_model,
            image_size=cfg.image_size,
            epochs=epochs,
            storage=f"{root}/runs",
            name=name,
            **flags,
        )
    )
    out = {
        "flags": flags,
        "train_seconds": result["seconds"],
        "wall_seconds": time.perf_counter() - started,
        "val_accuracy": result["metrics"]["val_accuracy"],
        **scored_on_test(result["checkpoint"], test),
    }
    print(
        f"{name}: test accuracy {out['test_accuracy']:.4f}, macro F1 {out['macro_f1']:.4f}, worst recall "
        f"{out['worst_class_recall']:.3f} ({out['worst_class']}), {out['train_seconds']:.0f} s training",
        flush=True,
    )
    return out


def run_variants(variants: dict, data: str, root: str, prefix: str, cfg: BenchConfig, epochs: int) -> dict:
    """One `train_and_score` per named flag set, on data/train, scored on data/test (the same budget each)."""
    return {
        variant: train_and_score(flags, f"{data}/train", f"{data}/test", root, f"{prefix}-{i}", cfg, epochs)
        for i, (variant, flags) in enumerate(variants.items())
    }


def bench_imbalance(cfg: BenchConfig, root: str) -> dict:
    sizes = write_long_tail(f"{root}/longtail", head=1000, ratio=100, seed=0)
    print("long-tailed train sizes: " + ", ".join(f"{k} {v}" for k, v in sizes.items()), flush=True)
    runs = run_variants(IMBALANCE_VARIANTS, f"{root}/longtail", root, "imbalance", cfg, cfg.imbalance_epochs)
    base = runs["uniform CE"]
    best = max(runs, key=lambda v: runs[v]["macro_f1"])
    out = {
        "class_sizes": sizes,
        "epochs": cfg.imbalance_epochs,
        "runs": runs,
        "best": best,
        "best_minus_uniform_macro_f1_points": 100 * (runs[best]["macro_f1"] - base["macro_f1"]),
    }
    lines = [f"{'imbalance':<22} {'macro F1':>9} {'worst recall':>13} {'accuracy':>9} {'train s':>8}"]
    for variant, r in runs.items():
        scores = f"{r['macro_f1']:>9.4f} {r['worst_class_recall']:>13.3f} {r['test_accuracy']:>9.4f}"
        lines.append(f"{variant:<22} {scores} {r['train_seconds']:>8.0f}")
    print("\n".join(lines), flush=True)
    return out


def bench_modern(cfg: BenchConfig, root: str) -> dict:
    write_fashion_mnist_subset(f"{root}/fm1000", 1000, None)
    chosen = {v: f for v, f in MODERN_VARIANTS.items() if v in cfg.modern_variants or v == "default flags"}
    runs = run_variants(chosen, f"{root}/fm1000", root, "modern", cfg, cfg.recipe_epochs)
    base = runs["default flags"]
    best = max(runs, key=lambda v: runs[v]["test_accuracy"])
    out = {
        "epochs": cfg.recipe_epochs,
        "runs": runs,
        "best": best,
        "best_minus_default_points": 100 * (runs[best]["test_accuracy"] - base["test_accuracy"]),
    }
    lines = [f"{'recipe (1,000/class)':<22} {'accuracy':>9} {'points':>7} {'train s':>8}"]
    for variant, r in runs.items():
        points = 100 * (r["test_accuracy"] - base["test_accuracy"])
        lines.append(f"{variant:<22} {r['test_accuracy']:>9.4f} {points:>+7.2f} {r['train_seconds']:>8.0f}")
    print("\n".join(lines), flush=True)
    return out


def bench_tune(cfg: BenchConfig, root: str) -> dict:
    from distcls.train.tune import run_tune

    data = f"{root}/fm{cfg.tune_per_class}"
    write_fashion_mnist_subset(data, cfg.tune_per_class, None)
    default = train_and_score({}, f"{data}/train", f"{data}/test", root, "tune-default", cfg, cfg.recipe_epochs)
    started = time.perf_counter()
    search = run_tune(
        TuneConfig(
            data=f"{data}/train",
            model=cfg.recipe_model,
            image_size=cfg.image_size,
            trials=cfg.tune_trials,
            num_workers=2,
            epochs=cfg.tune_epochs,
            storage=f"{root}/tune",
            name="search",
            soup=True,
        )
    )
    seconds = time.perf_counter() - started
    best = {**search["best"], **scored_on_test(search["best"]["checkpoint"], f"{data}/test")}
    soup = search["soup"]
    soup_scored = {**soup, **scored_on_test(soup["checkpoint"], f"{data}/test")} if soup else None
    out = {
        "train_per_class": cfg.tune_per_class,
        "trials": search["trials"],
        "search_seconds": seconds,
        "default": default,
        "best_trial": best,
        "soup": soup_scored,
        "best_minus_default_points": 100 * (best["test_accuracy"] - default["test_accuracy"]),
        "soup_minus_best_points": 100 * (soup_scored["test_accuracy"] - best["test_accuracy"]) if soup_scored else None,
    }
    print(
        f"tune ({cfg.tune_trials} trials, {seconds:.0f} s): default flags {default['test_accuracy']:.4f}, best trial "
        f"{best['test_accuracy']:.4f}, greedy soup {soup_scored['test_accuracy'] if soup_scored else float('nan'):.4f}",
        flush=True,
    )
    return out


def bench_modern_all(cfg: BenchConfig) -> dict:
    """The benchmark `cfg.which` names, in a kept folder (cfg.work_dir) or a temporary one."""
    root = cfg.work_dir or tempfile.mkdtemp(prefix=f"distcls-bench-{cfg.which}-")
    os.makedirs(root, exist_ok=True)
    return {"imbalance": bench_imbalance, "modern": bench_modern, "tune": bench_tune}[cfg.which](cfg, root)

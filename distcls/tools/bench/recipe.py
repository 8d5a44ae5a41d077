"""`distcls bench recipe`: `distcls train` with default flags against a plain PyTorch loop, on several real
datasets that nobody tuned the defaults for, at a small fixed budget (3 epochs). Measured, never asserted.

Each setting is written as local ImageFolder PNGs (`distcls.tools.recipe_data`). Both sides train on the same
images: distcls holds out its default 10% for validation, and the plain loop trains on exactly the other
90%. Both are scored on the setting's test split. Small settings are repeated over several seeds (their
test splits are small, so one image moves the accuracy by up to 1.7 points) and averaged.

The plain loop is the one a careful user writes: the same pretrained model and input size, all images
decoded once into memory with the eval transform, AdamW 1e-3 on every parameter, a one-cycle schedule,
batch 64 (= distcls's 2 workers x 32), no augmentation, every core.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np
import torch

from distcls import storage
from distcls.config import EvaluateConfig, TrainConfig
from distcls.datasets import LabeledIndex, load_labeled_index, stratified_split
from distcls.models import create_model, default_spec
from distcls.tools.config import BenchConfig
from distcls.tools.recipe_data import write_digits, write_faces, write_fashion_mnist_subset
from distcls.transforms import preprocess_bytes

SETTINGS = ("fmnist20", "fmnist100", "fmnist1000", "digits", "faces")
MANY_SEEDS_UP_TO = 2000  # settings with at most this many training images are repeated over seeds


def write_setting(name: str, out: str, test_per_class: int | None) -> dict:
    if name.startswith("fmnist"):
        return write_fashion_mnist_subset(out, int(name.removeprefix("fmnist")), test_per_class)
    if name == "digits":
        return write_digits(out)
    if name == "faces":
        return write_faces(out)
    raise ValueError(f"bench recipe: unknown setting {name!r}; choose from {', '.join(SETTINGS)}")


def decode_all(index: LabeledIndex, image_size: int, model: str) -> tuple[torch.Tensor, torch.Tensor]:
    spec = default_spec(model, image_size)
    images = np.stack([preprocess_bytes(storage.read_bytes(p), spec) for p in index.paths])
    return torch.from_numpy(images), torch.tensor(index.labels, dtype=torch.int64)


@torch.inference_mode()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    hits = sum(int((model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum()) for i in range(0, len(labels), batch))
    return hits / max(1, len(labels))


def plain_loop(cfg: BenchConfig, train: LabeledIndex, test: tuple[torch.Tensor, torch.Tensor], seed: int) -> dict:
    """The reference: a plain single-process PyTorch fine-tuning loop (see the module docstring)."""
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    x, y = decode_all(train, cfg.image_size, cfg.recipe_model)
    model = create_model(cfg.recipe_model, len(train.class_names), "bundled", image_size=cfg.image_size)
    batch = 2 * cfg.batch_size
    steps = math.ceil(len(y) / batch) * cfg.recipe_epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(cfg.recipe_epochs):
        model.train()
        for rows in torch.randperm(len(y), generator=generator).split(batch):
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - started
    return {"test_accuracy": accuracy(model, *test), "train_seconds": seconds, "steps": steps}


def distcls_default(cfg: BenchConfig, data: str, test_uri: str, root: str, seed: int) -> dict:
    """`distcls train` with nothing but the data, the budget and the model's size given; then evaluate."""
    from distcls.evaluate import run_evaluation
    from distcls.train.trainer import run_training

    result = run_training(
        TrainConfig(
            data=data,
            model=cfg.recipe_model,
            epochs=cfg.recipe_epochs,
            image_size=cfg.image_size,
            seed=seed,
            storage=f"{root}/runs",
            name=f"recipe-{os.path.basename(os.path.dirname(data))}-{seed}",
        )
    )
    with tempfile.TemporaryDirectory() as d:
        report = run_evaluation(
            EvaluateConfig(checkpoint=result["checkpoint"], data=test_uri, out=d, batch_size=128, concurrency=2)
        )
    return {
        "test_accuracy": report["accuracy"],
        "recipe": result["recipe"],
        "train_seconds": result["seconds"],
        "data_wait_fraction": run_data_wait(result["epochs"]),
        "data_wait_fraction_first_epoch": result["epochs"][0]["data_wait_fraction"],
    }


def run_data_wait(epochs: list[dict]) -> float:
    """The run's share of training time spent waiting for data (rank 0's, all epochs together)."""
    wait = sum(e.get("data_wait_seconds", e["data_wait_fraction"] * e["epoch_seconds"]) for e in epochs)
    return wait / max(1e-9, sum(e.get("train_seconds", e["epoch_seconds"]) for e in epochs))


def bench_setting(cfg: BenchConfig, name: str, root: str) -> dict:
    out = f"{root}/{name}"
    sizes = write_setting(name, out, cfg.recipe_test_per_class)
    test_index = load_labeled_index(f"{out}/test")
    test = decode_all(test_index, cfg.image_size, cfg.recipe_model)
    seeds = range(cfg.recipe_seeds if sizes["train"] <= MANY_SEEDS_UP_TO else 1)
    ours, plain = [], []
    for seed in seeds:
        # distcls's own default split: the plain loop trains on the very images distcls trains on.
        train_part, _ = stratified_split(load_labeled_index(f"{out}/train"), TrainConfig.val_fraction, seed)
        ours.append(distcls_default(cfg, f"{out}/train", f"{out}/test", root, seed))
        plain.append(plain_loop(cfg, train_part, test, seed))
        print(
            f"{name} seed {seed}: distcls default {ours[-1]['test_accuracy']:.4f}, plain loop {plain[-1]['test_accuracy']:.4f}",
            flush=True,
        )
    mean = lambda runs, key: float(np.mean([r[key] for r in runs]))  # noqa: E731
    default_acc, plain_acc = mean(ours, "test_accuracy"), mean(plain, "test_accuracy")
    return {
        "train_images": sizes["train"],
        "test_images": len(test_index),
        "seeds": len(seeds),
        "default_accuracy": default_acc,
        "plain_accuracy": plain_acc,
        "ratio": default_acc / max(plain_acc, 1e-9),
        "points": 100 * (default_acc - plain_acc),
        "data_wait_fraction": max(r["data_wait_fraction"] for r in ours),
        "recipe": ours[0]["recipe"],
        "runs": {"distcls": ours, "plain": plain},
    }


def bench_recipe(cfg: BenchConfig, root: str | None = None) -> dict:
    root = root or tempfile.mkdtemp(prefix="distcls-recipe-")
    rows = {name: bench_setting(cfg, name, root) for name in cfg.recipe_settings}
    out = {
        "settings": rows,
        "epochs": cfg.recipe_epochs,
        "image_size": cfg.image_size,
        "model": cfg.recipe_model,
        "min_ratio_default_vs_plain": min(r["ratio"] for r in rows.values()),
        "max_points_below_plain": max(-r["points"] for r in rows.values()),
        "max_data_wait_fraction": max(r["data_wait_fraction"] for r in rows.values()),
    }
    print("\n".join(recipe_table(out)), flush=True)
    return out


def recipe_table(result: dict) -> list[str]:
    lines = [
        f"{'setting':<12} {'train':>6} {'seeds':>5} {'default':>8} {'plain':>8} {'ratio':>6} {'points':>7} {'wait':>5}  recipe"
    ]
    for name, r in result["settings"].items():
        lines.append(
            f"{name:<12} {r['train_images']:>6} {r['seeds']:>5} {r['default_accuracy']:>8.4f} "
            f"{r['plain_accuracy']:>8.4f} {r['ratio']:>6.3f} {r['points']:>+7.2f} "
            f"{r['data_wait_fraction']:>5.0%}  {r['recipe']['steps']} steps, "
            f"{'crops ' + format(r['recipe']['crop_scale_min'], 'g') + '-1' if r['recipe']['random_crops'] else 'no crops'}"
        )
    return lines

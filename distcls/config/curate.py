"""The curation configs: `review`, `dedup` and `find-label-issues` (the labeled data, looked at again)."""

from __future__ import annotations

from dataclasses import dataclass

from distcls.config.options import Config, Problems, check_required, max_object_mb, opt


@dataclass
class ReviewConfig(Config):
    """`distcls review`: the labeled rows most worth a person's look."""

    command = "review"

    labels: str = opt(help="a `distcls label` --output folder")
    out: str = opt(help="folder for review.parquet, contact_sheet.png and index.html")
    by: str = opt(
        "margin",
        help="rank by: margin (smallest first), entropy, ood (highest first) or score (lowest first)",
        choices=("margin", "entropy", "ood", "score"),
    )
    n: int = opt(100, min=1, help="rows to review (per class with --per-class)")
    per_class: bool = opt(False, help="the N most doubtful rows of each predicted label")
    root: str | None = opt(
        None,
        help="read thumbnails only under this prefix (default: the source the labels' _plan.json names); rows "
        "outside it show 'not read'",
    )
    max_object_mb: float = max_object_mb()

    def validate(self, p: Problems) -> None:
        check_required(p, self, "labels", "out")


@dataclass
class DedupConfig(Config):
    """`distcls dedup`: near-duplicate groups in labeled embeddings, or leakage between two sets."""

    command = "dedup"

    embeddings: str = opt(help="a `distcls label --embeddings` output folder")
    out: str = opt(help="folder for pairs.parquet, groups.parquet, dedup.json and contact_sheet.png")
    against: str | None = opt(None, help="a second such folder: report only pairs across the two (train/test leakage)")
    threshold: float = opt(0.6, help="cosine similarity of embeddings at or above which a nearest neighbour is a candidate")
    pixel_corr: float | None = opt(
        0.997,
        min=-1,
        max=1,
        help="thumbnail correlation at or above which a candidate is a near-duplicate (labels with thumbnails)",
    )
    method: str = opt(
        "auto",
        help="exact (blocked), ivf (faiss inverted file, approximate) or auto (exact up to 200,000)",
        choices=("auto", "exact", "ivf"),
    )

    def validate(self, p: Problems) -> None:
        check_required(p, self, "embeddings", "out")
        p.check(-1 <= self.threshold <= 1, "threshold", self.threshold, "must be a cosine similarity in [-1, 1]")


@dataclass
class FindLabelIssuesConfig(Config):
    """`distcls find-label-issues`: likely mislabeled training images (K-fold fine-tuning + cleanlab)."""

    command = "find-label-issues"

    data: str = opt(
        help="labeled data: an ImageFolder prefix, a manifest file or packed data (its train split; folds by a hash of "
        "the sample id)"
    )
    out: str = opt(help="folder for label_issues.parquet, pred_probs.parquet, summary.json, contact_sheet.png, folds/")
    folds: int = opt(5, min=2, help="K: each image is predicted by a model fine-tuned on the other K-1 folds")
    max_concurrent: int | None = opt(None, min=1, help="folds trained at once (default: as many as the cluster's CPUs allow)")
    model: str = opt("efficientnet_lite0", help="architecture (see `distcls models`)")
    weights: str = opt("bundled", help="bundled, none, a torchvision weights name, or a weights file URI")
    epochs: int = opt(3, min=1, help="fine-tuning epochs per fold")
    image_size: int | None = opt(None, help="model input size (default: the model's own)")
    batch_size: int = opt(32, min=1, help="images per step per worker")
    num_workers: int = opt(1, min=1, help="Ray Train workers per fold (a fixed count, no MIN,MAX range)")
    lr: float | None = opt(None, help="learning rate (default: the recipe's)")
    seed: int = opt(0, help="seed of the folds and the training runs")

    def validate(self, p: Problems) -> None:
        check_required(p, self, "data", "out")

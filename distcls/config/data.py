"""The data configs: `pack` (labeled images -> Parquet shards that train, evaluate and the others read)."""

from __future__ import annotations

from dataclasses import dataclass

from distcls.config.options import Config, Problems, check_required, max_object_mb, opt


@dataclass
class PackConfig(Config):
    """`distcls pack`: an ImageFolder prefix or a labeled manifest -> Parquet shards of encoded images."""

    command = "pack"

    data: str = opt(help="labeled data: an ImageFolder prefix (<class>/<image>) or a manifest file (path,label)")
    out: str = opt(
        help="folder (or URI) for <split>/shard-NNNNN.parquet, _dataset.json and _rejected.parquet; must be empty unless --resume"
    )
    val_fraction: float = opt(
        0.0,
        min=0,
        lt=1,
        help="per class, this fraction (by a seeded hash of the path) goes to a val split; 0 packs everything as train",
    )
    shard_mb: float = opt(256.0, gt=0, max=1024, help="target size of a shard, in MB of image bytes")
    max_side: int | None = opt(
        None,
        min=8,
        help="re-encode images whose long side exceeds this (JPEG stays JPEG at quality 90, others become PNG); "
        "default: store every image as it is",
    )
    resume: bool = opt(False, help="continue a killed pack in --out (finished shards are kept); refused if --data changed")
    seed: int = opt(0, help="seed of the val split and of the shuffled order of images across shards")
    concurrency: int | None = opt(None, min=1, help="shards packed at once (default: as many as the cluster's CPUs allow)")
    max_object_mb: float = max_object_mb()

    def validate(self, p: Problems) -> None:
        check_required(p, self, "data", "out")

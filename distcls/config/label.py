"""`distcls label`'s config: label every image object under a prefix (or in a manifest) into Parquet."""

from __future__ import annotations

from dataclasses import dataclass

from distcls.config.infer import BatchFields, check_unknown
from distcls.config.options import Problems, max_object_mb, opt


@dataclass
class LabelConfig(BatchFields):
    """`distcls label`: label every image object under a prefix (or in a manifest) into Parquet, one row each."""

    command = "label"

    output: str = opt(
        help="folder/prefix for the Parquet parts, the plan (_plan/) and _SUCCESS.json; reruns add only what is missing"
    )
    checkpoint: str = opt("", help="checkpoint directory URI (required unless --status)")
    input: str = opt(
        "",
        help="prefix to label, recursively (jpg, jpeg, png, webp, bmp, gif, tif, tiff); with "
        "--manifest, the prefix its `key` column is relative to; or packed data (a `distcls pack` folder, found by its "
        "_dataset.json, or one .parquet / .tar shard): every row of every split, read from the shards",
    )
    manifest: str | None = opt(
        None,
        help="label the keys of this list instead of listing --input: CSV, Parquet or "
        "JSONL with a `path` (full URI) or `key` (below --input) column, or an S3 Inventory "
        "manifest.json",
    )
    status: bool = opt(False, help="print what --output holds (planned, written, errors, complete) and exit")
    replan: bool = opt(False, help="list the input again instead of using the stored plan (new objects)")
    top_k: int = opt(5, min=1, help="labels and scores kept per image")
    concurrency: tuple[int, ...] = opt((1,), help="model replicas: N, or MIN,MAX to autoscale")
    cpus_per_replica: float = opt(1.0, gt=0, help="CPUs (and torch threads) per model replica")
    include: str | None = opt(
        None,
        help="glob on the path below --input (or the file name) instead of the extension filter, e.g. '*.jpg' or 'cams/*/*.png'",
    )
    part_rows: int = opt(2000, min=1, help="rows per Parquet part: the unit of progress a restart keeps")
    part_mb: float = opt(64.0, gt=0, help="largest Parquet part in MB (a bigger batch is split)")
    unknown: str = opt(
        "off",
        help="rows whose OOD (energy) score is past a threshold get label `unknown` (top-k kept): off, auto (the "
        "threshold a calibrated checkpoint records, keeping 95%% of its validation images) or a number",
    )
    embeddings: bool = opt(False, help="add an `embedding` column: the model's pooled features (float16; torch runtime)")
    pipeline: str = opt(
        "auto",
        help="fused: the model actors also read and decode (no decode tasks; the CPU "
        "default); split: decode in Ray Data tasks, predict in actors (the GPU default)",
        choices=("auto", "fused", "split"),
    )
    max_object_mb: float = max_object_mb()
    allow_any_path: bool = opt(
        False,
        help="read manifest or plan paths anywhere the credentials reach (by default every path must stay under "
        "--input, or under one prefix of the manifest's)",
    )

    def validate(self, p: Problems) -> None:
        p.check(bool(self.output), "output", self.output, "is required")
        if not self.status:
            p.check(bool(self.checkpoint), "checkpoint", self.checkpoint, "is required")
            p.check(bool(self.input or self.manifest), "input", self.input, "is required (or give --manifest)")
        c = self.concurrency
        p.check(
            len(c) in (1, 2) and min(c) >= 1 and c[0] <= c[-1],
            "concurrency",
            ",".join(map(str, c)),
            "give N or MIN,MAX with 1 <= MIN <= MAX",
        )
        check_unknown(p, self.unknown)
        p.check(
            not (self.embeddings and self.runtime == "onnx"),
            "embeddings",
            self.embeddings,
            "come from the torch runtime; drop --runtime onnx",
        )

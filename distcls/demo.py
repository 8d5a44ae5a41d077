"""`distcls demo`: the whole product on a laptop, on the embedded S3 server and a local Ray instance."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

from distcls import storage
from distcls.config import DemoConfig, FashionMnistConfig
from distcls.s3server import S3Server, restore_env, use_server_env


@dataclass
class Stages:
    """Wall time per stage, printed in the summary."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - started


@contextlib.contextmanager
def storage_for(cfg: DemoConfig) -> Iterator[str]:
    """The bucket URI to use: the embedded S3 server unless --bucket points elsewhere."""
    if cfg.bucket:
        yield cfg.bucket.rstrip("/")
        return
    with S3Server(port=cfg.s3_port) as server:
        previous = use_server_env(server)
        print(f"embedded S3 server on {server.endpoint_url}")
        try:
            yield "s3://demo"
        finally:
            restore_env(previous)


def prepare_data(cfg: DemoConfig, root: str) -> str:
    from distcls.fmnist import existing_copy, write_fashion_mnist

    data = f"{root}/fashion-mnist"
    limit = None if cfg.full else cfg.images_per_class
    marker = existing_copy(data) if storage.exists(f"{root}/fashion-mnist/fashion-mnist.json") else None
    if marker and marker.get("limit_per_class") == limit:
        print(f"reusing {data} ({marker['total']} images)")
    else:
        write_fashion_mnist(FashionMnistConfig(out=data, limit_per_class=limit))
    return data


def run_demo(cfg: DemoConfig) -> dict:
    from distcls import datasets
    from distcls.runtime import init_ray
    from distcls.transforms import PreprocessSpec

    stages = Stages()
    summary: dict = {}
    with storage_for(cfg) as root:
        with stages.stage("data: Fashion-MNIST -> object storage"):
            data = prepare_data(cfg, root)
        with stages.stage("ray data: stream, decode and preprocess"):
            init_ray()
            spec = PreprocessSpec(image_size=cfg.image_size)
            for split in ("train", "test"):
                index = datasets.load_labeled_index(f"{data}/{split}")
                print(datasets.format_counts(index, f"{data}/{split}"))
                tally, n, started = datasets.ErrorTally(), 0, time.perf_counter()
                for batch in datasets.build_dataset(index, spec).iter_batches(batch_size=256, batch_format="numpy"):
                    n += len(tally.drop_errors(batch)["label"])
                rate = n / (time.perf_counter() - started)
                print(f"{split}: {n} images streamed at {rate:.0f} images/s, skipped {tally.count}")
                summary[f"{split}_images"] = n
    summary["stage_seconds"] = {k: round(v, 1) for k, v in stages.seconds.items()}
    print("\n== summary")
    for name, secs in stages.seconds.items():
        print(f"  {name:<45} {secs:7.1f}s")
    return summary

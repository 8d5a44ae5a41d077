"""`distcls demo`: the whole product on a laptop, on the embedded S3 server and a local Ray instance."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

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
    marker = existing_copy(data)
    if marker and marker.get("limit_per_class") == limit:
        print(f"reusing {data} ({marker['total']} images)")
    else:
        write_fashion_mnist(FashionMnistConfig(out=data, limit_per_class=limit))
    return data


def run_demo(cfg: DemoConfig) -> dict:
    """Data -> Ray Train fine-tuning -> evaluation on the test split; prints a summary of every artifact."""
    from distcls.config import EvaluateConfig, TrainConfig
    from distcls.evaluate import run_evaluation
    from distcls.runtime import init_ray
    from distcls.train.trainer import run_training

    stages = Stages()
    summary: dict = {}
    out = os.path.abspath(cfg.out)
    with storage_for(cfg) as root:
        with stages.stage("data: Fashion-MNIST -> object storage"):
            data = prepare_data(cfg, root)
        init_ray()
        with stages.stage("train: fine-tune EfficientNet-Lite0 (Ray Train, 2 workers)"):
            name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
            result = run_training(TrainConfig(
                data=f"{data}/train", val_fraction=0.1, model="efficientnet_lite0", weights="bundled",
                epochs=cfg.epochs, image_size=cfg.image_size, batch_size=32, num_workers=2,
                storage=f"{root}/runs", name=name, backbone_lr_scale=1.0, cache_data=True))
        with stages.stage("evaluate: the best checkpoint on the test split"):
            report = run_evaluation(EvaluateConfig(checkpoint=result["checkpoint"], data=f"{data}/test",
                                                   out=os.path.join(out, "eval"), concurrency=2))
        summary.update({"checkpoint": result["checkpoint"], "test_accuracy": report["accuracy"],
                        "test_macro_f1": report["macro_f1"], "test_images": report["num_samples"]})
    summary["stage_seconds"] = {k: round(v, 1) for k, v in stages.seconds.items()}
    print_summary(summary, stages, out)
    return summary


def print_summary(summary: dict, stages: Stages, out: str) -> None:
    print("\n== summary")
    print(f"  test accuracy {summary['test_accuracy']:.4f}, macro F1 {summary['test_macro_f1']:.4f} "
          f"on {summary['test_images']} test images")
    for name, secs in stages.seconds.items():
        print(f"  {name:<60} {secs:7.1f}s")
    print("  artifacts:")
    print(f"    evaluation report  {out}/eval/report.md        (cat it)")
    print(f"    confusion matrix   {out}/eval/confusion_matrix.png")
    print(f"    report (JSON)      {out}/eval/report.json")
    print(f"    best checkpoint    {summary['checkpoint']}  (in the embedded S3 server, gone when the demo ends;"
          " pass --bucket to keep it)")

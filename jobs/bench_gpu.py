"""The GPU check: `distcls bench train` and `bench label` on one GPU, side by side with their plain-PyTorch
baselines, for ResNet-50 and EfficientNet-Lite0 (bf16 autocast, channels_last, baselines too). About 5-6
minutes on one GPU with 16 cores (budget: 8); writes every figure to --out.

    python jobs/bench_gpu.py --out bench-gpu.json             # on a machine with a CUDA GPU
    python jobs/bench_gpu.py --cpu-smoke --out smoke.json     # the same code path, tiny, on CPU (tests)

Needs no internet: ResNet-50 has random weights here (throughput only); Lite0 uses the bundled weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

MODELS = ("resnet50", "efficientnet_lite0")


def settings(model: str, smoke: bool) -> dict:
    if smoke:  # the same stages, sized for a CPU test run
        return dict(
            model=model,
            label_model=model,
            use_gpu=False,
            image_size=32,
            batch_size=8,
            images_per_class=4,
            epochs=2,
            warmup_steps=1,
            workers=(1,),
            train_data=("streamed",),
            label_images=8,
            label_batch_size=8,
            loader_workers=1,
            label_cpus_per_replica=1.0,
            ceiling_seconds=1.0,
            label_large_photos=2,
        )
    cores = os.cpu_count() or 1
    return dict(
        model=model,
        label_model=model,
        use_gpu=True,
        image_size=224,
        batch_size=128,
        images_per_class=200,
        epochs=3,
        warmup_steps=5,
        workers=(1,),
        train_data=("streamed",),
        label_images=2000,
        label_batch_size=128,
        loader_workers=max(2, min(8, cores - 2)),
        label_cpus_per_replica=1.0,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-gpu.json", help="where to write every figure (JSON)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated architectures")
    args = parser.parse_args(argv)

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA GPU is visible to PyTorch here; run it on a GPU machine "
            "(or pass --cpu-smoke to check the script on CPU)",
            file=sys.stderr,
        )
        return 2

    from distcls import init_ray, storage
    from distcls.tools.bench import table
    from distcls.tools.bench.harness import machine
    from distcls.tools.bench.label import bench_label
    from distcls.tools.bench.train import bench_train
    from distcls.tools.config import BenchConfig
    from distcls.tools.s3server import S3Server, restore_env, use_server_env

    started = time.perf_counter()
    results: dict = {"kind": "gpu-check" if not args.cpu_smoke else "cpu-smoke", "models": {}}
    with S3Server(port=0) as server:
        previous = use_server_env(server)
        try:
            init_ray()
            results["machine"] = machine()
            for model in args.models.split(","):
                cfg = BenchConfig(which="all", out=args.out, **settings(model, args.cpu_smoke))
                print(f"== {model}: train ==", flush=True)
                got = {"settings": {k: v for k, v in vars(cfg).items()}}
                got["train"] = bench_train(cfg, f"s3://bench/{model}")
                print(f"== {model}: label ==", flush=True)
                got["label"] = bench_label(cfg, f"s3://bench/{model}")
                got["seconds"] = round(time.perf_counter() - started, 1)
                results["models"][model] = got
                print(f"== {model}: done at {got['seconds']:.0f} s ==", flush=True)
        finally:
            restore_env(previous)
    results["seconds"] = round(time.perf_counter() - started, 1)
    storage.write_text(args.out, json.dumps(results, indent=2, default=str))
    for model, got in results["models"].items():
        print(f"\n{model} ({results['machine']['gpu'] or 'CPU smoke'}):")
        print("\n".join(table(got)))
    print(f"\nwrote {args.out} in {results['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

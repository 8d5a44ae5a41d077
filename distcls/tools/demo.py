"""`distcls demo`: the whole product on a laptop, on the embedded S3 server and a local Ray instance.

Fashion-MNIST into object storage -> fine-tune EfficientNet-Lite0 with Ray Train (2 workers) ->
evaluate on the test split -> label an "unlabeled" prefix (with a few corrupt files) -> serve the best
checkpoint with the run's last one as a 10% canary, send real HTTP requests and show the split and the two
checkpoints' agreement -> a summary of figures, stage times and artifacts.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from distcls import storage
from distcls.datasets import LabeledIndex, load_labeled_index
from distcls.tools.config import DemoConfig, FashionMnistConfig
from distcls.tools.s3server import S3Server, free_port, restore_env, use_server_env

CORRUPT_FILES = {  # name -> bytes: what a real "unlabeled" bucket also holds
    "corrupt-truncated.png": None,  # filled from a real PNG, cut short
    "corrupt-empty.jpg": b"",
    "corrupt-notes.jpg": b"meeting notes, not a picture\n" * 10,
}


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


def prepare_split(root: str, split: str, limit: int | None) -> str:
    """URI/<split>/<class>/<index>.png, written once per (split, limit) and reused by reruns."""
    from distcls.tools.fmnist import existing_copy, write_fashion_mnist

    data = f"{root}/fashion-mnist-{split}-{limit or 'all'}"
    marker = existing_copy(data)
    if marker:
        print(f"reusing {data} ({marker['total']} images)")
    else:
        write_fashion_mnist(FashionMnistConfig(out=data, limit_per_class=limit, splits=(split,)))
    return f"{data}/{split}"


def prepare_unlabeled(index: LabeledIndex, root: str, n: int) -> tuple[str, dict[str, str]]:
    """Copy n test images (spread over the classes) to a flat prefix, plus corrupt files; -> truth by path."""
    picks = np.linspace(0, len(index.paths) - 1, num=min(n, len(index.paths))).astype(int)
    prefix = f"{root}/unlabeled"
    items, truth = [], {}
    for k, i in enumerate(picks):
        dest = f"{prefix}/img-{k:05d}.png"
        data = storage.read_bytes(index.paths[i])
        items.append((dest, data))
        truth[dest] = index.class_names[index.labels[i]]
    for name, data in CORRUPT_FILES.items():
        items.append((f"{prefix}/{name}", data if data is not None else items[0][1][: len(items[0][1]) // 2]))
    storage.write_many(items)
    return prefix, truth


def query_endpoint(url: str, index: LabeledIndex, n: int) -> dict:
    """POST n test images one at a time; -> latencies, accuracy and a few (truth, prediction) rows."""
    from urllib.parse import urlsplit

    rng = np.random.default_rng(0)
    picks = rng.choice(len(index.paths), size=min(n, len(index.paths)), replace=False)
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    rows, latencies = [], []
    for i in picks:
        body = storage.read_bytes(index.paths[i])
        started = time.perf_counter()
        conn.request("POST", f"{parts.path}/v1/classify?top_k=3", body=body, headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        payload = json.loads(response.read())
        latencies.append(time.perf_counter() - started)
        if response.status != 200:
            raise RuntimeError(f"demo: the endpoint answered {response.status}: {payload}")
        pred = payload["predictions"][0]
        rows.append(
            {"path": index.paths[i], "truth": index.class_names[index.labels[i]], "label": pred["label"], "score": pred["score"]}
        )
    conn.close()
    ms = np.asarray(latencies) * 1000
    return {
        "rows": rows,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "accuracy": float(np.mean([r["truth"] == r["label"] for r in rows])),
    }


def run_demo(cfg: DemoConfig) -> dict:
    """Every stage of the product on real data; prints (and returns) a summary of figures and artifacts."""
    import ray

    from distcls import init_ray

    stages = Stages()
    started = time.perf_counter()
    out = os.path.abspath(cfg.out)
    os.makedirs(out, exist_ok=True)
    with storage_for(cfg) as root:
        with stages.stage("data: Fashion-MNIST -> object storage"):
            train_data = prepare_split(root, "train", None if cfg.full else cfg.train_per_class)
            test_data = prepare_split(root, "test", None if cfg.full else cfg.test_per_class)
        init_ray()
        try:
            with stages.stage("train: fine-tune EfficientNet-Lite0 (Ray Train, 2 workers)"):
                checkpoint, last = train_stage(cfg, root, train_data)
            with stages.stage("evaluate: the best checkpoint on the test split"):
                report = evaluate_stage(checkpoint, test_data, out)
            with stages.stage("label: an unlabeled prefix (with corrupt files) -> Parquet"):
                test_index = load_labeled_index(test_data)  # listed once, for labeling and serving
                labeled = label_stage(cfg, root, checkpoint, test_index, out)
            with stages.stage("serve: best and last checkpoints split 90/10 on Ray Serve, real HTTP"):
                served = serve_stage(cfg, checkpoint, last, test_index)
        finally:
            ray.shutdown()
    summary = {
        "checkpoint": checkpoint,
        "test_accuracy": report["accuracy"],
        "test_macro_f1": report["macro_f1"],
        "test_images": report["num_samples"],
        **labeled,
        "serve_p50_ms": served["p50_ms"],
        "serve_p99_ms": served["p99_ms"],
        "serve_requests": len(served["rows"]),
        "serve_split": served["split"],
        "serve_agreement_last_vs_best": served["agreement"],
        "out": out,
        "kept_in": "embedded S3 (gone after the demo)" if not cfg.bucket else cfg.bucket,
        "stage_seconds": {k: round(v, 1) for k, v in stages.seconds.items()},
        "total_seconds": round(time.perf_counter() - started, 1),  # stages + starting/stopping Ray
    }
    storage.write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    print_summary(summary, stages, out)
    return summary


def train_stage(cfg: DemoConfig, root: str, train_data: str) -> tuple[str, str]:
    """`distcls train` with the recipe's defaults, as a user gets them; -> the best and the last checkpoints' URIs."""
    from distcls import run_training
    from distcls.config import TrainConfig

    result = run_training(
        TrainConfig(
            data=train_data,
            val_fraction=0.1,
            model="efficientnet_lite0",
            weights="bundled",
            epochs=cfg.epochs,
            image_size=cfg.image_size,
            batch_size=32,
            num_workers=2,
            storage=f"{root}/runs",
            name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
        )
    )
    return result["checkpoint"], last_checkpoint(result["run"])


def last_checkpoint(run: str) -> str:
    """The run's latest checkpoint (Ray Train's checkpoint_NNNNNN folders sort by epoch)."""
    folders = sorted({f.rsplit("/", 1)[0] for f in storage.list_files(run) if f.endswith("/distcls.json")})
    return [f for f in folders if f.rsplit("/", 1)[-1].startswith("checkpoint_")][-1]


def evaluate_stage(checkpoint: str, test_data: str, out: str) -> dict:
    from distcls import run_evaluation
    from distcls.config import EvaluateConfig

    return run_evaluation(EvaluateConfig(checkpoint=checkpoint, data=test_data, out=os.path.join(out, "eval"), concurrency=2))


def label_stage(cfg: DemoConfig, root: str, checkpoint: str, test_index: LabeledIndex, out: str) -> dict:
    """Label a flat prefix of test images plus corrupt files; -> the summary's label figures, with the
    agreement between the labels and the (hidden) true classes."""
    from distcls import read_labels, run_labeling
    from distcls.config import LabelConfig

    prefix, truth = prepare_unlabeled(test_index, root, cfg.label_images)
    labels_dir = os.path.join(out, "labels")
    shutil.rmtree(labels_dir, ignore_errors=True)  # a new checkpoint: last run's labels do not apply
    result = run_labeling(LabelConfig(checkpoint=checkpoint, input=prefix, output=labels_dir, batch_size=16), progress=False)
    rows = read_labels(labels_dir, columns=["path", "label", "error"]).to_pylist()
    good = [r for r in rows if r["error"] is None and r["path"] in truth]
    agreement = float(np.mean([truth[r["path"]] == r["label"] for r in good])) if good else 0.0
    print(
        f"labeled {result['labeled']} new objects ({result['skipped_done']} already done), {len(rows)} rows, "
        f"errors: {result['errors_by_kind'] or 'none new'}; {result['images_per_s']:.1f} images/s; agreement "
        f"with the hidden labels {agreement:.4f}"
    )
    return {
        "label_rows": len(rows),
        "label_errors_by_kind": result["errors_by_kind"],
        "label_images_per_s": result["images_per_s"],
        "label_agreement": agreement,
    }


def serve_stage(cfg: DemoConfig, best: str, last: str, test_index: LabeledIndex) -> dict:
    """Serve the best checkpoint (`main`, 90%) with the last one as a canary (`last`, 10%), send real HTTP
    requests, and show the split and the comparison; -> latencies, accuracy, split and agreement."""
    from ray import serve

    from distcls import start_serving
    from distcls.config import ServeConfig
    from distcls.rollout import call, format_status

    settings = ServeConfig(
        checkpoint=best,
        variant=(f"last={last}",),
        weights="main=90,last=10",
        port=free_port(),
        min_replicas=1,
        max_replicas=1,
        cpus_per_replica=0.5,
        name="demo",
    )
    url = start_serving(settings, token="")
    try:
        served = query_endpoint(url, test_index, cfg.serve_requests)
        split = send_split(url, test_index, cfg.serve_split_requests)
        status = wait_for_mirrors(url, call)
    finally:
        if os.environ.get("RAY_ADDRESS"):  # someone's cluster: remove only the demo's application
            serve.delete("demo")
        else:
            serve.shutdown()
    for r in served["rows"][:6]:
        mark = "ok " if r["truth"] == r["label"] else "MISS"
        print(f"  {mark} true {r['truth']:<12} predicted {r['label']:<12} ({r['score']:.2f})")
    print(
        f"{len(served['rows'])} requests: accuracy {served['accuracy']:.2f}, latency p50 {served['p50_ms']:.0f} ms, "
        f"p99 {served['p99_ms']:.0f} ms"
    )
    total = sum(split.values())
    print(
        f"{total} more requests, 4 clients, weights main=90,last=10: "
        + ", ".join(f"{k} {n} ({n / total:.1%})" for k, n in split.items())
    )
    print(f"`distcls rollout status --url {url}` (best = main, last = the run's last checkpoint):")
    print(format_status(status))
    agreement = status["comparison"]["last"]["agreement"]
    return {**served, "split": split, "agreement": agreement}


def send_split(url: str, index: LabeledIndex, n: int, clients: int = 4) -> dict[str, int]:
    """POST n test images from `clients` threads; -> how many each variant answered (X-Distcls-Variant)."""
    import collections
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    bodies = [storage.read_bytes(index.paths[i]) for i in range(min(n, len(index.paths)))]
    answered: collections.Counter[str] = collections.Counter()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        for j in range(k, n, clients):
            conn.request("POST", f"{parts.path}/v1/classify", body=bodies[j % len(bodies)], headers={"Content-Type": "image/png"})
            response = conn.getresponse()
            response.read()
            answered[
                response.getheader("X-Distcls-Variant", "none") if response.status == 200 else f"HTTP {response.status}"
            ] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(sorted(answered.items()))


def wait_for_mirrors(url: str, call, seconds: float = 10) -> dict:
    """GET /v1/rollout once the canary's requests mirrored to main have been compared (or after `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        status = call(f"{url}/v1/rollout", "DISTCLS_API_TOKEN")
        canary = status["variants"]["last"]["images"]
        if status["comparison"]["last"]["images"] >= canary or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def print_summary(summary: dict, stages: Stages, out: str) -> None:
    rel = os.path.relpath(out)
    print("\n== summary")
    print(
        f"  test accuracy {summary['test_accuracy']:.4f}, macro F1 {summary['test_macro_f1']:.4f} "
        f"on {summary['test_images']} test images (the full Fashion-MNIST test split has 10,000)"
    )
    print(
        f"  labeling {summary['label_images_per_s']:.1f} images/s; {summary['label_rows']} rows, "
        f"errors by kind {summary['label_errors_by_kind'] or '{}'}"
    )
    print(
        f"  endpoint latency p50 {summary['serve_p50_ms']:.0f} ms, p99 {summary['serve_p99_ms']:.0f} ms over "
        f"{summary['serve_requests']} sequential requests"
    )
    split = ", ".join(f"{k} {n}" for k, n in summary["serve_split"].items())
    print(
        f"  canary split (weights main=90,last=10): {split}; last agrees with best on {summary['serve_agreement_last_vs_best']}"
    )
    for name, secs in stages.seconds.items():
        print(f"  {name:<62} {secs:7.1f}s")
    print(f"  {'total (with Ray start and stop)':<62} {summary['total_seconds']:7.1f}s")
    print("  artifacts:")
    print(f"    evaluation report  cat {rel}/eval/report.md")
    print(f"    confusion matrix   xdg-open {rel}/eval/confusion_matrix.png")
    print(f"    metrics (JSON)     {rel}/eval/report.json, {rel}/summary.json")
    print(f"    predictions        {rel}/eval/predictions.parquet")
    print(
        f'    labels (Parquet)   .venv/bin/python -c "import pyarrow.parquet as pq; '
        f"print(pq.read_table('{rel}/labels').to_pandas().head())\""
    )
    print(f"    best checkpoint    {summary['checkpoint']}  ({summary['kept_in']}; pass --bucket to keep it)")

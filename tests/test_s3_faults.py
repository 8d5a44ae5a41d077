"""Flaky object storage, for real: a proxy in front of the loopback S3 server answers a share of requests
with 503 SlowDown, 500 InternalError or a reset connection (tests/faultproxy.py). Storage operations and
the training, evaluation and labeling jobs finish with the same results as without faults; a permanent
AccessDenied fails fast, in one line."""

import io
import json
import os
import subprocess
import sys
import textwrap
import time

import pyarrow.parquet as pq
import pytest

from distcls import storage
from distcls.cli import main
from distcls.tools.config import FASHION_MNIST_DEFAULT_DIR
from tests.conftest import tiny_fashion_mnist
from tests.faultproxy import FAULTS, FaultProxy

BUCKET = "s3://faults-s3"


@pytest.fixture
def proxy_env(s3_server, monkeypatch):
    """Start a FaultProxy in front of the session's S3 server and point this process at it."""
    proxies = []

    def start(**kw) -> FaultProxy:
        proxy = FaultProxy(s3_server.endpoint_url, **kw).start()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


def test_storage_survives_flaky_s3(s3_server, proxy_env):
    root = f"{BUCKET}/ops-{os.urandom(3).hex()}"
    storage.ensure_bucket(root)
    objects = {f"{root}/d{i % 3}/{i}.bin": os.urandom(2000 + i) for i in range(60)}
    proxy = proxy_env(rate=0.1, seed=3)
    started = time.monotonic()
    assert storage.write_many(objects.items(), workers=8) == len(objects)
    assert storage.list_files(root) == sorted(objects)
    assert all(storage.read_bytes(uri) == data for uri, data in objects.items())
    assert all(storage.exists(uri) for uri in list(objects)[:10])
    seconds = time.monotonic() - started
    assert all(proxy.counts[f] > 0 for f in FAULTS), proxy.counts
    print(f"\nflaky storage: {dict(proxy.counts)} in {seconds:.1f}s; all {len(objects)} objects intact")


def test_access_denied_fails_fast_in_one_line(s3_server, proxy_env, tmp_path, capsys):
    """A permanent error is not retried: each job stops at its first request, in seconds, with one line."""
    proxy = proxy_env(deny=True)
    ckpt, data = f"{BUCKET}/private/ckpt", f"{BUCKET}/private/data"
    jobs = {
        "evaluate": ["evaluate", "--checkpoint", ckpt, "--data", data, "--out", str(tmp_path / "e")],
        "label": ["label", "--checkpoint", ckpt, "--input", data, "--output", str(tmp_path / "l")],
        "train": ["train", "--data", data, "--storage", f"{BUCKET}/private/runs", "--name", "r"],
    }
    seen = []
    for job, argv in jobs.items():
        before = proxy.counts["requests"]
        started = time.monotonic()
        capsys.readouterr()
        assert main(argv) == 2, job
        seconds, requests = time.monotonic() - started, proxy.counts["requests"] - before
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, (job, err)
        assert err.startswith(f"distcls: error: storage: access denied to {BUCKET}/private/"), (job, err)
        assert err.endswith("grant this identity read/write on it or use another URI"), (job, err)
        assert 1 <= requests <= 2, (job, requests)  # not retried
        assert seconds < 60, (job, seconds)
        seen.append(f"{job}: {requests} request(s), {seconds:.2f}s: {err}")
    assert proxy.counts["deny"] == proxy.counts["requests"]
    print("\n" + "\n".join(seen))


# --- the jobs under faults (a subprocess: Ray workers take the proxy's endpoint from its environment) ---

JOBS_SCRIPT = textwrap.dedent("""
    import json, sys
    from distcls.cli import main
    train, val, runs, ckpt, out = sys.argv[1:6]
    codes = [
        main(["train", "--data", train, "--val-data", val, "--image-size", "32", "--batch-size", "8",
              "--num-workers", "2", "--epochs", "2", "--seed", "7", "--storage", runs, "--name", "flaky"]),
        main(["evaluate", "--checkpoint", ckpt, "--data", val, "--out", out + "/eval"]),
        main(["label", "--checkpoint", ckpt, "--input", val, "--output", out + "/labels", "--part-rows", "8"]),
    ]
    print("CODES", json.dumps(codes))
""")

TIMINGS = ("train_images_per_s_per_worker", "data_wait_fraction", "epoch_seconds", "worker_nodes")


def stable(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMINGS} for e in epochs]


def read_labels(output: str) -> list[tuple]:
    rows = []
    for part in storage.list_files(output):
        table = pq.read_table(io.BytesIO(storage.read_bytes(part)))
        rows += list(zip(*(table.column(c).to_pylist() for c in ("path", "label", "score", "error"))))
    return sorted(rows)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEFAULT_DIR), reason="needs Debian's dataset-fashion-mnist")
def test_jobs_finish_with_same_results_on_flaky_s3(s3_server, ray_local, tmp_path):
    fm = tiny_fashion_mnist(BUCKET)
    train, val, runs = fm["train"], fm["val"], f"{BUCKET}/runs"
    # Without faults, in this process (the session's Ray reads S3 directly).
    assert (
        main(
            [
                "train",
                "--data",
                train,
                "--val-data",
                val,
                "--image-size",
                "32",
                "--batch-size",
                "8",
                "--num-workers",
                "2",
                "--epochs",
                "2",
                "--seed",
                "7",
                "--storage",
                runs,
                "--name",
                "clean",
            ]
        )
        == 0
    )
    clean = json.loads(storage.read_text(f"{runs}/clean/result.json"))
    ckpt = clean["checkpoint"]
    assert main(["evaluate", "--checkpoint", ckpt, "--data", val, "--out", f"{BUCKET}/clean/eval"]) == 0
    assert main(["label", "--checkpoint", ckpt, "--input", val, "--output", f"{BUCKET}/clean/labels", "--part-rows", "8"]) == 0

    # With faults: the same jobs in a subprocess whose AWS_ENDPOINT_URL (and so its Ray workers') is the proxy.
    with FaultProxy(s3_server.endpoint_url, rate=0.05, seed=11) as proxy:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["AWS_ENDPOINT_URL"] = proxy.endpoint_url
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", JOBS_SCRIPT, train, val, runs, ckpt, f"{BUCKET}/flaky"],
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        seconds = time.monotonic() - started
    assert "CODES [0, 0, 0]" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert all(proxy.counts[f] > 0 for f in FAULTS), proxy.counts

    flaky = json.loads(storage.read_text(f"{runs}/flaky/result.json"))
    assert stable(flaky["epochs"]) == stable(clean["epochs"])  # same data, same steps, same model
    assert flaky["epochs"][-1]["skipped_train"] == 0 and flaky["epochs"][-1]["val_samples"] == 40
    report = json.loads(storage.read_text(f"{BUCKET}/flaky/eval/report.json"))
    expected = json.loads(storage.read_text(f"{BUCKET}/clean/eval/report.json"))
    # The loss is summed batch by batch, in the order batches arrive: equal up to float rounding.
    assert report.pop("loss") == pytest.approx(expected.pop("loss"), rel=1e-5)
    assert report == expected and report["num_samples"] == 40 and report["skipped"] == 0
    labels, expected_labels = read_labels(f"{BUCKET}/flaky/labels"), read_labels(f"{BUCKET}/clean/labels")
    assert [r[:2] + r[3:] for r in labels] == [r[:2] + r[3:] for r in expected_labels]
    assert [r[2] for r in labels] == pytest.approx([r[2] for r in expected_labels], abs=1e-5)
    assert len(labels) == 40 and not any(r[3] for r in labels)
    print(
        f"\nflaky S3 jobs: {dict(proxy.counts)}; train+evaluate+label took {seconds:.0f}s; "
        f"final val_accuracy {flaky['epochs'][-1]['val_accuracy']:.4f} (clean "
        f"{clean['epochs'][-1]['val_accuracy']:.4f}); evaluate accuracy {report['accuracy']:.4f}; "
        f"{len(labels)} labels identical"
    )

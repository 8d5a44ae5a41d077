"""`distcls demo` end to end in a tiny configuration: every artifact it names exists and holds numbers."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from distcls.tools.config import FASHION_MNIST_DEFAULT_DIR


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEFAULT_DIR), reason="needs dataset-fashion-mnist")
@pytest.mark.slow  # ~180 s: the whole demo, in `make test-all` (CI's 30-minute budget)
def test_demo_tiny(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distcls.cli",
            "demo",
            "--train-per-class",
            "6",
            "--test-per-class",
            "6",
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--label-images",
            "12",
            "--serve-requests",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stdout = result.stdout
    assert "== summary" in stdout and "test accuracy" in stdout
    # Quiet: distcls's own lines once each, none of Ray's internal notices that are not errors.
    both = stdout + result.stderr
    for noise in (
        "core_worker.cc",
        "PreemptionWatcher",
        "graceful_shutdown failed",
        "Progress bars disabled",
        "Found credentials",
        "Traceback",
    ):
        assert noise not in both, (noise, both[-3000:])
    epoch_lines = [line for line in both.splitlines() if "epoch 1/1" in line]
    assert len(epoch_lines) == 1, epoch_lines
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["num_samples"] == 60 and 0.0 <= report["accuracy"] <= 1.0
    assert (out / "eval" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "eval" / "report.md").exists() and (out / "eval" / "predictions.parquet").exists()
    labels = pq.read_table(out / "labels").to_pylist()
    assert len(labels) == 12 + 3 and len({r["path"] for r in labels}) == 15
    kinds = sorted(r["error"].split(":")[0] for r in labels if r["error"])
    assert kinds == ["empty", "not_image", "truncated"], kinds
    summary = json.loads((out / "summary.json").read_text())
    assert summary["serve_requests"] == 3 and summary["serve_p50_ms"] > 0
    assert summary["label_rows"] == 15 and summary["test_images"] == 60
    assert len(summary["stage_seconds"]) == 5 and all(v > 0 for v in summary["stage_seconds"].values())
    for line in ("evaluation report", "confusion matrix", "labels (Parquet)", "best checkpoint", "endpoint latency", "labeling"):
        assert line in stdout, line
    # the command printed for the labels works as printed
    cmd = next(x for x in stdout.splitlines() if "labels (Parquet)" in x).split("labels (Parquet)", 1)[1].strip()
    assert cmd.startswith(".venv/bin/python -c")
    shown = subprocess.run(
        cmd.replace(".venv/bin/python", sys.executable, 1), shell=True, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0 and "s3://demo/unlabeled/" in shown.stdout, shown.stderr

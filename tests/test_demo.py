"""`distcls demo` end to end in a tiny configuration: every artifact it names exists and holds numbers."""

import json
import os
import subprocess
import sys

import pytest

from distcls.config import FASHION_MNIST_DEFAULT_DIR


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEFAULT_DIR), reason="needs dataset-fashion-mnist")
def test_demo_tiny(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    result = subprocess.run(
        [sys.executable, "-m", "distcls.cli", "demo", "--images-per-class", "6", "--image-size", "32",
         "--epochs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== summary" in result.stdout and "test accuracy" in result.stdout
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["num_samples"] == 60 and 0.0 <= report["accuracy"] <= 1.0
    assert (out / "eval" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "eval" / "report.md").exists()
    for line in ("evaluation report", "confusion matrix", "best checkpoint"):
        assert line in result.stdout

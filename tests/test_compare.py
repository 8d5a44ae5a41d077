"""`distcls compare`: a checkpoint, its ONNX export and another architecture on real Fashion-MNIST."""

import json
import os

import pytest

from distcls.cli import main
from distcls.config import CompareConfig, ConfigError
from distcls.tools.config import FASHION_MNIST_DEFAULT_DIR
from distcls.tools.fmnist import CLASS_NAMES
from tests.conftest import make_checkpoint, tiny_fashion_mnist

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DEFAULT_DIR), reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)"
)


def test_compare_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    test_data = tiny_fashion_mnist(str(tmp_path), train_per_class=1)["val"]
    lite = make_checkpoint(str(tmp_path / "lite0"), list(CLASS_NAMES))
    small = make_checkpoint(str(tmp_path / "small"), list(CLASS_NAMES), model="mobilenet_v3_small", weights="none")
    onnx = str(tmp_path / "lite0-onnx")
    assert main(["export", "--checkpoint", lite, "--sample", test_data, "--out", onnx]) == 0
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                lite,
                onnx,
                small,
                "--data",
                test_data,
                "--out",
                str(out),
                "--speed-batches",
                "2",
                "--warmup-batches",
                "1",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "efficientnet_lite0@32 onnx float32" in printed and "mobilenet_v3_small@32 pytorch float32" in printed
    record = json.loads((out / "compare.json").read_text())
    rows = {r["uri"]: r for r in record["models"]}
    assert record["setup"]["images"] == 40 and all(r["num_samples"] == 40 for r in rows.values())
    # The float export makes the checkpoint's predictions: the same accuracy and F1, the same parameters.
    assert rows[onnx]["accuracy"] == rows[lite]["accuracy"] and rows[onnx]["macro_f1"] == rows[lite]["macro_f1"]
    assert rows[onnx]["parameters_m"] == rows[lite]["parameters_m"]
    assert rows[small]["parameters_m"] < rows[lite]["parameters_m"]
    assert all(r["images_per_s"] > 0 and r["size_mb"] > 0.5 for r in rows.values())
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "compare.md").read_text()
    assert md.count("\n| ") == 4 and "| images/s |" in md


def test_compare_config_checks():
    with pytest.raises(ConfigError, match="--names 'a': give one name per model"):
        CompareConfig(models=("x", "y"), data="d", names=("a",))

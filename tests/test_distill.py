"""`distcls distill`: the loss, the teacher, and one real run on Fashion-MNIST (Ray Train, loopback S3)."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from distcls import DistclsError, storage
from distcls.checkpoint import load_checkpoint, read_meta
from distcls.cli import main
from distcls.config import ConfigError, DistillConfig, load_config
from distcls.models import create_model
from distcls.tools.config import FASHION_MNIST_DEFAULT_DIR
from distcls.tools.fmnist import CLASS_NAMES
from distcls.train.distill import run_distillation
from distcls.train.loop import masked_loss, train_one_epoch
from distcls.train.objectives import Teacher, distillation_loss, soft_target_loss
from distcls.transforms import PreprocessSpec, preprocess_bytes
from tests.conftest import make_checkpoint, tiny_fashion_mnist

BUCKET = "s3://distill-test"
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DEFAULT_DIR), reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)"
)


def test_loss_mixes_soft_targets_and_labels():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10), torch.randn(6, 10) * 3
    labels, mask = torch.randint(0, 10, (6,)), torch.tensor([1, 1, 1, 1, 1, 0.0])
    t = 4.0
    # T^2 * KL(teacher/T || student/T) over the unmasked rows, as torch's kl_div computes it.
    expected_soft = (
        t
        * t
        * torch.nn.functional.kl_div(
            torch.log_softmax(student[:5] / t, 1), torch.log_softmax(teacher[:5] / t, 1), log_target=True, reduction="batchmean"
        )
    )
    assert soft_target_loss(student, teacher, mask, t) == pytest.approx(float(expected_soft), rel=1e-5)
    hard = masked_loss(student, labels, mask, None, 0.0)
    mixed = distillation_loss(student, labels, mask, teacher, temperature=t, alpha=0.3)
    assert mixed == pytest.approx(0.3 * float(expected_soft) + 0.7 * float(hard), rel=1e-5)
    assert distillation_loss(student, labels, mask, teacher, temperature=t, alpha=0.0) == pytest.approx(float(hard))
    # The loss depends on the teacher, and is zero in the soft term when the student matches it.
    other = distillation_loss(student, labels, mask, -teacher, temperature=t, alpha=0.3)
    assert other != pytest.approx(float(mixed))
    assert soft_target_loss(teacher, teacher, mask, t) == pytest.approx(0.0, abs=1e-6)


def test_config_checks_and_help():
    with pytest.raises(ConfigError, match=r"--temperature 0: .*--alpha 1\.5: must be in \[0, 1\]"):
        DistillConfig(data="d", teacher="t", alpha=1.5, temperature=0, weights="none")
    with pytest.raises(ConfigError, match="mobilenet_v3_small has no bundled weights; pass --weights none"):
        DistillConfig(data="d", teacher="t")
    cfg = DistillConfig(data="d", teacher="t", student="efficientnet_lite0")
    assert cfg.model == "efficientnet_lite0" and cfg.weights == "bundled"
    result = subprocess.run([sys.executable, "jobs/distill.py", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--teacher" in result.stdout and "--student" in result.stdout
    assert "--model" not in result.stdout
    example = load_config(DistillConfig, "jobs/configs/distill.yaml")  # the loader the CLI uses
    assert example.model == example.student == "mobilenet_v3_small" and example.weights == "none"


@pytest.fixture(scope="module")
def teacher_uri(tmp_path_factory):
    """A real teacher: the bundled ImageNet EfficientNet-Lite0 with a 10-class head, at 48 px."""
    return make_checkpoint(str(tmp_path_factory.mktemp("teacher") / "ckpt"), sorted(CLASS_NAMES), image_size=48, seed=0)


def test_teacher_sees_its_own_size_and_loop_feeds_it(teacher_uri, photo):
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    student_spec = PreprocessSpec(image_size=32)
    images = torch.from_numpy(preprocess_bytes(buf.getvalue(), student_spec)[None].repeat(2, 0))
    teacher = Teacher(teacher_uri, sorted(CLASS_NAMES), student_spec, torch.device("cpu"))
    logits = teacher(images)
    model, _ = load_checkpoint(teacher_uri)
    resized = TF.resize(images, [48, 48], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    assert torch.allclose(logits, model(resized), atol=1e-5)
    assert not logits.requires_grad

    # train_one_epoch hands the teacher's logits on the same images to the loss.
    student = create_model("mobilenet_v3_small", 10, "none", spec=student_spec)
    seen = []

    def loss_fn(out, labels, mask, teacher_logits):
        seen.append(teacher_logits)
        return distillation_loss(out, labels, mask, teacher_logits, temperature=2.0, alpha=0.5)

    batch = {"image": images.numpy(), "label": torch.tensor([1, 2]).numpy(), "mask": torch.ones(2).numpy()}
    opt = torch.optim.SGD([{"params": list(student.parameters()), "lr": 0.01, "initial_lr": 0.01}], lr=0.01)
    stats = train_one_epoch(
        student, [batch], opt, loss_fn, torch.device("cpu"), schedule=lambda s: 1.0, start_step=0, teacher=teacher
    )
    assert stats.steps == 1 and torch.allclose(seen[0], logits, atol=1e-5)
    with pytest.raises(DistclsError, match="distill: teacher .* has classes"):
        Teacher(teacher_uri, sorted(CLASS_NAMES)[:9] + ["other"], student_spec, torch.device("cpu"))


@pytest.fixture(scope="module")
def fm(s3_server, ray_local):
    return tiny_fashion_mnist(BUCKET, train_per_class=6, val_per_class=6)


@needs_fmnist
def test_distill_end_to_end(fm, teacher_uri, capsys):
    args = [
        "distill",
        "--teacher",
        teacher_uri,
        "--student",
        "mobilenet_v3_small",
        "--weights",
        "none",
        "--data",
        fm["train"],
        "--val-data",
        fm["val"],
        "--image-size",
        "32",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--num-workers",
        "1",
        "--storage",
        f"{BUCKET}/runs",
        "--name",
        "d1",
        "--temperature",
        "3",
        "--alpha",
        "0.6",
        "--keep",
        "1",
    ]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "teacher efficientnet_lite0" in out and "T=3.0, alpha=0.6" in out
    result = json.loads(storage.read_text(f"{BUCKET}/runs/d1/result.json"))
    model, meta = load_checkpoint(result["checkpoint"])
    teacher_meta = read_meta(teacher_uri)
    assert meta["architecture"] == "mobilenet_v3_small" and meta["class_names"] == sorted(CLASS_NAMES)
    assert meta["preprocessing"]["image_size"] == 32
    assert meta["distillation"] == {
        "teacher": teacher_uri,
        "teacher_id": teacher_meta["weights_sha256"],
        "teacher_architecture": "efficientnet_lite0",
        "teacher_image_size": 48,
        "temperature": 3.0,
        "alpha": 0.6,
    }
    assert meta["config"]["teacher"] == teacher_uri and meta["config"]["student"] == "mobilenet_v3_small"
    assert meta["metrics"]["val_samples"] == 60 and result["metrics"]["train_loss"] > 0
    assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)

    # A teacher for other classes is refused before Ray Train starts, in one line.
    wrong_uri = make_checkpoint(f"{BUCKET}/wrong-teacher", ["a", "b", "c"])
    args[args.index("d1")] = "d2"
    args[args.index(teacher_uri)] = wrong_uri
    assert main(args) == 2
    assert "distill: teacher s3://distill-test/wrong-teacher has classes ['a', 'b', 'c']" in capsys.readouterr().err
    assert not storage.exists(f"{BUCKET}/runs/d2/result.json")


@pytest.mark.slow
@needs_fmnist
def test_distill_recovers_from_a_worker_failure(fm, teacher_uri, monkeypatch):
    # 60 images / 2 workers / batch 16 = 2 steps per epoch; step 3 is in epoch 2.
    monkeypatch.setenv("DISTCLS_TEST_FAULT", "3")
    cfg = DistillConfig(
        data=fm["train"],
        val_data=fm["val"],
        teacher=teacher_uri,
        weights="none",
        image_size=32,
        batch_size=16,
        epochs=2,
        num_workers=2,
        storage=f"{BUCKET}/runs",
        name="dfail",
        max_failures=1,
    )
    result = run_distillation(cfg)
    assert storage.exists(f"{BUCKET}/runs/dfail/fault-injected.txt")
    assert [h["epoch"] for h in result["epochs"]] == [1, 2]
    assert read_meta(result["checkpoint"])["distillation"]["teacher_id"] == read_meta(teacher_uri)["weights_sha256"]

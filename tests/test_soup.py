"""`distcls soup` on real Fashion-MNIST images: weight averaging, the greedy soup passing over an ingredient
that would ruin it, the one-line refusals, and the command end to end (the soup checkpoint is calibrated)."""

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from distcls import DistclsError, storage
from distcls.checkpoint import checkpoint_id, load_checkpoint, read_meta, save_checkpoint
from distcls.cli import main
from distcls.config import SoupConfig
from distcls.datasets import load_images, load_labeled_index
from distcls.models import Classifier, create_model
from distcls.tools.config import FASHION_MNIST_DEFAULT_DIR
from distcls.train.soup import average_state_dicts, run_soup
from distcls.transforms import normalize
from tests.conftest import make_checkpoint, tiny_fashion_mnist

pytestmark = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEFAULT_DIR), reason="needs dataset-fashion-mnist")


def fit_head(train: str) -> tuple[Classifier, list[str]]:
    """Pretrained EfficientNet-Lite0 at 32 px whose linear head is fitted on the training images' features
    (a linear probe in plain torch: seconds on a CPU, well above chance on the validation images)."""
    class_names = load_labeled_index(train).class_names
    model = create_model("efficientnet_lite0", len(class_names), "bundled", image_size=32).eval()
    index = load_labeled_index(train, class_names=class_names)
    batch = load_images({"path": np.array(index.paths, dtype=object), "label": np.array(index.labels)}, model.spec)
    with torch.no_grad():
        features = model.net.forward_features(normalize(torch.as_tensor(batch["image"]), model.spec, torch.float32))
    labels = torch.as_tensor(batch["label"])
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.net._fc.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model.net._fc(features), labels).backward()
        optimizer.step()
    return model, class_names


def variant(model: Classifier, noise: float, head_factor: float, seed: int) -> Classifier:
    """A copy with every floating tensor scaled by (1 + noise * N(0, 1)) and the head multiplied by head_factor."""
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in out.net.state_dict().values():  # views of the parameters and buffers: changed in place
            if value.is_floating_point():
                value.mul_(1 + noise * torch.randn(value.shape, generator=generator))
        out.net._fc.weight.mul_(head_factor)
        out.net._fc.bias.mul_(head_factor)
    return out


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Three checkpoints of one fine-tune: `good`, `near` (good plus 0.1% noise everywhere) and `bad` (good's
    head times -5: on its own it ranks the right class last, and averaged with the others it outweighs them)."""
    root = tmp_path_factory.mktemp("soup")
    data = tiny_fashion_mnist(str(root / "data"), train_per_class=8, val_per_class=4)
    good, class_names = fit_head(data["train"])
    models = {"good": good, "near": variant(good, 1e-3, 1.0, seed=1), "bad": variant(good, 0.0, -5.0, seed=2)}
    uris = {}
    for name, model in models.items():
        uris[name] = str(root / name)
        storage.ensure_bucket(uris[name])
        save_checkpoint(uris[name], model, class_names, config={"model": "efficientnet_lite0", "source": "test"})
    return {"root": root, **data, **uris, "class_names": class_names}


def states(*uris: str) -> list[dict]:
    return [load_checkpoint(uri)[0].net.state_dict() for uri in uris]


def test_average_state_dicts_is_the_elementwise_mean_and_keeps_int_buffers_of_the_first(kit):
    a, b = states(kit["good"], kit["near"])
    ints = [k for k, v in a.items() if not v.is_floating_point()]
    assert ints and all(k.endswith("num_batches_tracked") for k in ints)
    b = {k: (v + 7 if k in ints else v) for k, v in b.items()}  # int buffers that differ: the first one's win
    avg = average_state_dicts([a, b])
    assert avg.keys() == a.keys()
    for k, v in avg.items():
        assert v.dtype == a[k].dtype
        expected = a[k] if k in ints else (a[k] + b[k]) / 2
        assert torch.equal(v, expected) if k in ints else torch.allclose(v, expected, rtol=1e-6, atol=1e-7), k
    assert any(not torch.equal(a[k], b[k]) for k in a if k not in ints)  # the noise made them differ
    half = average_state_dicts([{"w": torch.tensor([1.0, 2.0], dtype=torch.float16)}, {"w": torch.tensor([2.0, 3.0])}])
    assert half["w"].dtype == torch.float16 and torch.equal(half["w"], torch.tensor([1.5, 2.5], dtype=torch.float16))
    assert all(torch.equal(v, a[k]) for k, v in average_state_dicts([a]).items())


def test_uniform_soup_writes_the_average_and_a_calibrated_checkpoint(kit, ray_local, capsys):
    out = str(kit["root"] / "uniform")
    cfg = SoupConfig(checkpoints=(kit["good"], kit["near"]), data=kit["val"], out=out, method="uniform", batch_size=16)
    result = run_soup(cfg)
    assert result["checkpoint"] == out and result["method"] == "uniform" and result["kept"] == [kit["good"], kit["near"]]
    soup, meta = load_checkpoint(out)  # verifies the written weights against their sha256
    a, b = states(kit["good"], kit["near"])
    for k, v in soup.net.state_dict().items():
        assert torch.allclose(v, (a[k] + b[k]) / 2, rtol=1e-6, atol=1e-7) if v.is_floating_point() else torch.equal(v, a[k]), k
    record = meta["soup"]
    assert record["method"] == "uniform" and record["data"] == kit["val"]
    assert [i["uri"] for i in record["ingredients"]] == [kit["good"], kit["near"]]
    assert all(i["kept"] for i in record["ingredients"])
    assert record["ingredients"][0]["checkpoint_id"] == checkpoint_id(read_meta(kit["good"]))
    assert meta["metrics"] == {"val_accuracy": record["uniform_val_accuracy"], "val_samples": 40}
    assert result["val_accuracy"] == record["uniform_val_accuracy"] and result["val_samples"] == 40
    assert result["val_accuracy"] > 0.3  # well above chance (0.1): the averaged fine-tunes still classify
    assert meta["class_names"] == kit["class_names"] and meta["config"]["source"] == "test"
    assert meta["calibration"]["images"] == 40 and meta["calibration"]["temperature"] > 0 and result["calibration"]
    printed = capsys.readouterr().out
    assert f"soup: {kit['good']}: val_accuracy" in printed and "uniform (2 ingredients)" in printed
    assert "calibration: temperature" in printed and f"wrote {out}" in printed


def test_greedy_soup_passes_over_the_ingredient_that_ruins_it_via_the_cli(kit, ray_local, capsys):
    out = str(kit["root"] / "greedy")
    checkpoints = ",".join([kit["bad"], kit["good"], kit["near"]])
    assert main(["soup", "--checkpoints", checkpoints, "--data", kit["val"], "--out", out, "--batch-size", "16"]) == 0
    meta = json.loads(storage.read_text(f"{out}/distcls.json"))
    record = meta["soup"]
    by_uri = {i["uri"]: i for i in record["ingredients"]}
    assert [i["uri"] for i in record["ingredients"]] == [kit["bad"], kit["good"], kit["near"]]  # in the order given
    assert not by_uri[kit["bad"]]["kept"] and by_uri[kit["bad"]]["val_accuracy"] < 0.1  # it ranks the right class last
    best = max(by_uri.values(), key=lambda i: i["val_accuracy"])
    assert best["kept"] and best["val_accuracy"] > 0.3
    assert record["greedy_val_accuracy"] >= max(i["val_accuracy"] for i in by_uri.values())
    assert record["uniform_val_accuracy"] < 0.2 < record["greedy_val_accuracy"]  # the bad head outweighs the two good ones
    assert meta["metrics"]["val_accuracy"] == record["greedy_val_accuracy"] and record["method"] == "greedy"
    # the written weights are the average of exactly the kept ingredients
    kept = [i["uri"] for i in record["ingredients"] if i["kept"]]
    expected = average_state_dicts(states(*kept))
    assert all(torch.allclose(v, expected[k]) for k, v in load_checkpoint(out)[0].net.state_dict().items())
    assert "calibration" in meta and meta["calibration"]["images"] == 40
    printed = capsys.readouterr().out
    assert f"soup: {kit['bad']}: val_accuracy {by_uri[kit['bad']]['val_accuracy']:.4f}, skipped" in printed
    assert f"greedy ({len(kept)} of 3)" in printed and f"wrote {out}" in printed


def one_line_error(cfg: SoupConfig, prefix: str = "soup: ") -> str:
    with pytest.raises(DistclsError) as info:
        run_soup(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith(prefix)
    return message


def test_refuses_other_architectures_classes_and_preprocessing(kit):
    root = kit["root"]
    names = kit["class_names"]
    other = {
        "resnet": make_checkpoint(str(root / "r18"), names, model="resnet18", weights="none", seed=0),
        "reordered": make_checkpoint(str(root / "reordered"), names[::-1], seed=0),
        "bigger": make_checkpoint(str(root / "bigger"), names, image_size=64, seed=0),
    }

    def refusal(uri: str) -> str:
        return one_line_error(SoupConfig(checkpoints=(kit["good"], uri), data=kit["val"], out=str(root / "never")))

    message = refusal(other["resnet"])
    assert f"{other['resnet']} is a resnet18 checkpoint, {kit['good']} is efficientnet_lite0" in message
    assert "one architecture" in message
    message = refusal(other["reordered"])
    assert f"{other['reordered']} has classes" in message and "in the same order" in message
    message = refusal(other["bigger"])
    assert "image_size 64 vs 32" in message and "same input size" in message
    assert not os.path.exists(root / "never")


def test_refuses_exports_changed_weights_an_existing_out_and_duplicates(kit):
    root = kit["root"]
    export = str(root / "export")
    os.makedirs(export)
    meta = {**read_meta(kit["good"]), "format": "distcls-export/1"}
    meta["export"] = {"format": "onnx", "file": "model.onnx", "source_checkpoint": kit["good"]}
    storage.write_text(f"{export}/distcls.json", json.dumps(meta))
    message = one_line_error(SoupConfig(checkpoints=(kit["good"], export), data=kit["val"], out=str(root / "never")))
    assert f"{export} is a onnx export, which has no weights to average" in message and f"({kit['good']})" in message

    changed = str(root / "changed")
    shutil.copytree(kit["near"], changed)
    weights = bytearray(storage.read_bytes(f"{changed}/model.safetensors"))
    weights[-1] ^= 0xFF
    storage.write_bytes(f"{changed}/model.safetensors", bytes(weights))
    message = one_line_error(
        SoupConfig(checkpoints=(kit["good"], changed), data=kit["val"], out=str(root / "never")), "checkpoint: "
    )
    # load_checkpoint's own line, before any scoring
    assert f"{changed}/model.safetensors has sha256" in message and "changed or damaged, refusing to load" in message

    message = one_line_error(SoupConfig(checkpoints=(kit["good"], kit["near"]), data=kit["val"], out=kit["bad"]))
    assert f"{kit['bad']} already holds a model" in message and "choose a new --out" in message
    assert not os.path.exists(root / "never")

    with pytest.raises(DistclsError, match="names a checkpoint twice"):
        SoupConfig(checkpoints=(kit["good"], kit["good"]), data=kit["val"], out=str(root / "never"))

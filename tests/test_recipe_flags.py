"""The recipe flags of issue 21: each changes what it should. Weight EMA, mixup/cutmix, augmentation
policies, the balanced sampler, focal and class-balanced losses; and one real run with all of them,
resumed, tracked to an MLflow file store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from distcls.config import ConfigError, TrainConfig
from distcls.datasets import LabeledIndex
from distcls.metrics import effective_number_weights
from distcls.train.loop import Mix, Mixer, WeightEma, masked_loss
from distcls.train.trainer import balance
from distcls.transforms import PreprocessSpec, train_augment
from tests.conftest import tiny_fashion_mnist, tiny_train_config


def test_ema_follows_the_warmup_rule_and_differs_from_the_live_weights():
    torch.manual_seed(0)
    live = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = WeightEma(live, decay=0.99)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    live[1].num_batches_tracked += 5
    ema.update(live)
    d = min(0.99, 2 / 11)  # after one update: (1 + n) / (10 + n)
    got, now = ema.module.state_dict(), live.state_dict()
    for name, value in got.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, d * start[name] + (1 - d) * now[name])
    for name, _ in live.named_parameters():
        assert not torch.equal(got[name], now[name])
    assert int(got["1.num_batches_tracked"]) == 5  # integer buffers are copied
    assert all(not p.requires_grad for p in ema.module.parameters())
    for _ in range(3000):  # a constant model: the average converges to it
        ema.update(live)
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, now[name], atol=1e-4, rtol=0)


def test_mixup_and_cutmix_targets_sum_to_one_and_match_the_pixels():
    rng = np.random.default_rng(0)
    images = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).reshape(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.2, 1.0)):
        mixer = Mixer(mixup, cutmix, rng)
        for _ in range(20):
            mix = mixer(images, labels)
            targets = mix.targets(5)
            torch.testing.assert_close(targets.sum(1), torch.ones(4))
            assert 0 <= mix.lam <= 1
            assert torch.equal(mix.partners, labels.flip(0))
            own = (mix.images == images).float().mean(dim=(1, 2, 3))
            if mixup == 0:  # cutmix: the share of own pixels is lam (the box was pasted from the partner)
                torch.testing.assert_close(own, torch.full((4,), mix.lam))
                theirs = (mix.images == images.flip(0)).float().mean(dim=(1, 2, 3))
                torch.testing.assert_close(theirs, torch.full((4,), 1 - mix.lam))
            elif cutmix == 0:  # mixup: every pixel is the blend
                torch.testing.assert_close(mix.images, mix.lam * images + (1 - mix.lam) * images.flip(0))


def test_mixed_loss_is_cross_entropy_against_the_mixed_targets():
    torch.manual_seed(1)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    mix = Mix(torch.zeros(6, 3, 2, 2), labels, labels.flip(0), 0.3)
    mask = torch.ones(6)
    got = mix.loss(lambda lg, y, m: masked_loss(lg, y, m, None, 0.0), logits, mask)
    expected = -(mix.targets(4) * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(got, expected)


def test_focal_loss_against_a_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([0, 2, 0, 2])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last row is a placeholder
    gamma = 2.0
    p = torch.softmax(logits, 1)[torch.arange(4), labels]
    per_row = -((1 - p) ** gamma) * torch.log(p)
    torch.testing.assert_close(masked_loss(logits, labels, mask, None, 0.0, gamma), per_row[:3].mean())
    weights = torch.tensor([2.0, 1.0, 0.5])
    w = weights[labels] * mask
    torch.testing.assert_close(masked_loss(logits, labels, mask, weights, 0.0, gamma), (per_row * w).sum() / w.sum())
    # gamma 0 is the cross-entropy, smoothing included
    torch.testing.assert_close(
        masked_loss(logits[:3], labels[:3], mask[:3], None, 0.1, 1e-12),
        torch.nn.functional.cross_entropy(logits[:3], labels[:3], label_smoothing=0.1),
        atol=1e-5,
        rtol=0,
    )
    # well-classified rows count less than under cross-entropy
    assert masked_loss(logits, labels, mask, None, 0.0, gamma) < masked_loss(logits, labels, mask, None, 0.0)


def test_class_balanced_weights_follow_the_effective_number():
    counts = [1000, 100, 10, 0]
    beta = 0.999
    raw = np.array([(1 - beta) / (1 - beta**n) for n in counts[:3]])
    np.testing.assert_allclose(effective_number_weights(counts, beta)[:3], raw * 3 / raw.sum())
    assert effective_number_weights(counts, beta)[3] == 0
    w = effective_number_weights(counts, beta)
    assert w[0] < w[1] < w[2]  # rarer classes weigh more
    np.testing.assert_allclose(effective_number_weights(counts, 1e-9)[:3], [1, 1, 1], rtol=1e-6)  # beta -> 0: none


def test_balanced_sampler_gives_every_class_an_equal_share():
    sizes = [300, 60, 7, 0, 33]
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    index = LabeledIndex([f"img{i}.png" for i in range(len(labels))], labels, list("abcde"))
    out = balance(index, seed=3)
    assert len(out) == len(index)
    counts = np.bincount(out.labels, minlength=5)
    present = counts[[0, 1, 2, 4]]
    assert counts[3] == 0 and present.max() - present.min() <= 1
    head = [p for p, y in zip(out.paths, out.labels) if y == 0]
    assert len(set(head)) == len(head)  # the common class gives distinct images, not repeats
    rare = np.unique([p for p, y in zip(out.paths, out.labels) if y == 2], return_counts=True)[1]
    assert len(rare) == 7 and rare.max() - rare.min() <= 1  # the rare class repeats each image evenly
    assert balance(index, seed=3).paths == out.paths


def test_augmentation_policies():
    spec = PreprocessSpec(image_size=32, hflip=False)
    assert train_augment(spec, random_crops=False, policy="none", rng=np.random.default_rng(0)) is None
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    flipping = PreprocessSpec(image_size=32, hflip=True)
    flipped = train_augment(flipping, False, "flip", np.random.default_rng(0))(images)
    same = [torch.equal(a, b) for a, b in zip(flipped, images)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, images)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    for policy in ("trivialaugment", "randaugment"):
        torch.manual_seed(0)
        out = train_augment(flipping, False, policy, np.random.default_rng(0))(images)
        assert out.dtype == torch.uint8 and out.shape == images.shape
        changed = sum(not (torch.equal(a, b) or torch.equal(a, b.flip(-1))) for a, b in zip(out, images))
        assert changed >= 8  # most images get an op beyond the flip
        torch.manual_seed(0)
        again = train_augment(flipping, False, policy, np.random.default_rng(0))(images)
        assert torch.equal(out, again)  # seeded per epoch: the same draws again


def test_flag_validation():
    with pytest.raises(ConfigError, match="--ema 1.0"):
        TrainConfig(data="x", ema=1.0)
    with pytest.raises(ConfigError, match="--augment 'autoaugment'"):
        TrainConfig(data="x", augment="autoaugment")
    with pytest.raises(ConfigError, match="--loss class-balanced brings its own class weights"):
        TrainConfig(data="x", loss="class-balanced", class_weights="balanced")
    with pytest.raises(ConfigError, match="--mixup -0.2"):
        TrainConfig(data="x", mixup=-0.2)
    with pytest.raises(ConfigError, match="--sampler 'weighted'"):
        TrainConfig(data="x", sampler="weighted")


def test_a_run_with_every_flag_saves_the_average_resumes_and_is_tracked(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from distcls.checkpoint import read_meta
    from distcls.tracking import tracking_uri_for
    from distcls.train.trainer import run_training

    fm = tiny_fashion_mnist(str(tmp_path / "data"))
    store = str(tmp_path / "mlruns")
    flags = dict(ema=0.9, mixup=0.2, cutmix=1.0, augment="trivialaugment", sampler="balanced", loss="focal", random_crops=True)
    first = run_training(tiny_train_config(fm, str(tmp_path / "runs"), "flags", tracking_uri=store, **flags))
    meta = read_meta(first["checkpoint"])
    assert {k: meta["config"][k] for k in flags} == flags
    assert meta["preprocessing"]["hflip"] is True  # every policy but none flips
    weights = load_safetensors(Path(first["checkpoint"], "model.safetensors").read_bytes())
    state = torch.load(io.BytesIO(Path(first["checkpoint"], "train_state.pt").read_bytes()), weights_only=True)
    steps = meta["metrics"]["step"]
    assert state["ema_updates"] == steps > 0
    live = state["live_weights"]
    assert set(live) == set(weights)
    assert any(not torch.equal(weights[k], live[k]) for k in weights if weights[k].is_floating_point())

    resumed = run_training(
        tiny_train_config(fm, str(tmp_path / "runs"), "flags", tracking_uri=store, epochs=3, resume=True, **flags)
    )
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2, 3]
    last = max((tmp_path / "runs" / "flags").glob("checkpoint_2*"), key=lambda p: read_meta(str(p))["metrics"]["epoch"])
    state = torch.load(io.BytesIO((last / "train_state.pt").read_bytes()), weights_only=True)
    assert state["ema_updates"] == read_meta(str(last))["metrics"]["step"] > steps  # the average went on from where it was

    client = MlflowClient(tracking_uri_for(store))
    runs = client.search_runs([client.get_experiment_by_name("distcls").experiment_id], order_by=["attributes.start_time"])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    first_run, second_run = runs
    assert first_run.data.params["ema"] == "0.9" and first_run.data.params["loss"] == "focal"
    assert [m.step for m in client.get_metric_history(first_run.info.run_id, "val_accuracy")] == [1, 2]
    assert [m.step for m in client.get_metric_history(second_run.info.run_id, "val_accuracy")] == [3]
    assert second_run.data.tags["checkpoint"] == resumed["checkpoint"]
    assert {a.path for a in client.list_artifacts(second_run.info.run_id)} >= {"curves.png", "result.json"}
    result = json.loads(Path(client.download_artifacts(second_run.info.run_id, "result.json", str(tmp_path / "dl"))).read_text())
    assert result["checkpoint"] == resumed["checkpoint"]

"""Metric functions against hand-computed values."""

import numpy as np
import pytest
import torch

from distcls.metrics import balanced_class_weights, confusion_matrix, summarize, topk_correct
from distcls.train.loop import masked_loss, warmup_cosine


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_summary_by_hand_including_a_class_never_predicted():
    # true: a a a b b c ; pred: a a b b b b  -> class c is never predicted
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 1, 1, 1, 1])
    s = summarize(confusion_matrix(labels, preds, 3), ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(4 / 6)
    pa, ra = 1.0, 2 / 3
    pb, rb = 2 / 4, 1.0
    pc, rc = 0.0, 0.0
    f = lambda p, r: 0.0 if p + r == 0 else 2 * p * r / (p + r)  # noqa: E731
    assert s["per_class"]["a"] == pytest.approx({"precision": pa, "recall": ra, "f1": f(pa, ra), "support": 3})
    assert s["per_class"]["b"] == pytest.approx({"precision": pb, "recall": rb, "f1": f(pb, rb), "support": 2})
    assert s["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert s["macro_precision"] == pytest.approx((pa + pb + pc) / 3)
    assert s["macro_recall"] == pytest.approx((ra + rb + rc) / 3)
    assert s["macro_f1"] == pytest.approx((f(pa, ra) + f(pb, rb)) / 3)
    assert s["weighted_f1"] == pytest.approx((3 * f(pa, ra) + 2 * f(pb, rb)) / 6)
    assert s["num_samples"] == 6


def test_absent_class_does_not_dilute_macro_average():
    s = summarize(confusion_matrix(np.array([0, 1]), np.array([0, 1]), 3), ["a", "b", "unused"])
    assert s["macro_f1"] == 1.0 and s["per_class"]["unused"]["support"] == 0


def test_topk():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.04, 0.06], [0.2, 0.3, 0.5]])
    labels = np.array([2, 1, 0])
    assert topk_correct(logits, labels, 1) == 0
    assert topk_correct(logits, labels, 2) == 1
    assert topk_correct(logits, labels, 5) == 3  # k is capped at the number of classes


def test_balanced_class_weights():
    np.testing.assert_allclose(balanced_class_weights([80, 20, 0]), [100 / (2 * 80), 100 / (2 * 20), 0.0])


def test_class_weights_change_the_loss_as_pytorch_defines_it():
    torch.manual_seed(0)
    logits, labels = torch.randn(12, 3), torch.tensor([0] * 8 + [1] * 3 + [2])
    mask = torch.ones(12)
    weights = torch.tensor(balanced_class_weights([8, 3, 1]), dtype=torch.float32)
    ours = masked_loss(logits, labels, mask, weights, 0.1)
    reference = torch.nn.functional.cross_entropy(logits, labels, weight=weights, label_smoothing=0.1)
    torch.testing.assert_close(ours, reference)
    unweighted = masked_loss(logits, labels, mask, None, 0.1)
    assert not torch.isclose(ours, unweighted)
    # The rare classes' per-sample losses count more with balanced weights.
    per_sample = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    manual = (per_sample * weights[labels]).sum() / weights[labels].sum()
    torch.testing.assert_close(masked_loss(logits, labels, mask, weights, 0.0), manual)


def test_masked_rows_do_not_count():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    got = masked_loss(logits, labels, torch.tensor([1.0, 1.0, 0.0, 0.0]), None, 0.0)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits[:2], labels[:2]))
    assert masked_loss(logits, labels, torch.zeros(4), None, 0.0) == 0


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)

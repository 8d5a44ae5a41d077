"""distcls.scores: temperature fitting against a hand computation, the calibration metrics, OOD scores,
"unknown" thresholds. NumPy only, no Ray."""

import json
import math

import numpy as np
import pytest

from distcls import DistclsError
from distcls.checkpoint import read_meta
from distcls.scores import (
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    Calibration,
    auroc,
    brier,
    ece,
    energy,
    fit_calibration,
    fit_temperature,
    nll,
    probabilities,
    reliability,
    resolve_unknown,
    score,
)


def test_temperature_fit_matches_the_hand_computed_minimum():
    """Two classes, logits (+z, -z) for every image, a share q of labels on the first class. The NLL of
    softmax(logits/T) is -q log s(2z/T) - (1-q) log s(-2z/T), minimal where s(2z/T) = q, i.e.
    T = 2z / log(q / (1-q))."""
    z, q, n = 3.0, 0.8, 1000
    logits = np.tile([z, -z], (n, 1))
    labels = np.r_[np.zeros(int(q * n), int), np.ones(n - int(q * n), int)]
    expected = 2 * z / math.log(q / (1 - q))
    assert fit_temperature(logits, labels) == pytest.approx(expected, rel=1e-4)
    # and it is the minimum of a fine grid search
    grid = np.exp(np.linspace(math.log(0.2), math.log(20), 20001))
    best = grid[np.argmin([nll(probabilities(logits, t), labels) for t in grid])]
    assert fit_temperature(logits, labels) == pytest.approx(best, rel=1e-3)


def test_overconfident_logits_are_cooled_and_ece_falls():
    rng = np.random.default_rng(0)
    n, k = 4000, 10
    true_logits = rng.normal(size=(n, k)) * 1.5
    labels = np.array([rng.choice(k, p=p) for p in probabilities(true_logits)])  # labels drawn from the model
    record = fit_calibration(true_logits * 3.0, labels)  # 3x overconfident
    assert record["temperature"] == pytest.approx(3.0, rel=0.1)
    assert record["ece_after"] < record["ece_before"] and record["ece_after"] < 0.03
    assert record["nll_after"] < record["nll_before"] and record["brier_after"] < record["brier_before"]
    # the threshold keeps 95% of the images it was fitted on
    kept = energy(true_logits * 3.0, record["temperature"]) <= record["ood_threshold"]
    assert kept.mean() == pytest.approx(0.95, abs=0.002)


def test_metrics_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    labels = np.array([0, 1, 1])
    assert nll(probs, labels) == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.8)) / 3)
    assert brier(probs, labels) == pytest.approx((2 * 0.1**2 + 2 * 0.6**2 + 2 * 0.2**2) / 3)
    # confidences 0.9 (right), 0.6 (wrong), 0.8 (right) in 3 different bins of 10
    r = reliability(probs, labels, bins=10)
    assert sum(r["count"]) == 3
    assert ece(probs, labels, bins=10) == pytest.approx((abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.8)) / 3)


def test_scores_columns_and_ranges():
    logits = np.array([[4.0, 1.0, 0.0], [0.1, 0.0, 0.05], [20.0, 19.0, -5.0]])
    s = score(logits, Calibration(temperature=2.0, ood_threshold=None, calibrated=True), top_k=2)
    assert np.allclose(s.probs.sum(1), 1.0) and np.allclose(s.probs, probabilities(logits, 2.0))
    assert s.order.tolist() == [[0, 1], [0, 2], [0, 1]]
    assert np.all((s.margin >= 0) & (s.margin <= 1))
    assert np.all((s.entropy >= 0) & (s.entropy <= math.log(3) + 1e-9))
    assert s.entropy[1] > s.entropy[0]  # the flat row is the uncertain one
    assert np.allclose(s.ood_score, -2.0 * np.log(np.exp(logits / 2.0).sum(1)))
    assert not s.unknown.any()
    flagged = score(logits, Calibration(), top_k=1, threshold=-3.0)
    assert flagged.unknown.tolist() == (energy(logits) > -3.0).tolist() == [False, True, False]


def test_auroc_against_a_direct_count():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=300), rng.normal(0.7, 1, size=200)
    b[:20] = a[:20]  # ties count half
    direct = np.mean([(y > x) + 0.5 * (y == x) for x in a for y in b])
    assert auroc(a, b) == pytest.approx(direct)


def test_unknown_setting():
    calibrated = Calibration(temperature=1.3, ood_threshold=-4.5, calibrated=True)
    assert resolve_unknown("off", calibrated, "label") is None
    assert resolve_unknown("auto", calibrated, "label") == -4.5
    assert resolve_unknown("-2.5", calibrated, "label") == -2.5
    with pytest.raises(DistclsError, match="label: --unknown auto needs the threshold a calibrated checkpoint records"):
        resolve_unknown("auto", Calibration(), "label")
    with pytest.raises(DistclsError, match="is not auto, off or a number"):
        resolve_unknown("sometimes", calibrated, "serve")


def test_old_checkpoints_are_uncalibrated_and_bad_records_are_refused():
    assert Calibration.of({}) == Calibration() and "uncalibrated" in Calibration.of({}).describe()
    good = Calibration.of({"calibration": {"temperature": 1.5, "ood_threshold": -3.0}})
    assert good.calibrated and good.temperature == 1.5 and "calibrated (temperature 1.500)" in good.describe()
    for bad in ({"temperature": -1}, {"temperature": "hot"}, {"ood_threshold": 1.0}, {"temperature": float("nan")}):
        with pytest.raises(DistclsError, match="calibrat"):
            Calibration.of({"calibration": bad})


def test_temperature_outside_the_bounds_is_refused_when_a_checkpoint_is_read(tmp_path):
    """A subnormal temperature (1e-310) is finite and positive, yet logits / T overflow to inf and every score
    is NaN: refused at load, in one line naming the file, like 0, NaN, inf or 1e4; the bounds themselves load."""
    for t in (1e-310, 0.0, 9e-4, 1.1e3, 1e4, float("inf"), float("nan")):
        with pytest.raises(DistclsError, match=r"outside \[0.001, 1000\]"):
            Calibration.of({"calibration": {"temperature": t, "ood_threshold": -3.0}})
    assert Calibration.of({"calibration": {"temperature": TEMPERATURE_MIN}}).temperature == 1e-3
    assert Calibration.of({"calibration": {"temperature": TEMPERATURE_MAX}}).temperature == 1e3
    meta = {"architecture": "efficientnet_lite0", "class_names": ["a", "b"], "preprocessing": {}, "weights_sha256": "0" * 64}
    for temperature, origin in ((1e-310, None), (float("nan"), "s3://models/original")):
        ck = tmp_path / f"ck-{origin is None}"
        ck.mkdir()
        record = {**meta, "calibration": {"temperature": temperature, "ood_threshold": -3.0, "data": "s3://val"}}
        if origin:
            record["calibrated_from"] = {"model": origin, "id": "0" * 64}
        (ck / "distcls.json").write_text(json.dumps(record))  # NaN written as the JSON literal Python reads back
        with pytest.raises(DistclsError) as err:
            read_meta(str(ck))
        message = str(err.value)
        assert "\n" not in message and str(ck / "distcls.json") in message and "outside [0.001, 1000]" in message
        assert (f"--checkpoint {origin}" if origin else "delete its `calibration` record") in message


def test_fit_stays_in_the_bounds_and_refuses_non_finite_logits():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 200)
    separable = np.eye(3)[labels] * 1e6  # perfectly separated: the NLL falls as T -> 0
    wrong = -np.eye(3)[labels] * 50.0  # always wrong: the NLL falls as T -> inf
    for logits in (separable, wrong, np.zeros((200, 3))):
        assert TEMPERATURE_MIN <= fit_temperature(logits, labels) <= TEMPERATURE_MAX
    broken = rng.normal(size=(200, 3))
    broken[5, 1], broken[7, 0] = np.inf, np.nan
    with pytest.raises(DistclsError, match=r"non-finite logits \(NaN or infinity\) for 2 of 200 images"):
        fit_temperature(broken, labels)

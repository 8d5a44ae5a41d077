"""`distcls serve` autoscales, on the session's local Ray: replicas rise under load and fall back after it,
a min_replicas 0 application reaches 0 replicas and its first request after that is answered, and no
request fails throughout. One run of `distcls.tools.bench.autoscale` (the real endpoint, real HTTP) for both tests.

Requests wait 0.2 s at the classifier's batcher (4 clients never fill a batch), so the queue that Serve's
autoscaler reads builds up without saturating 2 cores: on a saturated machine a new replica takes half a
minute to start. torch instead of ONNX: the test's fresh checkpoint would be compiled first (15 s).
"""

import pytest

from distcls.tools.bench.autoscale import bench_autoscale
from tests.conftest import make_checkpoint

# ~150 s of real scale-up/down timing: in `make test-all` (CI's 30-minute budget).
pytestmark = pytest.mark.slow

OVERRIDES = {"batch_wait_timeout_s": 0.2, "runtime": "torch"}


@pytest.fixture(scope="module")
def autoscaled(ray_local, tmp_path_factory):
    """(the bench's record, the PNG's path): mobilenet_v3_small at 64 px, 1..3 replicas, then 0..3."""
    from ray import serve

    root = tmp_path_factory.mktemp("autoscale")
    checkpoint = str(root / "ck")
    make_checkpoint(checkpoint, 10, model="mobilenet_v3_small", weights="none", image_size=64)
    png = root / "autoscale.png"
    try:
        result = bench_autoscale(
            str(root),
            checkpoint=checkpoint,
            clients_high=4,
            load_seconds=90,
            idle_seconds=90,
            out_png=str(png),
            overrides=OVERRIDES,
            stop_at_max=True,
        )
    finally:
        serve.shutdown()
    return result, png


def test_scales_up_under_load_and_back_down(autoscaled):
    result, png = autoscaled
    phases = {}
    for _, replicas, phase in result["timeline"]:
        phases.setdefault(phase, []).append(replicas)
    assert set(phases["idle"]) == {1}, phases["idle"]
    assert result["scaled_up"] and max(phases["load"]) == result["max_replicas_seen"] > 1, phases["load"]
    assert result["max_replicas_seen"] <= 3
    assert result["scaled_down"] and phases["cooldown"][-1] == 1, phases["cooldown"]
    assert result["requests"] > 0
    assert result["failed_requests"] == 0 and set(result["status_codes"]) == {"200"}, result["status_codes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scales_to_zero_and_cold_start_answers(autoscaled):
    result, _ = autoscaled
    assert result["reached_zero"], [row for row in result["timeline"] if row[2] == "scale_to_zero"]
    assert any(replicas == 0 for _, replicas, phase in result["timeline"] if phase == "scale_to_zero")
    assert result["cold_status"] == "200" and result["warm_status"] == "200"
    assert result["cold_start_s"] > 0 and result["warm_request_s"] > 0
    after = [replicas for _, replicas, phase in result["timeline"] if phase == "cold_start"]
    assert after and after[-1] >= 1  # the request brought a replica back
    assert result["settings"]["min_replicas"] == 1  # the scale-to-zero phase redeployed with 0, not the record

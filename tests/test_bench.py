"""`distcls bench all` in a tiny configuration: it runs end to end and fills every field of bench.json.
Figures are printed, never asserted (timings on a shared 2-core machine are not a test)."""

import json
import os
import subprocess
import sys

import pytest

from distcls.tools.config import FASHION_MNIST_DEFAULT_DIR


@pytest.mark.slow  # ~4 min: every benchmark in miniature (train, label, serve, autoscale, transfer, recipe)
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEFAULT_DIR), reason="needs dataset-fashion-mnist")
def test_bench_all_tiny(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distcls.cli",
            "bench",
            "all",
            "--images-per-class",
            "4",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--workers",
            "1",
            "--label-images",
            "8",
            "--serve-images",
            "4",
            "--serve-clients",
            "1,16",
            "--serve-seconds",
            "1",
            "--transfer-per-class",
            "4",
            "--transfer-epochs",
            "1",
            "--transfer-lrs",
            "0.001",
            "--transfer-test-per-class",
            "2",
            "--recipe-settings",
            "faces",
            "--recipe-seeds",
            "1",
            "--recipe-epochs",
            "1",
            "--label-large-photos",
            "2",
            "--ceiling-seconds",
            "1",
            "--autoscale-clients",
            "2",
            "--autoscale-load-seconds",
            "3",
            "--autoscale-idle-seconds",
            "10",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    bench = json.loads(out.read_text())
    assert set(bench) >= {"settings", "machine", "train", "label", "serve", "transfer"}
    assert bench["machine"]["cores"] >= 1 and bench["machine"]["ray"] and bench["machine"]["torch"]
    train = bench["train"]
    assert train["plain_images_per_s"] > 0
    for key in ("streamed_1w", "cached_1w"):
        assert train[key]["images_per_s_per_worker"] > 0 and train[key]["ratio"] > 0
    label = bench["label"]
    assert label["default_runtime"] == "onnx" and label["images"] == 8
    for key in ("ratio_vs_plain_torch", "ratio_vs_plain_same_runtime", "ratio_vs_ceiling_same_runtime"):
        assert label[key] > 0, key
    for runtime in ("torch", "onnx"):
        row = label["rows"][runtime]
        assert row["model_only_images_per_s"] > 0 and row["plain_images_per_s"] > 0 and row["distcls_images_per_s"] > 0
    assert 0 <= label["top1_agreement_default_vs_torch"] <= 1
    for photos in ("bench_photos", "photos_12mp"):
        assert label["decode"][photos]["draft_images_per_s"] > 0 and label["decode"][photos]["full_decode_images_per_s"] > 0
    serve = bench["serve"]
    assert serve["default_runtime"] == "onnx" and serve["model_only_images_per_s"]["onnx"] > 0
    for key in ("ratio_rps_vs_plain_torch", "ratio_p99_vs_plain_torch", "ratio_rps_vs_plain_same_runtime"):
        assert serve[key] > 0, key
    rows = serve["rows"]
    assert [r["clients"] for r in rows] == [1, 16] and serve["ratio_clients"] == 16
    for row in rows:
        for server in ("plain_torch", "plain_onnx", "distcls", "distcls_torch"):
            assert row[server]["requests_per_s"] > 0 and row[server]["p99_ms"] >= row[server]["p50_ms"] > 0
            assert set(row[server]["status_codes"]) == {"200"}, row[server]["status_codes"]
    autoscale = bench["autoscale"]  # too short to scale: the fields are filled, the figure is written
    assert autoscale["failed_requests"] == 0 and autoscale["timeline"] and autoscale["settings"]["max_replicas"] == 3
    assert (tmp_path / "bench-autoscale.png").read_bytes()[:4] == b"\x89PNG"
    transfer = bench["transfer"]
    assert transfer["bundled"]["test_images"] == transfer["none"]["test_images"] == 20
    assert -1 <= transfer["pretrained_minus_scratch"] <= 1
    recipe = bench["recipe"]
    faces = recipe["settings"]["faces"]
    assert faces["train_images"] == 140 and faces["test_images"] == 60 and faces["seeds"] == 1
    assert 0 < faces["default_accuracy"] <= 1 and 0 < faces["plain_accuracy"] <= 1
    assert recipe["min_ratio_default_vs_plain"] == faces["ratio"] > 0
    assert 0 <= faces["data_wait_fraction"] <= 1 and faces["recipe"]["steps"] >= 1
    # the table of ratios and targets is printed
    assert "measure" in result.stdout and "label vs plain PyTorch DataLoader script" in result.stdout
    assert "serve req/s vs plain PyTorch server, 16 clients" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEFAULT_DIR), reason="needs dataset-fashion-mnist")
def test_gpu_check_script_runs_on_cpu_in_smoke_mode(tmp_path):
    """jobs/bench_gpu.py is meant for a GPU machine; --cpu-smoke runs the same stages, tiny, on CPU."""
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    result = subprocess.run(
        [sys.executable, "jobs/bench_gpu.py", "--cpu-smoke", "--models", "efficientnet_lite0", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    got = json.loads(out.read_text())["models"]["efficientnet_lite0"]
    assert got["train"]["streamed_1w"]["ratio"] > 0 and got["label"]["ratio_vs_ceiling_same_runtime"] > 0
    assert "model-only ceiling" in result.stdout


def test_gpu_check_script_refuses_cpu_without_smoke():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible")
    result = subprocess.run(
        [sys.executable, "jobs/bench_gpu.py"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 2 and "no CUDA GPU is visible" in result.stderr


@pytest.mark.slow  # ~1 min: three `distcls label` processes, each with its own Ray
def test_bench_scale_tiny(tmp_path):
    """`bench scale` at 300 objects: every key, exactly one row per object after the kill and rerun."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "distcls.cli", "bench", "scale", "--objects", "300", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    scale = json.loads(out.read_text())["scale"]
    assert scale["rows"] == scale["distinct_paths"] == scale["rows_after_kill_and_rerun"] == 300
    for key in ("list_keys_per_s", "time_to_first_part_s", "driver_peak_rss_mb", "images_per_s", "rerun_done_s", "resume_half_s"):
        assert scale[key] > 0, key


def test_plain_ingest_decodes_as_the_training_transform():
    """The plain script's own PIL code (draft mode, resize, center square) gives distcls's training base input
    pixel for pixel: on the bench photos, on them re-encoded smaller (as `pack --max-side` stores them), on PNGs."""
    import io

    from PIL import Image

    from distcls.models import default_spec
    from distcls.tools.bench.harness import make_photos
    from distcls.tools.bench.scale import small_pngs
    from distcls.tools.plain_ingest import decode
    from distcls.transforms import preprocess_bytes

    photos = make_photos(6)
    smaller = []
    for data in photos[:3]:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).resize((256, 192)).save(buf, format="JPEG", quality=90)
        smaller.append(buf.getvalue())
    for size in (64, 224):
        spec = default_spec("efficientnet_lite0", size)
        for data in photos + smaller + small_pngs(3):
            ours = preprocess_bytes(data, spec, train=True)
            plain = decode(data, spec.resize_size, spec.interpolation)
            assert plain.shape == ours.shape == (3, spec.resize_size, spec.resize_size)
            assert (plain == ours).all()


def test_plain_ingest_deals_every_unit_to_one_rank_and_ranks_take_equal_steps():
    from distcls.tools.plain_ingest import deal, steps_of

    units = [(f"s{i}", g, rows) for i, rows in enumerate([300, 120, 500, 64, 64, 250, 7]) for g in range(2)]
    for world in (1, 2, 3):
        for epoch in range(3):
            shares = deal(units, world, seed=0, epoch=epoch)
            assert sorted(u for share in shares for u in share) == sorted(units)
            rows = [sum(u[2] for u in share) for share in shares]
            assert max(rows) - min(rows) <= 500  # no rank gets more than one unit's rows beyond another
        assert deal(units, world, 0, 1) == deal(units, world, 0, 1) and deal(units, 2, 0, 1) != deal(units, 2, 0, 2)
    share = [("a", 0, 70), ("b", 0, 10), ("c", 0, 33)]
    assert steps_of(share, 0, 32) == 4  # one stream of 113 rows
    assert steps_of(share, 2, 32) == 4 + 1  # loader worker 0 batches a and c (103 rows), worker 1 b (10 rows)


def test_million_writer_makes_a_pack_that_the_readers_open(tmp_path):
    """The 1M set of `bench ingest` is written without a file per image; at 3,000 rows: the readers take it as a
    distcls pack (every footer, row count and class name checked), with a 1% val split and pack's columns."""
    import pyarrow.parquet as pq

    from distcls.packed import open_packed
    from distcls.tools.bench.ingest_million import CLASS_NAMES, TINY_SIDE, write_million

    made = write_million(str(tmp_path / "tiny"), 3000)
    packed = open_packed(str(tmp_path / "tiny"))
    assert packed is not None and packed.kind == "distcls" and packed.class_names == list(CLASS_NAMES)
    assert packed.num_rows("train") + packed.num_rows("val") == made["images"] == 3000
    assert packed.num_rows("val") == 30 and sum(packed.counts("val").values()) == 30
    shard = pq.read_table(packed.shards("train")[0].uri)
    assert shard.column_names == ["image", "label", "width", "height", "sha256"]
    assert set(shard.column("width").to_pylist()) == {TINY_SIDE}
    ids, labels = packed.paths_and_labels("train")
    assert len(set(ids)) == len(ids) == packed.num_rows("train") and set(labels) == set(range(len(CLASS_NAMES)))


@pytest.mark.slow  # ~12 min on a busy 2-core machine: a pack, four distcls train runs, the plain script, the driver
def test_bench_ingest_tiny(tmp_path):
    """`bench ingest` in miniature fills every key of its bench.json section and prints its table lines."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    args = ["--ingest-images", "40", "--ingest-epochs", "1", "--ingest-shards", "4", "--ingest-loader-workers", "1"]
    args += ["--ingest-million", "2000", "--workers", "1", "--image-size", "32", "--batch-size", "8", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "distcls.cli", "bench", "ingest", *args], capture_output=True, text=True, timeout=1500, env=env
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    ingest = json.loads(out.read_text())["ingest"]
    assert ingest["pack"]["images"] + ingest["pack"]["rejected"] == 40 and ingest["pack"]["images_per_s"] > 0
    for row in ("per_object_s3_1w", "packed_s3_1w", "packed_local_1w", "cached_1w", "plain_s3_1w"):
        assert ingest["runs"][row]["images_per_s_per_worker"] > 0, row
        assert 0 <= ingest["runs"][row]["data_wait_fraction"] <= 1, row
    assert ingest["runs"]["plain_s3_1w"]["loader_workers"] == 1
    for key in ("ratio_packed_s3_vs_cached", "ratio_packed_vs_plain_loader", "ratio_packed_vs_per_object_s3"):
        assert ingest[key] > 0, key
    assert 0 <= ingest["data_wait_fraction_packed_s3"] <= 1
    assert ingest["per_worker_scaling_2w"] is None  # one worker count asked for
    assert ingest["million"]["pack"]["images"] == 2000
    assert 0 < ingest["driver_peak_rss_mb_1m"] < 100_000 and 0 < ingest["first_step_s_1m"] < 900
    assert "ingest: packed S3 / plain DataLoader script, 1 worker" in result.stdout
    assert "ingest: seconds to the first step (2,000 images)" in result.stdout

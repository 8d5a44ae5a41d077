"""`distcls label` on the loopback S3 server with real good and bad files."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distcls import storage
from distcls.checkpoint import from_pretrained
from distcls.cli import main
from distcls.config import LabelConfig
from distcls.label import existing_parts, output_schema, run_labeling
from distcls.tools.bench.scale import kill_session, session_members
from tests.conftest import encode

BUCKET = "s3://label-test"
IMAGENET_CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def imagenet_ckpt(s3_server):
    storage.ensure_bucket(BUCKET)
    from_pretrained(f"{BUCKET}/ck/imagenet")
    return f"{BUCKET}/ck/imagenet"


@pytest.fixture(scope="module")
def inputs(s3_server, good_images, bad_images, photo):
    root = f"{BUCKET}/in"
    items = [(f"{root}/good/{name}", data) for name, data in good_images.items()]
    items += [(f"{root}/bad/{name}", data) for name, (data, _) in bad_images.items()]
    items += [
        (f"{root}/cat.JPG", encode(Image.fromarray(photo), "JPEG", quality=92)),
        (f"{root}/notes.txt", b"not listed: no image extension"),
    ]
    storage.write_many(items)
    return root, len(good_images) + 1, {name: kind for name, (_, kind) in bad_images.items()}


def read_output(uri: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(io.BytesIO(storage.read_bytes(p))) for p in existing_parts(uri))


def test_one_row_per_object_errors_and_rerun(ray_local, imagenet_ckpt, inputs, capsys):
    root, n_good, bad_kinds = inputs
    out = f"{BUCKET}/out1"
    code = main(
        ["label", "--checkpoint", imagenet_ckpt, "--input", root, "--output", out, "--top-k", "3", "--concurrency", "1,2"]
    )
    assert code == 0, capsys.readouterr().err
    table = read_output(out)
    assert table.schema == output_schema()
    rows = {r["path"]: r for r in table.to_pylist()}
    assert len(table) == len(rows) == n_good + len(bad_kinds)
    for name, kind in bad_kinds.items():
        row = rows[f"{root}/bad/{name}"]
        assert row["label"] is None and row["error"].startswith(kind + ": "), row
    good = [r for r in rows.values() if r["error"] is None]
    assert len(good) == n_good
    meta = json.loads(storage.read_text(f"{imagenet_ckpt}/distcls.json"))
    for r in good:
        assert len(r["topk_labels"]) == 3 and r["topk_labels"][0] == r["label"]
        assert r["topk_scores"] == sorted(r["topk_scores"], reverse=True)
        assert r["score"] == pytest.approx(r["topk_scores"][0]) and 0 < r["score"] <= 1
        assert r["model"] == meta["weights_sha256"]
    assert rows[f"{root}/cat.JPG"]["label"] in IMAGENET_CATS
    # A second run adds nothing.
    before = existing_parts(out)
    summary = run_labeling(LabelConfig(checkpoint=imagenet_ckpt, input=root, output=out))
    assert summary["labeled"] == 0 and summary["skipped_done"] == len(rows)
    assert existing_parts(out) == before


def test_partial_output_is_completed_without_duplicates(ray_local, imagenet_ckpt, inputs):
    root, n_good, bad_kinds = inputs
    out = f"{BUCKET}/out2"
    first = run_labeling(LabelConfig(checkpoint=imagenet_ckpt, input=root, output=out, include="good/*"))
    assert first["labeled"] == n_good - 1
    second = run_labeling(LabelConfig(checkpoint=imagenet_ckpt, input=root, output=out))
    assert second["skipped_done"] == n_good - 1
    paths = read_output(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == n_good + len(bad_kinds)


def test_label_agrees_with_the_single_preprocessing_path(ray_local, imagenet_ckpt, inputs):
    """The label job's top-1 equals a direct forward pass of the checkpoint on preprocess_bytes."""
    import torch

    from distcls.checkpoint import load_checkpoint
    from distcls.transforms import preprocess_bytes

    root, _, _ = inputs
    model, meta = load_checkpoint(imagenet_ckpt)
    rows = {r["path"]: r for r in read_output(f"{BUCKET}/out1").to_pylist()}
    for name in ("good/rgb.jpg", "good/cmyk.jpg", "good/palette.png", "cat.JPG"):
        x = torch.from_numpy(preprocess_bytes(storage.read_bytes(f"{root}/{name}"), model.spec))[None]
        with torch.inference_mode():
            probs = model(x).softmax(-1)[0].numpy()
        row = rows[f"{root}/{name}"]
        assert row["label"] == meta["class_names"][int(np.argmax(probs))]
        assert row["score"] == pytest.approx(float(probs.max()), abs=1e-4)


def test_missing_input_is_one_clear_error(ray_local, imagenet_ckpt, capsys):
    assert main(["label", "--checkpoint", imagenet_ckpt, "--input", f"{BUCKET}/nothing-here", "--output", f"{BUCKET}/o"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_killed_run_then_rerun_has_every_object_once(s3_server, imagenet_ckpt, photo, tmp_path):
    """A real interruption: once some parts are committed (not all), SIGKILL the labeling process and the
    local Ray instance it started (its whole session, as when a machine dies); a rerun keeps those parts
    and adds exactly the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, out, n = f"{BUCKET}/many", f"{BUCKET}/killed", 150
    rng = np.random.default_rng(0)
    storage.write_many(
        (
            f"{root}/{i:03d}.jpg",
            encode(Image.fromarray(np.roll(photo, int(rng.integers(0, 300)), axis=1)).resize((96, 64)), "JPEG"),
        )
        for i in range(n)
    )
    cmd = [
        sys.executable,
        "-m",
        "distcls.cli",
        "label",
        "--checkpoint",
        imagenet_ckpt,
        "--input",
        root,
        "--output",
        out,
        "--part-rows",
        "4",
        "--batch-size",
        "4",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not existing_parts(out) and proc.poll() is None:
        time.sleep(0.05)
    kill_session(proc.pid)  # the CLI, its GCS and raylet, and every Ray worker, at once
    assert not session_members(proc.pid), f"processes of session {proc.pid} survived SIGKILL"
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    kept = {p: storage.read_bytes(p) for p in existing_parts(out)}
    partial = len(read_output(out)) if kept else 0
    assert 0 < partial < n, f"the kill came too late or too early: {partial} rows"

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{partial} already labeled, {n - partial} to do" in rerun.stdout, rerun.stdout
    assert {p: storage.read_bytes(p) for p in kept} == kept  # committed parts are kept as they were
    table = read_output(out)
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == n
    assert set(paths) == {f"{root}/{i:03d}.jpg" for i in range(n)}
    assert table.column("error").null_count == n and table.column("label").null_count == 0
    print(f"killed after {partial}/{n} rows in {len(kept)} parts; the rerun labeled {n - partial}")


def test_label_agrees_with_evaluate(ray_local, imagenet_ckpt, inputs, tmp_path):
    from distcls.config import EvaluateConfig
    from distcls.evaluate import run_evaluation

    root, _, _ = inputs
    manifest = tmp_path / "m.csv"
    names = ["rgb.jpg", "grey.png", "cmyk.jpg", "small.webp", "tiny.bmp"]
    manifest.write_text("path,label\n" + "".join(f"{root}/good/{n},tabby\n" for n in names))
    run_evaluation(EvaluateConfig(checkpoint=imagenet_ckpt, data=str(manifest), out=str(tmp_path / "ev")))
    evaluated = pq.read_table(tmp_path / "ev" / "predictions.parquet").to_pylist()
    labeled = {r["path"]: r for r in read_output(f"{BUCKET}/out1").to_pylist()}
    assert len(evaluated) == len(names)
    for row in evaluated:
        assert labeled[row["path"]]["label"] == row["prediction"]
        assert labeled[row["path"]]["score"] == pytest.approx(row["score"], abs=1e-5)


@pytest.mark.slow
def test_two_runs_at_once_still_leave_every_object_once(s3_server, imagenet_ckpt, photo):
    """Two labeling processes started together on one output (as a rerun overlapping a dying run's
    workers): both label everything, and the duplicate rows are removed before they end."""
    import os
    import re
    import subprocess
    import sys

    from distcls.label import done_paths

    root, out, n = f"{BUCKET}/twice", f"{BUCKET}/twice-out", 40
    storage.write_many(
        (f"{root}/{i:02d}.jpg", encode(Image.fromarray(np.roll(photo, 7 * i, axis=1)).resize((96, 64)), "JPEG")) for i in range(n)
    )
    cmd = [
        sys.executable,
        "-m",
        "distcls.cli",
        "label",
        "--checkpoint",
        imagenet_ckpt,
        "--input",
        root,
        "--output",
        out,
        "--part-rows",
        "4",
        "--batch-size",
        "4",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    labeled = [int(re.search(r"objects: labeled (\d+)", o).group(1)) for o in outputs]
    removed = [int(m.group(1)) if (m := re.search(r"removed (\d+) duplicate rows", o)) else 0 for o in outputs]
    print(f"\nconcurrent runs labeled {labeled} of {n} objects and removed {removed} duplicate rows")
    # A run that finds the other's plan under way resumes it and subtracts what is done, so the two need not
    # overlap; when they do, every second copy must go (the repair itself: test_label_resume).
    assert sum(labeled) >= n
    assert sum(removed) == sum(labeled) - n  # every second copy was found and removed, nothing else
    paths = read_output(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == n
    assert done_paths(out) == (set(paths), 0)

"""`distcls label` on the loopback S3 server with real good and bad files."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distcls import storage
from distcls.cli import main
from distcls.config import FromPretrainedConfig, LabelConfig
from distcls.evaluate import checkpoint_from_pretrained
from distcls.label import existing_parts, output_schema, run_labeling
from tests.conftest import encode

BUCKET = "s3://label-test"
IMAGENET_CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def imagenet_ckpt(s3_server):
    uri = f"{BUCKET}/ck/imagenet"
    storage.ensure_bucket(uri)
    checkpoint_from_pretrained(FromPretrainedConfig(out=uri))
    return uri


@pytest.fixture(scope="module")
def inputs(s3_server, good_images, bad_images, photo):
    root = f"{BUCKET}/in"
    items = [(f"{root}/good/{name}", data) for name, data in good_images.items()]
    items += [(f"{root}/bad/{name}", data) for name, (data, _) in bad_images.items()]
    items += [(f"{root}/cat.JPG", encode(Image.fromarray(photo), "JPEG", quality=92)),
              (f"{root}/notes.txt", b"not listed: no image extension")]
    storage.write_many(items)
    return root, len(good_images) + 1, {name: kind for name, (_, kind) in bad_images.items()}


def read_output(uri: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(io.BytesIO(storage.read_bytes(p))) for p in existing_parts(uri))


def test_one_row_per_object_errors_and_rerun(ray_local, imagenet_ckpt, inputs, capsys):
    root, n_good, bad_kinds = inputs
    out = f"{BUCKET}/out1"
    code = main(["label", "--checkpoint", imagenet_ckpt, "--input", root, "--output", out, "--top-k", "3",
                 "--concurrency", "1,2"])
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
    assert main(["label", "--checkpoint", imagenet_ckpt, "--input", f"{BUCKET}/nothing-here",
                 "--output", f"{BUCKET}/o"]) == 2
    assert "does not exist" in capsys.readouterr().err

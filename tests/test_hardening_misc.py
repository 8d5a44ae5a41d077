"""Inputs the jobs were not developed with: class names that matplotlib would read as math text (`evaluate`),
a figure that cannot be drawn, and label outputs with embeddings of two sizes or with NaN/inf (`dedup`)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distcls.cli import main
from tests.conftest import label_rows, make_checkpoint

MATH_NAMES = ["$\\foo$", "a$b$c", "$x^$", "100%_\\n"]  # \foo: an unknown TeX command; x^: a dangling superscript


def test_confusion_matrix_draws_class_names_literally():
    from distcls.evaluate import plot_confusion

    png = plot_confusion(np.eye(4, dtype=np.int64) * 3, MATH_NAMES)
    assert Image.open(io.BytesIO(png)).size[0] > 100


def test_evaluate_with_math_text_class_names_writes_every_file(ray_local, tmp_path, capsys):
    """A real `distcls evaluate` over 8 generated images whose classes are named like TeX."""
    ckpt = make_checkpoint(str(tmp_path / "ckpt"), MATH_NAMES, seed=0)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        rows.append((str(path), MATH_NAMES[i % 4]))
    manifest = tmp_path / "data.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(manifest), "--out", str(out)]) == 0
    assert "not written" not in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["class_names"] == MATH_NAMES and report["num_samples"] == 8
    assert sorted(pq.read_table(out / "predictions.parquet")["label"].to_pylist()) == sorted(r[1] for r in rows)
    for name in ("confusion_matrix.png", "calibration.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_a_figure_that_cannot_be_drawn_costs_no_record(tmp_path, capsys):
    """A reliability record with no bins (the diagram cannot be drawn): report, predictions, markdown and the
    other figure are still written, and the failure is one line."""
    from distcls.evaluate import write_reports
    from distcls.metrics import summarize

    report = summarize(np.array([[2, 0], [1, 1]]), ["a", "b"], top5_hits=4, loss=0.5)
    report.update(
        {
            "calibrated": False,
            "temperature": 1.0,
            **{k: 0.1 for k in ("ece", "nll", "brier", "ece_uncalibrated")},
            "reliability": {"lower": [], "upper": [], "accuracy": [], "confidence": [], "count": []},
            "skipped": 0,
            "checkpoint": "ckpt",
            "data": "data",
            "class_names": ["a", "b"],
        }
    )
    rows = {
        "path": ["p1", "p2", "p3", "p4"],
        "label": ["a", "a", "b", "b"],
        "prediction": ["a", "a", "a", "b"],
        "score": [0.9] * 4,
    }
    write_reports(str(tmp_path), report, rows)
    assert json.loads((tmp_path / "report.json").read_text())["class_names"] == ["a", "b"]
    assert pq.read_table(tmp_path / "predictions.parquet").num_rows == 4
    assert (tmp_path / "report.md").read_text().startswith("# Evaluation report")
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "calibration.png").exists()
    err = capsys.readouterr().err
    assert err.startswith("evaluate: calibration.png not written (IndexError") and err.count("\n") == 1


# --- dedup ------------------------------------------------------------------------------------------------


def write_labels(folder, part: str, paths: list[str], vectors: np.ndarray, model: str, thumbs: list[bytes]) -> None:
    """One part of a `distcls label --embeddings` output, written with the label job's own schema."""
    table = label_rows(
        paths,
        model,
        embedding=pa.array([v.astype(np.float16).tolist() for v in vectors], pa.list_(pa.float16())),
        thumb=pa.array(thumbs, pa.binary(256)),
    )
    folder.mkdir(exist_ok=True)
    pq.write_table(table, folder / f"part-{part}.parquet")


def planted(rng, n: int = 30, d: int = 64):
    """n random embeddings and thumbnails; row 1 a near copy of row 0 (the one pair to find)."""
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    vectors[1] = vectors[0] + 0.01 * rng.standard_normal(d)
    thumbs = [rng.integers(0, 256, 256, dtype=np.uint8).tobytes() for _ in range(n)]
    thumbs[1] = thumbs[0]
    return vectors, thumbs


@pytest.mark.parametrize("method", ["exact", "ivf"])
def test_dedup_leaves_out_nan_and_inf_embeddings_with_a_count(tmp_path, capsys, method):
    rng = np.random.default_rng(0)
    vectors, thumbs = planted(rng)
    vectors[5, 3] = np.nan
    vectors[6, 0] = np.inf
    paths = [f"/nowhere/{i}.png" for i in range(len(vectors))]
    write_labels(tmp_path / "labels", "00000", paths, vectors, "m", thumbs)
    out = tmp_path / f"dedup-{method}"
    assert main(["dedup", "--embeddings", str(tmp_path / "labels"), "--out", str(out), "--method", method]) == 0
    assert "dedup: 2 row(s) of" in capsys.readouterr().out
    pairs = pq.read_table(out / "pairs.parquet").to_pylist()
    assert [(r["a"], r["b"]) for r in pairs] == [(paths[0], paths[1])]
    summary = json.loads((out / "dedup.json").read_text())
    assert summary["images"] == len(paths) - 2 and summary["groups"] == 1


def test_dedup_refuses_embeddings_of_two_sizes_naming_both_models(tmp_path, capsys):
    """A rerun of `distcls label --embeddings` with another model into the same output."""
    rng = np.random.default_rng(1)
    small, thumbs = planted(rng, n=6, d=64)
    big = rng.standard_normal((4, 128)).astype(np.float32)
    labels = tmp_path / "labels"
    write_labels(labels, "00000", [f"/a/{i}.png" for i in range(6)], small, "model-small", thumbs)
    write_labels(labels, "00001", [f"/b/{i}.png" for i in range(4)], big, "model-big", thumbs[:4])
    assert main(["dedup", "--embeddings", str(labels), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "64-d" in err and "128-d" in err
    assert "model-small" in err and "model-big" in err
    assert not (tmp_path / "out").exists()

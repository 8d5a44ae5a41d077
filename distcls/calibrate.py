"""Calibration of a model directory: the step that ends `train` and `distill`, and `distcls calibrate`.

Both run the model over labeled images with the inference engine (Ray Data, the path evaluate and label
take), fit a temperature and the "unknown" threshold on the logits (distcls.scores), and record
`calibration` in distcls.json. After training the record goes into the best checkpoint (its weights and
files untouched); `distcls calibrate` writes a new directory: the model file copied byte for byte and a
distcls.json with the record and `calibrated_from`. A checkpoint's id covers its calibration
(checkpoint.checkpoint_id), so labels and the endpoint name which scores they report.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np

from distcls import DistclsError, storage
from distcls.checkpoint import META, WEIGHTS, checkpoint_id, read_meta
from distcls.config import CalibrateConfig
from distcls.infer import is_export, verify_model
from distcls.infer.labeled import predict_labeled
from distcls.infer.modelfile import export_file_name
from distcls.scores import KEEP_IN_DISTRIBUTION, fit_calibration
from distcls.splits import HELD_OUT_SPLITS, LabeledSplit, open_labeled


def calibration_record(logits: np.ndarray, labels: np.ndarray, data: str, keep: float = KEEP_IN_DISTRIBUTION) -> dict:
    return {
        **fit_calibration(logits, labels, keep),
        "data": data,
        "fitted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def summary_line(record: dict) -> str:
    return (
        f"calibration: temperature {record['temperature']:.3f}; ECE {record['ece_before']:.4f} -> {record['ece_after']:.4f}, "
        f"NLL {record['nll_before']:.4f} -> {record['nll_after']:.4f} on {record['images']} images; unknown above "
        f"energy {record['ood_threshold']:.3f} (keeps {record['ood_keep']:.0%} of them)"
    )


class CalibrationFailed(DistclsError):
    """The end-of-training calibration failed; the checkpoint is complete but uncalibrated."""


def calibrate_best_checkpoint(uri: str, val: LabeledSplit, val_data: str, num_gpus: float = 0) -> dict | None:
    """The end of `train`/`distill`: fit on the validation split, record it in the checkpoint's distcls.json
    (weights untouched); None when there are too few validation images to fit on. Raises CalibrationFailed (one
    line: why, and the command that calibrates the checkpoint later) when it cannot be done."""
    if len(val) < 10:
        print(f"calibration: skipped ({len(val)} validation images; at least 10 are needed)", flush=True)
        return None
    try:
        p = predict_labeled(uri, val, num_gpus=num_gpus)
    except Exception as exc:
        raise CalibrationFailed(
            f"calibration failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the "
            f"checkpoint {uri} is complete but uncalibrated: run `distcls calibrate --checkpoint {uri} --data VAL "
            "--out NEW`, or train with --no-calibrate to skip this step"
        ) from exc
    if len(p.labels) < 10:
        print(f"calibration: skipped ({len(p.labels)} decodable validation images)", flush=True)
        return None
    record = calibration_record(p.logits, p.labels, val_data)
    meta = read_meta(uri)
    storage.write_text(storage.join_uri(uri, META), json.dumps({**meta, "calibration": record}, indent=2, default=str))
    print(summary_line(record), flush=True)
    return record


def data_label(uri: str, data: LabeledSplit) -> str:
    """What a record names as its data: the URI, and the split read of packed data."""
    return f"{uri} ({data.split} split)" if data.split else uri


def model_files(uri: str, meta: dict) -> list[str]:
    """The file(s) that make the model: the export's model file, or the checkpoint's weights (training state
    and other extras are not needed to run it and are not copied)."""
    return [export_file_name(uri, meta)] if is_export(meta) else [WEIGHTS]


def run_calibrate(cfg: CalibrateConfig) -> dict:
    """`distcls calibrate`: a new model directory at cfg.out with the fitted calibration."""
    meta = verify_model(cfg.checkpoint)  # tampered or incomplete: one line, before Ray starts
    if storage.exists(storage.join_uri(cfg.out, META)) and cfg.out.rstrip("/") != cfg.checkpoint.rstrip("/"):
        raise DistclsError(f"calibrate: {cfg.out} already holds a model ({META}); choose a new --out")
    data = open_labeled(cfg.data, meta["class_names"], HELD_OUT_SPLITS)
    p = predict_labeled(cfg.checkpoint, data, cfg.batch_size, cfg.concurrency, cfg.num_gpus, cfg.runtime, "calibrate")
    if len(p.labels) < 10:
        raise DistclsError(
            f"calibrate: {data.source} gave {len(p.labels)} decodable images ({p.skipped.count} skipped); fitting a "
            "temperature needs at least 10 labeled images, a few hundred for a trustworthy one"
        )
    record = calibration_record(p.logits, p.labels, data_label(cfg.data, data), cfg.keep)
    new_meta = {k: v for k, v in meta.items() if k != "files_sha256"}
    new_meta.update({"calibration": record, "calibrated_from": {"model": cfg.checkpoint, "id": checkpoint_id(meta)}})
    storage.ensure_bucket(cfg.out)
    for name in model_files(cfg.checkpoint, meta):
        storage.write_bytes(storage.join_uri(cfg.out, name), storage.read_bytes(storage.join_uri(cfg.checkpoint, name)))
    storage.write_text(storage.join_uri(cfg.out, META), json.dumps(new_meta, indent=2, default=str))
    verify_model(cfg.out)  # the copy is complete and matches its record
    print(summary_line(record))
    print(f"wrote {cfg.out} (model {checkpoint_id(new_meta)[:12]}..., calibrated from {checkpoint_id(meta)[:12]}...)")
    return {"out": cfg.out, "id": checkpoint_id(new_meta), "source_id": checkpoint_id(meta), "calibration": record}

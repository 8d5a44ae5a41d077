"""`distcls distill`: knowledge distillation on the training machinery of `distcls train`.

The student trains exactly as in `distcls train` (Ray Train DDP, per-epoch checkpoints, fault tolerance,
reports); the only differences are the objective and the teacher, both in `train/objectives.py`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from distcls.checkpoint import checkpoint_id
from distcls.config import DistillConfig
from distcls.train.objectives import check_classes, load_teacher


def run_distillation(cfg: DistillConfig) -> dict:
    """Distil as configured; returns the content of result.json (plus the teacher's record)."""
    from distcls.train.trainer import run_training

    _, teacher_meta = load_teacher(cfg.teacher)  # fail here, in one line, before Ray starts
    if cfg.name is None:
        cfg = dataclasses.replace(cfg, name="distill-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    record = {
        "teacher": cfg.teacher,
        "teacher_id": checkpoint_id(teacher_meta),
        "teacher_architecture": teacher_meta["architecture"],
        "teacher_image_size": teacher_meta["preprocessing"]["image_size"],
        "temperature": cfg.temperature,
        "alpha": cfg.alpha,
    }
    print(
        f"teacher: {teacher_meta['architecture']} at {record['teacher_image_size']} px "
        f"(model {record['teacher_id'][:12]}...), T={cfg.temperature}, alpha={cfg.alpha}",
        flush=True,
    )
    result = run_training(
        cfg, extra_meta={"distillation": record}, check_classes=lambda names: check_classes(teacher_meta, names, cfg.teacher)
    )
    return {**result, "distillation": record}

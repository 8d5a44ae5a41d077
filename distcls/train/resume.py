"""What a run resumes from, and whether it may: the newest checkpoint of the run directory whose weights
and training state match the sha256s in its distcls.json, trained on the same class names (in index
order), architecture and preprocessing as the resumed run. No Ray: the driver checks before it starts
Ray Train, and every worker picks the same checkpoint when it (re)starts."""

from __future__ import annotations

import dataclasses
import json

from distcls import DistclsError, storage
from distcls.checkpoint import read_verified_file, read_verified_weights
from distcls.transforms import PreprocessSpec

TRAIN_STATE = "train_state.pt"  # optimizer state + counters; its sha256 is in distcls.json's files_sha256
# Ray Train V2 names a run's checkpoint folders checkpoint_<local time %Y-%m-%d_%H-%M-%S.%f>, so the
# newest sorts last (ray/train/v2/_internal/execution/storage.py, make_default_checkpoint_dir_name).
CHECKPOINT_PREFIX = "checkpoint_"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the checkpoints it registered
# How an image becomes the model's input: what a resumed run must share with its checkpoint. Not compared:
# train-time augmentation (crop_scale, crop_ratio, hflip: the recipe may choose them anew) and decode limits.
SPEC_FIELDS_COMPARED = ("image_size", "resize_size", "mean", "std", "interpolation")


@dataclasses.dataclass(frozen=True)
class Restorable:
    """A verified checkpoint to resume from, and the newer checkpoints that failed verification."""

    uri: str
    meta: dict
    weights: bytes
    train_state: bytes
    skipped: tuple[str, ...] = ()  # one line each: why a newer checkpoint was passed over

    def fallback_line(self, run_uri: str) -> str:
        return (
            f"train: resuming run {run_uri} from {self.uri}, the newest checkpoint that verifies; "
            f"skipped {len(self.skipped)} newer: " + "; ".join(self.skipped)
        )

    def resuming_line(self, next_epoch: int) -> str:
        line = f"resuming from {self.uri} at epoch {next_epoch}"
        if not self.skipped:
            return line
        return line + f"; skipped {len(self.skipped)} newer that do not verify: " + "; ".join(self.skipped)


def list_checkpoints(run_uri: str, latest: str | None = None) -> list[str]:
    """The checkpoint folders of a run directory, newest first; with `latest` (a checkpoint's path or
    name), only that one and those older (Ray Train restores its latest registered one: a newer folder is
    an upload it never registered)."""
    if not storage.exists(run_uri):
        return []
    _, root = storage.split_uri(run_uri)
    names = set()
    for uri in storage.list_files(run_uri):
        rel = storage.split_uri(uri)[1][len(root) :].lstrip("/")
        if "/" in rel and rel.startswith(CHECKPOINT_PREFIX):
            names.add(rel.split("/", 1)[0])
    bound = latest.rstrip("/").rsplit("/", 1)[-1] if latest else None
    return [storage.join_uri(run_uri, name) for name in sorted(names, reverse=True) if not bound or name <= bound]


def latest_registered(run_uri: str) -> str | None:
    """The name of the checkpoint Ray Train will restore on resume (its snapshot's latest); None when
    there is no snapshot or it cannot be read (then every checkpoint folder is a candidate)."""
    uri = storage.join_uri(run_uri, RAY_SNAPSHOT)
    try:
        latest = json.loads(storage.read_text(uri))["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (DistclsError, ValueError, KeyError, TypeError):
        return None
    return latest if isinstance(latest, str) else None


def read_restorable(uri: str) -> tuple[bytes, bytes, dict]:
    """(weights, train state, metadata) of one checkpoint, each verified against distcls.json."""
    weights, meta = read_verified_weights(uri)
    return weights, read_verified_file(uri, TRAIN_STATE, meta), meta


def find_restorable(run_uri: str, latest: str | None = None) -> Restorable | None:
    """The newest checkpoint of the run (`latest` or older, see list_checkpoints) that verifies; None when
    the run has no checkpoint folder. Raises DistclsError when there are checkpoints but none verifies."""
    checkpoints = list_checkpoints(run_uri, latest)
    skipped = []
    for uri in checkpoints:
        try:
            weights, train_state, meta = read_restorable(uri)
        except DistclsError as exc:
            skipped.append(str(exc))
            continue
        return Restorable(uri, meta, weights, train_state, tuple(skipped))
    if not checkpoints:
        return None
    raise DistclsError(
        f"train: cannot resume run {run_uri}: none of its {len(checkpoints)} checkpoints verifies ("
        + "; ".join(skipped)
        + "); restore them from a backup or start a new run with another --name"
    )


def compare_with_checkpoint(meta: dict, class_names: list[str], architecture: str, spec: PreprocessSpec) -> list[str]:
    """What differs between a checkpoint and the run about to resume from it, one phrase each."""
    problems = []
    there = [str(n) for n in meta.get("class_names", [])]
    if there != list(class_names):
        problems.append(f"class names differ from its checkpoint ({first_difference(there, list(class_names))})")
    if meta.get("architecture") != architecture:
        problems.append(f"architecture differs from its checkpoint ({meta.get('architecture')!r} there, {architecture!r} here)")
    spec_changes = spec_differences(meta.get("preprocessing", {}), spec)
    if spec_changes:
        problems.append(f"preprocessing differs from its checkpoint ({spec_changes})")
    return problems


def first_difference(there: list[str], here: list[str]) -> str:
    """'index 3: 'coat' there, 'dress' here' (with the class counts when they differ)."""
    i = next(i for i in range(max(len(there), len(here))) if i >= min(len(there), len(here)) or there[i] != here[i])
    name = lambda names: repr(names[i]) if i < len(names) else "none"  # noqa: E731
    counts = f"{len(there)} classes there, {len(here)} here; " if len(there) != len(here) else ""
    return f"{counts}index {i}: {name(there)} there, {name(here)} here"


def spec_differences(recorded: dict, spec: PreprocessSpec) -> str:
    """'image_size: 64 there, 32 here; ...' for the fields that shape the model input; '' when equal."""
    here = spec.to_dict()
    try:
        there = PreprocessSpec.from_dict(recorded).to_dict()
    except Exception as exc:
        return f"the recorded spec is not valid: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    keys = [k for k in SPEC_FIELDS_COMPARED if normal(there.get(k)) != normal(here.get(k))]
    return "; ".join(f"{k}: {there.get(k)!r} there, {here.get(k)!r} here" for k in keys)


def normal(value):
    """Tuples and lists compare equal, as they do once written to JSON."""
    return json.loads(json.dumps(value))

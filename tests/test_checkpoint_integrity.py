"""Checkpoint integrity: tampered weights are refused by evaluate, label and serve; a pickle payload in a
.pt file is never executed; a checkpoint whose upload was interrupted is never chosen. No Ray needed:
every refusal happens before a job starts Ray."""

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distcls import DistclsError, storage
from distcls.checkpoint import META, WEIGHTS, load_checkpoint, save_checkpoint, verify_checkpoint
from distcls.cli import main
from distcls.models import create_model, read_state_dict
from distcls.train.trainer import pick_best

CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpts")
    request.getfixturevalue("s3_server")
    uri = f"s3://integrity-test/{os.urandom(4).hex()}"
    storage.ensure_bucket(uri)
    return uri


def make_checkpoint(uri: str, accuracy: float = 0.5) -> dict:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", len(CLASSES), "none", image_size=32)
    return save_checkpoint(uri, model.eval(), CLASSES, metrics={"val_accuracy": accuracy})


def tamper(uri: str) -> None:
    """Change one byte of a tensor: still a valid safetensors file, silently different weights."""
    data = bytearray(storage.read_bytes(storage.join_uri(uri, WEIGHTS)))
    data[-100] ^= 0x01
    storage.write_bytes(storage.join_uri(uri, WEIGHTS), bytes(data))


def test_tampered_weights_are_refused_by_every_job(root, tmp_path, capsys):
    ckpt = f"{root}/tampered"
    make_checkpoint(ckpt)
    verify_checkpoint(ckpt)  # intact: accepted
    tamper(ckpt)
    with pytest.raises(DistclsError, match="sha256 .* refusing to load"):
        load_checkpoint(ckpt)
    jobs = {
        "evaluate": ["evaluate", "--checkpoint", ckpt, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "e")],
        "label": ["label", "--checkpoint", ckpt, "--input", str(tmp_path / "data"), "--output", str(tmp_path / "l")],
        "serve": ["serve", "--checkpoint", ckpt, "--port", "1"],
    }
    for job, argv in jobs.items():
        capsys.readouterr()
        assert main(argv) == 2, job
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, (job, err)
        assert err.startswith(f"distcls: error: checkpoint: {ckpt}/{WEIGHTS} has sha256 "), (job, err)
        assert "the weights were changed or damaged, refusing to load" in err
    assert not (tmp_path / "e").exists() and not (tmp_path / "l").exists()  # nothing written


def test_serve_replica_refuses_tampered_weights(tmp_path):
    """The replica's own load (serve deploy / KubeRay, or a checkpoint switch) refuses as well."""
    from distcls.serving import ImageClassifier

    ckpt = str(tmp_path / "ckpt")
    make_checkpoint(ckpt)
    tamper(ckpt)
    replica = ImageClassifier.func_or_class()
    with pytest.raises(DistclsError, match="refusing to load"):
        replica.reconfigure({"checkpoint": ckpt})
    assert replica.loaded is None


class Payload:
    """Unpickling this creates the canary file: what an attacker's .pt would do instead (run a command)."""

    def __init__(self, canary: str):
        self.canary = canary

    def __reduce__(self):
        return (Path.touch, (Path(self.canary),))


def write_malicious_pt(path: Path, canary: Path) -> None:
    state = create_model("efficientnet_lite0", len(CLASSES), "none", image_size=32).net.state_dict()
    torch.save({**state, "extra": Payload(str(canary))}, path)


def test_pickle_payload_in_pt_is_never_executed(tmp_path, capsys):
    evil, canary = tmp_path / "weights.pt", tmp_path / "canary"
    write_malicious_pt(evil, canary)
    # The payload is live: a plain unpickling (in another process) runs it.
    code = f"import sys, torch; sys.path.insert(0, {os.getcwd()!r}); torch.load({str(evil)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert canary.exists(), "the control load did not run the payload; the test would prove nothing"
    canary.unlink()

    with pytest.raises(DistclsError, match=r"is not a plain weights file \(UnpicklingError\)"):
        read_state_dict(str(evil))
    assert main(["checkpoint", "from-pretrained", "--weights", str(evil), "--out", str(tmp_path / "ck")]) == 2
    assert "is not a plain weights file" in capsys.readouterr().err
    assert not canary.exists()


def checkpoint_with_state(run: Path, epoch: int, state: bytes | None = None) -> Path:
    """A checkpoint folder of a run as the training worker writes it: weights, train_state.pt (optimizer
    state and counters, its sha256 in distcls.json) and distcls.json."""
    from distcls.train.worker import TRAIN_STATE

    torch.manual_seed(epoch)
    model = create_model("efficientnet_lite0", len(CLASSES), "none", image_size=32)
    if state is None:
        buf = io.BytesIO()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "epoch": epoch - 1,
                "step": 5 * epoch,
                "history": [{"epoch": e} for e in range(1, epoch + 1)],
            },
            buf,
        )
        state = buf.getvalue()
    ckpt = run / f"checkpoint_2026-01-0{epoch}_00-00-00.000000"
    save_checkpoint(str(ckpt), model.eval(), CLASSES, metrics={"epoch": epoch}, files={TRAIN_STATE: state})
    return ckpt


def fresh_model_and_optimizer():
    model = create_model("efficientnet_lite0", len(CLASSES), "none", image_size=32)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_pickle_payload_in_train_state_is_never_executed(tmp_path):
    """Resuming training reads train_state.pt (optimizer state) from the checkpoint. A payload whose sha256
    does not match distcls.json is refused before it is read; one whose sha256 was rewritten as well (by
    whoever can write the bucket) meets torch.load(weights_only=True), which refuses it: it never runs."""
    from distcls.train.worker import TRAIN_STATE, restore

    canary = tmp_path / "canary"
    buf = io.BytesIO()
    torch.save({"optimizer": Payload(str(canary)), "epoch": 0, "step": 5, "history": []}, buf)
    swapped = checkpoint_with_state(tmp_path / "swapped", 1)
    (swapped / TRAIN_STATE).write_bytes(buf.getvalue())
    with pytest.raises(DistclsError, match=r"train_state.pt has sha256 .* was changed or damaged"):
        restore(*fresh_model_and_optimizer(), str(tmp_path / "swapped"))
    checkpoint_with_state(tmp_path / "rehashed", 1, state=buf.getvalue())
    with pytest.raises(pickle.UnpicklingError):
        restore(*fresh_model_and_optimizer(), str(tmp_path / "rehashed"))
    assert not canary.exists()


def test_restore_refuses_tampered_weights(tmp_path):
    from distcls.train.worker import restore

    run = tmp_path / "run"
    ckpt = checkpoint_with_state(run, 1)
    r = restore(*fresh_model_and_optimizer(), str(run))
    assert (r.epoch, r.step) == (1, 5)
    tamper(str(ckpt))
    with pytest.raises(DistclsError, match=r"cannot resume run .* none of its 1 checkpoints verifies \(.*refusing"):
        restore(*fresh_model_and_optimizer(), str(run))


def test_train_state_sha256_is_recorded_and_checked(root):
    from distcls.checkpoint import read_verified_file

    ckpt = f"{root}/with-state"
    meta = save_checkpoint(
        ckpt,
        create_model("efficientnet_lite0", len(CLASSES), "none", image_size=32).eval(),
        CLASSES,
        files={"train_state.pt": b"optimizer state"},
    )
    assert meta["files_sha256"] == {"train_state.pt": hashlib.sha256(b"optimizer state").hexdigest()}
    assert json.loads(storage.read_text(f"{ckpt}/{META}"))["files_sha256"] == meta["files_sha256"]
    assert read_verified_file(ckpt, "train_state.pt") == b"optimizer state"
    assert verify_checkpoint(ckpt, files=("train_state.pt",)) == meta

    storage.write_bytes(f"{ckpt}/train_state.pt", b"optimizer statf")  # one bit flipped
    with pytest.raises(
        DistclsError,
        match=r"^checkpoint: .*/train_state.pt has sha256 [0-9a-f]{12}\.\.\., but "
        r"distcls.json records [0-9a-f]{12}\.\.\.; train_state.pt was changed",
    ):
        read_verified_file(ckpt, "train_state.pt")
    storage.remove(f"{ckpt}/train_state.pt")
    with pytest.raises(DistclsError, match="has no train_state.pt; it is not a \\(complete\\)"):
        verify_checkpoint(ckpt, files=("train_state.pt",))
    make_checkpoint(f"{root}/older")  # a checkpoint that records no sha256 for it is refused, not trusted
    storage.write_bytes(f"{root}/older/train_state.pt", b"optimizer state")
    with pytest.raises(DistclsError, match="records no sha256 for train_state.pt; refusing to load it"):
        read_verified_file(f"{root}/older", "train_state.pt")


def test_restore_falls_back_to_newest_checkpoint_that_verifies(tmp_path, capsys):
    """A restart (after a failure, or --resume) whose latest checkpoint was damaged resumes from the newest
    one that verifies, weights and training state both, and says so in one line."""
    from distcls.train.resume import RAY_SNAPSHOT, find_restorable, latest_registered, list_checkpoints
    from distcls.train.worker import TRAIN_STATE, restore

    run = tmp_path / "run"
    ckpts = [checkpoint_with_state(run, epoch) for epoch in (1, 2, 3)]
    (run / "result.json").write_text("{}")
    assert list_checkpoints(str(run)) == [str(c) for c in reversed(ckpts)]
    r = restore(*fresh_model_and_optimizer(), str(run))
    assert (r.epoch, r.step, r.history) == (3, 15, [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}])
    assert capsys.readouterr().out == f"resuming from {ckpts[2]} at epoch 4\n"

    tamper(str(ckpts[2]))  # the latest: weights flipped
    state = bytearray((ckpts[1] / TRAIN_STATE).read_bytes())
    state[len(state) // 2] ^= 0x10  # the one before: its training state flipped
    (ckpts[1] / TRAIN_STATE).write_bytes(bytes(state))
    model, optimizer = fresh_model_and_optimizer()
    r = restore(model, optimizer, str(run), announce=True)
    assert (r.epoch, r.step, r.history) == (1, 5, [{"epoch": 1}])
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1, out
    assert out.startswith(
        f"resuming from {ckpts[0]} at epoch 2; skipped 2 newer that do not verify: checkpoint: {ckpts[2]}/{WEIGHTS} has sha256 "
    ), out
    assert f"checkpoint: {ckpts[1]}/{TRAIN_STATE} has sha256 " in out
    # Ray Train's latest (registered) checkpoint bounds the search: a newer folder is an unregistered upload.
    restore(*fresh_model_and_optimizer(), str(run), latest=str(ckpts[1]))
    assert capsys.readouterr().out.startswith(f"resuming from {ckpts[0]} at epoch 2; skipped 1 newer ")
    assert latest_registered(str(run)) is None  # no snapshot: every folder is a candidate
    (run / RAY_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": ckpts[0].name}}))
    assert latest_registered(str(run)) == ckpts[0].name
    assert list_checkpoints(str(run), latest_registered(str(run))) == [str(ckpts[0])]
    torch.manual_seed(1)
    expected = create_model("efficientnet_lite0", len(CLASSES), "none", image_size=32).net.state_dict()
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in expected.items())  # epoch 1's weights
    assert find_restorable(str(tmp_path / "no-run")) is None


def interrupted_uploads(root: str) -> dict[str, str]:
    """Checkpoint directories as an interrupted upload leaves them, each claiming the best score."""
    full = f"{root}/complete-but-cut"
    make_checkpoint(full, accuracy=0.99)
    weights = storage.read_bytes(f"{full}/{WEIGHTS}")
    storage.write_bytes(f"{full}/{WEIGHTS}", weights[: len(weights) // 2])  # the weights upload was cut short
    no_meta = f"{root}/no-meta"
    make_checkpoint(no_meta, accuracy=0.99)
    storage.remove(f"{no_meta}/{META}")  # distcls.json (written last) never arrived
    no_weights = f"{root}/no-weights"
    make_checkpoint(no_weights, accuracy=0.99)
    storage.remove(f"{no_weights}/{WEIGHTS}")  # uploaded in another order: the weights never arrived
    return {"truncated weights": full, "no distcls.json": no_meta, "no weights": no_weights}


def test_interrupted_upload_is_never_chosen_as_best(root, capsys):
    good = f"{root}/good"
    make_checkpoint(good, accuracy=0.4)
    broken = interrupted_uploads(root)
    for uri in broken.values():
        with pytest.raises(DistclsError, match="not a \\(complete\\) distcls checkpoint|refusing to load"):
            verify_checkpoint(uri)
    candidates = [(uri, {"val_accuracy": 0.99}) for uri in broken.values()] + [(good, {"val_accuracy": 0.4})]
    assert pick_best(candidates) == (good, {"val_accuracy": 0.4})
    assert capsys.readouterr().out.count("warning: skipping checkpoint") == 3
    with pytest.raises(DistclsError, match="no complete checkpoint"):
        pick_best(candidates[:3])
    for job in ("evaluate", "label"):
        argv = [job, "--checkpoint", broken["no distcls.json"]]
        argv += ["--data", good, "--out", f"{root}/x"] if job == "evaluate" else ["--input", good, "--output", f"{root}/x"]
        assert main(argv) == 2
        assert "is not a (complete) distcls checkpoint" in capsys.readouterr().err
    assert json.loads(storage.read_text(f"{good}/{META}"))["metrics"]["val_accuracy"] == 0.4

"""Checkpoint integrity: tampered weights are refused by evaluate, label and serve; a pickle payload in a
.pt file is never executed; a checkpoint whose upload was interrupted is never chosen. No Ray needed:
every refusal happens before a job starts Ray."""

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


def test_pickle_payload_in_train_state_is_never_executed(tmp_path):
    """Resuming training reads train_state.pt (optimizer state) from the checkpoint: weights_only, so a
    payload there is refused and never runs."""
    import ray.train

    from distcls.train.worker import TRAIN_STATE, restore

    ckpt, canary = tmp_path / "ckpt", tmp_path / "canary"
    make_checkpoint(str(ckpt))
    torch.save({"optimizer": Payload(str(canary)), "epoch": 0, "step": 5, "history": []}, ckpt / TRAIN_STATE)
    model = create_model("efficientnet_lite0", len(CLASSES), "none", image_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(pickle.UnpicklingError):
        restore(model, optimizer, ray.train.Checkpoint.from_directory(str(ckpt)))
    assert not canary.exists()


def test_restore_refuses_tampered_weights(tmp_path):
    import ray.train

    from distcls.train.worker import TRAIN_STATE, restore

    ckpt = tmp_path / "ckpt"
    make_checkpoint(str(ckpt))
    model = create_model("efficientnet_lite0", len(CLASSES), "none", image_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save({"optimizer": optimizer.state_dict(), "epoch": 0, "step": 5, "history": []}, ckpt / TRAIN_STATE)
    assert restore(model, optimizer, ray.train.Checkpoint.from_directory(str(ckpt)))[:2] == (1, 5)
    tamper(str(ckpt))
    with pytest.raises(DistclsError, match="refusing to load"):
        restore(model, optimizer, ray.train.Checkpoint.from_directory(str(ckpt)))


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
    for what, uri in broken.items():
        with pytest.raises(DistclsError, match="not a \\(complete\\) distcls checkpoint|refusing to load"):
            verify_checkpoint(uri)
    candidates = [(uri, {"val_accuracy": 0.99}) for uri in broken.values()] + [(good, {"val_accuracy": 0.4})]
    assert pick_best(candidates) == (good, {"val_accuracy": 0.4})
    assert capsys.readouterr().out.count("warning: skipping checkpoint") == 3
    with pytest.raises(DistclsError, match="no complete checkpoint"):
        pick_best(candidates[:3])
    for job in ("evaluate", "label"):
        argv = [job, "--checkpoint", broken["no distcls.json"]]
        argv += ["--data", good, "--out", f"{root}/x"] if job == "evaluate" else ["--input", good, "--output",
                                                                                  f"{root}/x"]
        assert main(argv) == 2
        assert "is not a (complete) distcls checkpoint" in capsys.readouterr().err
    assert json.loads(storage.read_text(f"{good}/{META}"))["metrics"]["val_accuracy"] == 0.4

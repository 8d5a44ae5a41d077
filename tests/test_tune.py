"""`distcls tune`: a real Ray Tune search (ASHA) over tiny `distcls train` runs, interrupted by a worker
failure and resumed, then souped."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from distcls import DistclsError
from distcls.checkpoint import read_meta, verify_checkpoint
from distcls.config import ConfigError, TuneConfig
from tests.conftest import tiny_fashion_mnist


def tune_config(fm: dict, storage: str, **kw) -> TuneConfig:
    base = dict(
        data=fm["train"],
        val_data=fm["val"],
        image_size=32,
        batch_size=8,
        trials=2,
        epochs=(2,),
        augment=("none", "flip"),
        mixup=(0.0,),
        grace_period=1,
        storage=storage,
        name="search",
        soup=True,
        soup_top=2,
    )
    return TuneConfig(**{**base, **kw})


@pytest.mark.slow  # ~95 s: in `make test-all` (CI's 30-minute budget)
def test_tune_runs_asha_trials_resumes_them_and_soups(ray_local, tmp_path, monkeypatch, capsys):
    from distcls.train.tune import run_tune

    fm = tiny_fashion_mnist(str(tmp_path / "data"))
    runs = str(tmp_path / "runs")
    # Every trial's run fails once in its second epoch (after its first checkpoint): the search ends with errors.
    monkeypatch.setenv("DISTCLS_TEST_FAULT", "12")
    first = run_tune(tune_config(fm, runs))
    statuses = [r["status"] for r in first["trials"]]
    # The trial that reaches the first rung (1 epoch) second is stopped there by ASHA if it is the worse one.
    assert "error" in statuses and set(statuses) <= {"error", "stopped early (ASHA)"}
    assert all(r["epochs_run"] == 1 and r["checkpoint"] for r in first["trials"])
    monkeypatch.delenv("DISTCLS_TEST_FAULT")

    with pytest.raises(DistclsError, match="already exists; pass --resume"):
        run_tune(tune_config(fm, runs))
    capsys.readouterr()
    resumed = run_tune(tune_config(fm, runs, resume=True, trust_tune_state=True))
    rows = resumed["trials"]
    before = {r["trial"]: r["status"] for r in first["trials"]}
    assert {r["trial"] for r in rows} == set(before)  # the same trials, continued
    for r in rows:  # a failed trial resumes from its checkpoint and finishes; one ASHA stopped stays stopped
        if before[r["trial"]] == "error":
            assert (r["status"], r["epochs_run"]) == ("completed", 2)
        else:
            assert (r["status"], r["epochs_run"]) == ("stopped early (ASHA)", 1)
    printed = capsys.readouterr()
    assert "resuming from" in printed.out
    # the loaded pickles are announced on stderr, once, naming the folder
    assert printed.err.count("WARNING: --trust-tune-state") == 1 and str(tmp_path / "runs" / "search") in printed.err

    search = tmp_path / "runs" / "search"
    table = pq.read_table(search / "results.parquet").to_pylist()
    assert [t["trial"] for t in table] == [r["trial"] for r in rows]
    assert set(table[0]) >= {"lr", "weight_decay", "backbone_lr_scale", "augment", "mixup", "epochs", "best_val_accuracy"}
    assert (search / "results.md").read_text().count("\n") == 4
    assert (search / "trials.png").read_bytes()[:4] == b"\x89PNG"
    best = json.loads((search / "best.json").read_text())
    assert best["val_accuracy"] == max(r["best_val_accuracy"] for r in rows)
    assert best["params"]["augment"] in ("none", "flip") and 3e-4 <= best["params"]["lr"] <= 3e-3
    verify_checkpoint(best["checkpoint"])
    assert best["checkpoint"].startswith(str(search / "trials" / best["trial"]))

    soup = resumed["soup"]
    assert soup["checkpoint"] == str(search / "soup")
    assert soup["val_accuracy"] >= max(r["best_val_accuracy"] for r in rows) - 1e-9  # greedy starts from the best
    assert read_meta(soup["checkpoint"])["soup"]["method"] == "greedy"


def test_tune_config_refusals(tmp_path):
    with pytest.raises(ConfigError, match="--lr '0.01,0.001'"):
        TuneConfig(data="x", lr=(0.01, 0.001))
    with pytest.raises(ConfigError, match="--augment 'none,mixup'"):
        TuneConfig(data="x", augment=("none", "mixup"))
    with pytest.raises(ConfigError, match="--grace-period 4"):
        TuneConfig(data="x", epochs=(2, 3), grace_period=4)
    with pytest.raises(ConfigError, match="--resume True: needs --name"):
        TuneConfig(data="x", resume=True)
    from distcls.train.tune import run_tune

    with pytest.raises(DistclsError, match="nothing to resume"):
        run_tune(TuneConfig(data=str(tmp_path), storage=str(tmp_path / "runs"), name="none", resume=True, trust_tune_state=True))


def test_without_val_data_trials_train_and_are_scored_on_two_disjoint_parts(tmp_path):
    from distcls.datasets import load_labeled_index
    from distcls.train.tune import base_train_config, split_manifests

    fm = tiny_fashion_mnist(str(tmp_path / "data"))
    cfg = TuneConfig(data=fm["train"], storage=str(tmp_path / "runs"), name="s")
    train_csv, val_csv = split_manifests(cfg, str(tmp_path / "runs" / "s"))
    base = base_train_config(cfg, train_csv, val_csv)
    train, val = load_labeled_index(base["data"]), load_labeled_index(base["val_data"])
    assert not set(train.paths) & set(val.paths)
    assert sorted(train.paths + val.paths) == sorted(load_labeled_index(fm["train"]).paths)
    assert train.class_names == val.class_names and len(val) == 10  # 10% of 80, stratified: one per class

"""Config loading (YAML + flags), validation messages, and the console script's surface."""

import subprocess
import sys

import pytest

from distcls import DistclsError
from distcls.cli import build_parser, main
from distcls.config import load_config
from distcls.tools.config import FashionMnistConfig, S3ServerConfig


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distcls.cli", *args], capture_output=True, text=True, timeout=120)


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "fm.yaml"
    path.write_text("out: s3://bucket/a\nlimit-per-class: 5\nworkers: 4\n")
    cfg = load_config(FashionMnistConfig, str(path), {"limit_per_class": 7, "workers": None})
    assert cfg == FashionMnistConfig(out="s3://bucket/a", limit_per_class=7, workers=4)


def test_unknown_yaml_key_lists_valid_ones(tmp_path):
    path = tmp_path / "fm.yaml"
    path.write_text("out: x\nlimit_per_clas: 5\n")
    with pytest.raises(DistclsError, match=r"unknown option\(s\) limit_per_clas in .*; valid ones: limit_per_class, out"):
        load_config(FashionMnistConfig, str(path))


def test_wrong_type_names_flag_and_value():
    with pytest.raises(DistclsError, match=r"--port 'eighty': expected int"):
        load_config(S3ServerConfig, None, {"port": "eighty"})


def test_all_problems_in_one_message():
    with pytest.raises(DistclsError) as info:
        FashionMnistConfig(out="", limit_per_class=0, workers=0)
    text = str(info.value)
    assert text.count(";") >= 2
    for piece in ("--out ''", "--limit-per-class 0", "--workers 0"):
        assert piece in text


def test_missing_required_option():
    with pytest.raises(DistclsError, match="missing required option.*--out"):
        load_config(FashionMnistConfig, None, {})


def test_bad_yaml_file_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("out: [unclosed\n")
    with pytest.raises(DistclsError) as info:
        load_config(FashionMnistConfig, str(path))
    assert "is not valid YAML" in str(info.value) and "\n" not in str(info.value)


def test_help_lists_subcommands_and_every_subcommand_has_help():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("data", "s3-server"):
        assert name in result.stdout
    parser = build_parser()
    sub_actions = [a for a in parser._subparsers._group_actions]
    for name, sub in sub_actions[0].choices.items():
        with pytest.raises(SystemExit) as exit_info:
            sub.parse_args(["--help"])
        assert exit_info.value.code == 0, name


def test_user_error_is_one_line_and_non_zero(capsys):
    code = main(["data", "fashion-mnist", "--out", "/tmp/x", "--limit-per-class", "-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("distcls: error: ") and err.count("\n") == 1
    assert "--limit-per-class -1" in err


def test_tune_resume_needs_trust_tune_state(capsys):
    """Resuming unpickles Ray Tune's state (tuner.pkl...): only when the folder is declared trusted."""
    from distcls.config import ConfigError, TuneConfig

    with pytest.raises(ConfigError, match="--resume True: unpickles .*give --trust-tune-state"):
        TuneConfig(data="x", name="search", resume=True)
    assert TuneConfig(data="x", name="search", resume=True, trust_tune_state=True).trust_tune_state
    assert main(["tune", "--data", "x", "--name", "search", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distcls: error: tune: ") and err.count("\n") == 1 and "--trust-tune-state" in err


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("name", ["..", ".", "a/b", "../up", "a\\b", "", "a b", "x" * 201])
def test_run_name_is_one_safe_path_segment(command, name, capsys):
    """--name becomes a folder under --storage: never `..`, `.`, a path or an odd character."""
    from distcls.config import ConfigError, TrainConfig, TuneConfig

    cls = {"train": TrainConfig, "tune": TuneConfig}[command]
    with pytest.raises(ConfigError, match="--name .*: must be one path segment"):
        cls(data="x", name=name)
    if not name:
        return  # on the command line an empty --name is no name: the run gets a dated one
    assert main([command, "--data", "x", "--name", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--name" in err and "one path segment" in err


@pytest.mark.parametrize("command", ["train", "tune"])
def test_run_name_accepts_letters_digits_dot_dash_underscore(command):
    from distcls.config import TrainConfig, TuneConfig

    assert {"train": TrainConfig, "tune": TuneConfig}[command](data="x", name="run-1.2_x").name == "run-1.2_x"


def test_calibrate_out_must_not_be_the_checkpoint(tmp_path, capsys):
    """Calibrating in place would drop the record of train_state.pt's sha256, and the run could no longer
    resume from that checkpoint: refused before anything is read, the checkpoint left as it was."""
    from distcls.config import CalibrateConfig, ConfigError
    from tests.conftest import make_checkpoint

    ckpt = make_checkpoint(str(tmp_path / "ckpt"), 3)
    for out in (ckpt, ckpt + "/"):
        with pytest.raises(ConfigError, match="--out .*: must be a new directory, not --checkpoint"):
            CalibrateConfig(checkpoint=ckpt, data="x", out=out)
    record = (tmp_path / "ckpt" / "distcls.json").read_bytes()
    assert main(["calibrate", "--checkpoint", ckpt, "--data", str(tmp_path / "val"), "--out", ckpt]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distcls: error: calibrate: ") and err.count("\n") == 1 and "not --checkpoint" in err
    assert (tmp_path / "ckpt" / "distcls.json").read_bytes() == record

"""Config loading (YAML + flags), validation messages, and the console script's surface."""

import subprocess
import sys

import pytest

from distcls import DistclsError
from distcls.cli import build_parser, main
from distcls.config import FashionMnistConfig, S3ServerConfig, load_config


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

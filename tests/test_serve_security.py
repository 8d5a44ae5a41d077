"""Safe defaults around the endpoint and Ray: no open endpoint by accident, no credentials in Ray's runtime
env, and a SIGTERM that stops everything a command started."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from distcls import DistclsError
from distcls.cli import main
from distcls.config import ServeConfig
from distcls.serving import (
    TOKEN_ENV,
    RequestError,
    application,
    build_app,
    check_auth,
    check_host,
    env_token,
    host_names,
    host_of,
    is_loopback,
    serve_config,
    token_digest,
)
from distcls.tools.s3server import free_port
from tests.conftest import encode, make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DISTCLS = str(Path(sys.executable).with_name("distcls"))
TOKEN = "security-test-token-0123456789"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A 3-class EfficientNet-Lite0 at 32 px in a local directory (loads in a second)."""
    path = str(tmp_path_factory.mktemp("ck") / "tiny")
    return make_checkpoint(path, ["a", "b", "c"])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without a cluster address or an API token, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", TOKEN_ENV)}
    return {**env, **extra}


def run_cli(argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """A command in its own process group; on a timeout the whole group is killed (and the test fails)."""
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{argv[:3]} still running after {timeout:.0f}s (it should have refused at once): {err[-2000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# --- item 7: no open endpoint by accident -----------------------------------------------------------------


@pytest.mark.parametrize(
    "host,loopback",
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("serve.example.com", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_check_auth_refuses_an_open_public_endpoint(capsys):
    public = ServeConfig(checkpoint="x", host="0.0.0.0")
    with pytest.raises(DistclsError) as err:
        check_auth(public, None)
    message = str(err.value)
    assert "\n" not in message and "0.0.0.0" in message and TOKEN_ENV in message and "--no-auth" in message
    assert check_auth(public, TOKEN) == token_digest(TOKEN)
    assert check_auth(ServeConfig(checkpoint="x"), None) is None  # loopback: open is fine, and silent
    assert capsys.readouterr().err == ""
    assert check_auth(ServeConfig(checkpoint="x", host="0.0.0.0", no_auth=True), None) is None
    (warning,) = capsys.readouterr().err.splitlines()
    assert "WARNING" in warning and "NO AUTHENTICATION" in warning and "0.0.0.0:8000" in warning
    with pytest.raises(DistclsError, match="--no-auth is given but DISTCLS_API_TOKEN is set"):
        check_auth(ServeConfig(checkpoint="x", host="0.0.0.0", no_auth=True), TOKEN)


def test_declarative_app_refuses_without_token_on_a_public_host(monkeypatch, capsys):
    """`serve deploy` / a RayService build the app with build_app, on the cluster: same rule, from `args`."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    args = serve_config(ServeConfig(checkpoint="s3://models/ck", host="0.0.0.0"))["applications"][0]["args"]
    assert args["host"] == "0.0.0.0" and args["no_auth"] is False
    with pytest.raises(DistclsError, match=TOKEN_ENV):
        build_app(args)
    no_host = {k: v for k, v in args.items() if k != "host"}  # a hand-written config: counts as public
    with pytest.raises(DistclsError, match=TOKEN_ENV):
        build_app(no_host)
    assert type(build_app({**args, "host": "127.0.0.1"})).__name__ == "Application"
    assert type(build_app({**args, "no_auth": True})).__name__ == "Application"
    assert "NO AUTHENTICATION" in capsys.readouterr().err
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert type(build_app(args)).__name__ == "Application"


def test_serve_config_warns_about_no_auth(capsys):
    assert main(["serve-config", "--checkpoint", "s3://m/ck", "--host", "0.0.0.0", "--no-auth"]) == 0
    out, err = capsys.readouterr()
    assert "no_auth: true" in out and "refuses to start without it" in out
    (line,) = err.splitlines()
    assert "NO AUTHENTICATION" in line
    assert main(["serve-config", "--checkpoint", "s3://m/ck", "--host", "0.0.0.0"]) == 0
    assert capsys.readouterr().err == ""


def test_serve_on_a_public_host_without_token_refuses_before_starting(tiny_checkpoint):
    """`distcls serve --host 0.0.0.0` and the documented job (`jobs/serve.py` with jobs/configs/serve.yaml,
    host 0.0.0.0, inside a cluster where RAY_ADDRESS is set): exit 2, one line, nothing started."""
    out = run_cli(
        [DISTCLS, "serve", "--checkpoint", tiny_checkpoint, "--host", "0.0.0.0", "--port", str(free_port())], clean_env()
    )
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("distcls: error: serve: --host 0.0.0.0 is reachable") and TOKEN_ENV in line
    assert "--no-auth" in line and out.stdout == ""
    job = run_cli(
        [sys.executable, "jobs/serve.py", "--config", "jobs/configs/serve.yaml", "--checkpoint", tiny_checkpoint],
        clean_env(RAY_ADDRESS="127.0.0.1:9"),
    )  # nothing there: never contacted
    assert job.returncode == 2, job.stderr[-2000:]
    (line,) = job.stderr.strip().splitlines()
    assert "--host 0.0.0.0 is reachable" in line and TOKEN_ENV in line


# --- issue 28 (7, 13, 15): calibration bounds, no NaN in JSON, Host check, /v1/model, token whitespace ---------

PRIVATE_DATA = "s3://private-validation-bucket/val"
CALIBRATION = {
    "temperature": 1.5,
    "ece_before": 0.2,
    "ece_after": 0.05,
    "ood_score": "energy",
    "ood_threshold": -3.0,
    "ood_keep": 0.95,
    "images": 40,
    "data": PRIVATE_DATA,
}


@pytest.fixture(scope="module")
def broken_checkpoint(tmp_path_factory) -> str:
    """A calibrated 3-class Lite0 whose head gives class `a` an infinite logit: every score is NaN."""
    import torch

    from distcls.checkpoint import save_checkpoint
    from distcls.models import create_model

    model = create_model("efficientnet_lite0", 3, "none", image_size=32).eval()
    with torch.no_grad():
        model.net._fc.bias[0] = float("inf")
    path = str(tmp_path_factory.mktemp("ck") / "broken")
    save_checkpoint(path, model, ["a", "b", "c"], extra={"calibration": CALIBRATION})
    return path


@pytest.fixture(scope="module")
def cat_jpeg(photo) -> bytes:
    from PIL import Image

    return encode(Image.fromarray(photo), "JPEG", quality=92)


@pytest.fixture(scope="module")
def guarded_apps(ray_local, broken_checkpoint):
    """Three apps on one Serve instance: loopback without a token (Host checked), the same with --allowed-hosts
    evil.example, and one whose token comes from DISTCLS_API_TOKEN="secret \\n" (no Host check)."""
    from ray import serve

    port = free_port()
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    common = dict(checkpoint=broken_checkpoint, port=port, max_replicas=1, cpus_per_replica=0.25, runtime="torch")
    serve.run(application(ServeConfig(**common)), name="loopback", route_prefix="/loopback", logging_config=quiet)
    allowed = ServeConfig(**common, allowed_hosts=("evil.example",))
    serve.run(application(allowed), name="allowed", route_prefix="/allowed", logging_config=quiet)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TOKEN_ENV, "secret \n")  # a Secret file's final newline
        keyed = ServeConfig(**common)
        serve.run(application(keyed, check_auth(keyed, env_token())), name="keyed", route_prefix="/keyed", logging_config=quiet)
    yield port
    serve.shutdown()


def test_host_names_and_host_header_parsing():
    assert [host_of(h) for h in ("evil.example:8000", "[::1]:8000", "[::1]", "::1", "LocalHost.", "127.0.0.1")] == [
        "evil.example",
        "::1",
        "::1",
        "::1",
        "localhost",
        "127.0.0.1",
    ]
    loopback = host_names(ServeConfig(checkpoint="x"), None)
    for ok in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost", None, ""):
        check_host(ok, loopback)
    with pytest.raises(RequestError, match="--allowed-hosts evil.example") as err:
        check_host("evil.example:8000", loopback)
    assert err.value.status == 403 and "\n" not in err.value.message
    check_host("evil.example:8000", host_names(ServeConfig(checkpoint="x", allowed_hosts=("Evil.Example:80",)), None))
    assert host_names(ServeConfig(checkpoint="x"), token_digest(TOKEN)) is None  # a token: no Host check
    assert host_names(ServeConfig(checkpoint="x"), None, declarative=True) is None  # serve deploy / a RayService
    assert host_names(ServeConfig(checkpoint="x", host="0.0.0.0", no_auth=True), None) is None
    given = host_names(ServeConfig(checkpoint="x", host="0.0.0.0", allowed_hosts=("api.example",)), token_digest(TOKEN))
    assert given == ("api.example", "localhost")  # given: checked even with a token (the wildcard bind is no name)


def test_subnormal_temperature_is_refused_before_serving(tiny_checkpoint, tmp_path):
    """Temperature 1e-310 passed validation and gave NaN scores (first class for every row, a 500): refused at
    load, one line naming the file, nothing started."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    meta = json.loads((bad / "distcls.json").read_text())
    (bad / "distcls.json").write_text(json.dumps({**meta, "calibration": {**CALIBRATION, "temperature": 1e-310}}))
    out = run_cli([DISTCLS, "serve", "--checkpoint", str(bad), "--port", str(free_port())], clean_env(), 90)
    assert out.returncode == 2 and out.stdout == "", out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()
    assert str(bad / "distcls.json") in line and "temperature 1e-310" in line and "outside [0.001, 1000]" in line


def test_nan_scores_are_a_json_500_naming_the_model(guarded_apps, broken_checkpoint, cat_jpeg):
    """A model whose logits are infinite: 500 with a JSON error naming the model (its id), never NaN in JSON."""
    from distcls.checkpoint import checkpoint_id, read_meta

    r = requests.post(
        f"http://127.0.0.1:{guarded_apps}/loopback/v1/classify", data=cat_jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert r.status_code == 500, r.text
    error = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON body: {r.text}"))["error"]
    model_id = checkpoint_id(read_meta(broken_checkpoint))
    assert error["kind"] == "non_finite_output" and error["model"]["id"] == model_id and model_id[:12] in error["message"]


def test_model_info_has_calibration_numbers_only(guarded_apps):
    r = requests.get(f"http://127.0.0.1:{guarded_apps}/loopback/v1/model", timeout=30)
    assert r.status_code == 200, r.text
    calibration = r.json()["calibration"]
    assert calibration == {k: v for k, v in CALIBRATION.items() if k not in ("data", "ood_score")}
    assert "private-validation-bucket" not in r.text and "s3://" not in r.text


def get_model(port: int, app: str, host: str, **headers) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{port}/{app}/v1/model", headers={"Host": host, **headers}, timeout=30)


def test_dns_rebinding_host_is_refused_on_an_open_loopback_endpoint(guarded_apps):
    port = guarded_apps
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert get_model(port, "loopback", host).status_code == 200, host
    r = get_model(port, "loopback", "evil.example:8000")
    assert r.status_code == 403 and len(r.text.splitlines()) == 1
    error = r.json()["error"]
    assert error["kind"] == "host_not_allowed" and "'evil.example'" in error["message"]
    assert "--allowed-hosts evil.example" in error["message"]
    assert get_model(port, "allowed", "evil.example:8000").status_code == 200  # --allowed-hosts evil.example
    assert get_model(port, "allowed", "other.example:8000").status_code == 403
    assert get_model(port, "allowed", f"localhost:{port}").status_code == 200


def test_token_with_trailing_whitespace_and_no_host_check(guarded_apps):
    """DISTCLS_API_TOKEN="secret \\n": a client sending `Bearer secret` gets in (both sides stripped alike), and
    with a token the Host is not checked."""
    port = guarded_apps
    assert get_model(port, "keyed", "evil.example:8000", Authorization="Bearer secret").status_code == 200
    assert get_model(port, "keyed", f"127.0.0.1:{port}", Authorization="Bearer secret \t").status_code == 200
    assert get_model(port, "keyed", f"127.0.0.1:{port}").status_code == 401
    assert get_model(port, "keyed", f"127.0.0.1:{port}", Authorization="Bearer secre").status_code == 401


def test_blank_token_is_refused_at_start(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, " \t\n")
    args = serve_config(ServeConfig(checkpoint="s3://models/ck", host="0.0.0.0"))["applications"][0]["args"]
    with pytest.raises(DistclsError, match="set but empty"):
        build_app(args)
    with pytest.raises(DistclsError, match="only whitespace"):
        check_auth(ServeConfig(checkpoint="x"), " \n")
    out = run_cli(
        [DISTCLS, "serve", "--checkpoint", tiny_checkpoint, "--port", str(free_port())], clean_env(**{TOKEN_ENV: "  \n"}), 90
    )
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("distcls: error: serve: DISTCLS_API_TOKEN is set but empty") and out.stdout == ""


# --- item 8: no credentials in Ray's runtime env ----------------------------------------------------------


def test_runtime_env_carries_no_credentials(ray_local, s3_server):
    """The S3 server's credentials are in the driver's environment; Ray's runtime env (which it logs and
    returns from its APIs) has the endpoint but no key, and a worker still reads the bucket's credentials
    from its own environment (a local worker inherits it)."""
    from ray.util.state import list_jobs

    from distcls.runtime import FORWARDED_ENV, forwarded_env

    secret_names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", TOKEN_ENV, "RAY_AUTH_TOKEN")
    assert not set(secret_names) & set(FORWARDED_ENV)
    assert not any(word in name for name in FORWARDED_ENV for word in ("SECRET", "TOKEN", "PASSWORD", "KEY_ID"))
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret and secret not in json.dumps(forwarded_env())

    env_vars = ray_local.get_runtime_context().runtime_env.get("env_vars", {})
    assert env_vars.get("AWS_ENDPOINT_URL") == s3_server.endpoint_url
    assert not set(secret_names) & set(env_vars) and secret not in json.dumps(env_vars)
    jobs = json.dumps(
        [
            j.__dict__ if hasattr(j, "__dict__") else j
            for j in list_jobs(address=ray_local.get_runtime_context().gcs_address, detail=True, raise_on_missing_output=False)
        ],
        default=str,
    )
    assert s3_server.endpoint_url in jobs and secret not in jobs  # what Ray's jobs API returns

    @ray_local.remote(num_cpus=0)
    def worker_env() -> dict:
        return {k: os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}

    seen = ray_local.get(worker_env.remote())
    assert seen == {"AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": s3_server.endpoint_url}


# --- item 11: SIGTERM stops everything ---------------------------------------------------------------------


def session_processes(marker: str) -> dict[int, str]:
    """pid -> name of the live processes whose environment carries `marker` (from /proc): the command and
    everything it started, however deep and whatever their parent now (Ray's agents are reparented to init
    when their raylet dies)."""
    needle = f"DISTCLS_TEST_SESSION={marker}".encode()
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and needle in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    return found


class Output:
    """A process's stdout and stderr lines, each with the monotonic time it was read."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[tuple[float, str, str]] = []
        for name in ("stdout", "stderr"):
            threading.Thread(target=self.read, args=(getattr(proc, name), name), daemon=True).start()

    def read(self, stream, name: str) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), name, line.rstrip("\n")))

    def since(self, t: float) -> list[str]:
        return [f"{name}: {line}" for at, name, line in list(self.lines) if at >= t]

    def text(self) -> str:
        return "\n".join(f"{name}: {line}" for _, name, line in list(self.lines))


@pytest.mark.slow  # ~85 s on the 2-core machine: a local Ray instance and Serve start first
@pytest.mark.timeout(400)
def test_sigterm_stops_serve_and_everything_it_started(tiny_checkpoint):
    """`kill PID` of a running `distcls serve` (a local Ray instance, a replica, the proxy): it exits within
    a bound with one line and no Ray stack trace, and no process it started is left, agents included."""
    marker, port = secrets.token_hex(8), free_port()
    proc = subprocess.Popen(
        [
            DISTCLS,
            "serve",
            "--checkpoint",
            tiny_checkpoint,
            "--port",
            str(port),
            "--max-replicas",
            "1",
            "--cpus-per-replica",
            "0.5",
        ],
        env=clean_env(DISTCLS_TEST_SESSION=marker),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=ROOT,
    )
    output = Output(proc)
    try:
        deadline = time.monotonic() + 300
        while not any("Ctrl-C stops it" in line for _, _, line in list(output.lines)):
            assert proc.poll() is None and time.monotonic() < deadline, output.text()[-4000:]
            time.sleep(0.5)
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json() == {"status": "ok"}
        names = set(session_processes(marker).values())
        assert any(n.endswith("/raylet") for n in names) and any(n.startswith("ray::") for n in names), names
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        took = time.monotonic() - sent
        left_deadline = time.monotonic() + 20
        while (left := session_processes(marker)) and time.monotonic() < left_deadline:
            time.sleep(1)
        time.sleep(0.5)  # the reader threads catch the last lines
        print(f"\nSIGTERM: exit {code} after {took:.1f}s; output since: {output.since(sent)}")
        assert code == 143 and took < 60, (code, took, output.text()[-4000:])
        assert output.since(sent) == ["stderr: terminated"], output.text()[-4000:]
        assert not left, left
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in session_processes(marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

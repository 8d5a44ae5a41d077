"""The embedded S3-compatible server (moto's) for laptops, tests and the demo. Loopback by default."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from distcls import DistclsError

# moto accepts any credentials; these make boto/s3fs sign requests without a real AWS account.
LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "distcls-local",
    "AWS_SECRET_ACCESS_KEY": "distcls-local-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """A moto S3 server in a background thread of this process (moto's ThreadedMotoServer).

    >>> with S3Server(port=0) as server:          # port 0 picks a free port
    ...     os.environ.update(server.env())       # then s3:// URIs resolve to it

    moto is pure Python and shares the caller's GIL: on 2 cores it serves a few hundred small objects/s.
    """

    host: str = "127.0.0.1"
    port: int = 9000
    _server: object = field(default=None, init=False, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment variables that point AWS clients (boto3, s3fs, the aws CLI) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, **LOCAL_CREDENTIALS}

    def start(self) -> S3Server:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request

        if self.port == 0:
            self.port = free_port(self.host)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex((self.host, self.port)) == 0:
                raise DistclsError(
                    f"s3-server: {self.host}:{self.port} is already in use; pass --port with a free port "
                    "(or use the server that is already running)"
                )
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if isinstance(self._server, subprocess.Popen) and self._server.poll() is not None:
                raise DistclsError(f"s3-server: the server process exited with code {self._server.returncode}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/data.json", timeout=1).read()
                return
            except OSError:
                time.sleep(0.05)
        raise DistclsError(f"s3-server: the server on {self.endpoint_url} did not answer within {timeout:.0f}s")

    def stop(self) -> None:
        if isinstance(self._server, subprocess.Popen):
            self._server.terminate()
            try:
                self._server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
        elif self._server is not None:
            self._server.stop()
        self._server = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_moto_thread(host: str, port: int):
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    return server


def use_server_env(server: S3Server) -> dict[str, str | None]:
    """Point this process (and Ray workers started after it) at `server`; returns the previous values."""
    previous = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    return previous


def restore_env(previous: dict[str, str | None]) -> None:
    """Undo `use_server_env`."""
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


if __name__ == "__main__":  # the child process of S3Server: python -m distcls.tools.s3server HOST PORT
    import signal

    moto = start_moto_thread(sys.argv[1], int(sys.argv[2]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        moto.stop()


def serve_until_interrupted(cfg) -> None:
    """`distcls s3-server`: an S3Server for an S3ServerConfig until Ctrl-C (or SIGTERM), printing the variables
    that point clients at it."""
    server = S3Server(host=cfg.host, port=cfg.port).start()
    print(f"S3-compatible server (moto) listening on {server.endpoint_url}; Ctrl-C stops it.")
    print("Point clients at it with:")
    for key, value in server.env().items():
        print(f"  export {key}={value}")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping S3 server")
    finally:
        server.stop()

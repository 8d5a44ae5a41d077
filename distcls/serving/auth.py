"""Who may use the endpoint: the API token (DISTCLS_API_TOKEN, compared by sha256) and the Host check.

`check_auth` decides before anything starts whether an endpoint requires the token or is open (a
loopback host, or an explicit --no-auth, loudly); `host_names` which Host headers an open loopback
endpoint answers (against DNS rebinding). `check_host` and `check_bearer` run on every request in the
Ingress. Nothing here imports Ray or FastAPI.
"""

import hashlib
import hmac
import ipaddress
import os
import sys

from distcls import DistclsError
from distcls.config import ServeConfig
from distcls.serving.http import RequestError

TOKEN_ENV = "DISTCLS_API_TOKEN"
ADMIN_TOKEN_ENV = "DISTCLS_ADMIN_TOKEN"  # the admin routes' own token (POST /admin/rollout); unset: they are off


def token_digest(token: str) -> str:
    """The sha256 the endpoint compares tokens by, of the token without surrounding whitespace (a Secret file's
    final newline): the server's own token and the one a client sends are stripped alike."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def env_secret(name: str, what: str, unset_means: str) -> str | None:
    """A token from the environment without surrounding whitespace, None when unset; set but empty or only
    whitespace (an empty Secret) is refused, so that a token meant to be required is never silently off."""
    raw = os.environ.get(name)
    if raw is None:
        return None
    if not raw.strip():
        raise DistclsError(
            f"serve: {name} is set but empty (or only whitespace); set it to the {what}, or unset it {unset_means}"
        )
    return raw.strip()


def env_token() -> str | None:
    """DISTCLS_API_TOKEN (see env_secret): a token meant to be required never leaves the endpoint open."""
    return env_secret(TOKEN_ENV, "API token", "to serve without authentication on a loopback --host")


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (a hostname other than localhost may resolve anywhere)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth(cfg: ServeConfig, token: str | None) -> str | None:
    """The sha256 of the API token the endpoint will require, or None for an open endpoint, which only a
    loopback host or an explicit --no-auth gets. Refuses (before anything starts) what would be open by accident."""
    if token and not token.strip():
        raise DistclsError(f"serve: the API token ({TOKEN_ENV}) is only whitespace; set it to the token, or unset it")
    if token and cfg.no_auth:
        raise DistclsError(
            f"serve: --no-auth is given but {TOKEN_ENV} is set; unset {TOKEN_ENV} to serve "
            "without authentication, or drop --no-auth to require the token"
        )
    if token:
        return token_digest(token)
    if is_loopback(cfg.host):
        return None
    if not cfg.no_auth:
        raise DistclsError(
            f"serve: --host {cfg.host} is reachable from other machines and {TOKEN_ENV} is not "
            f"set; set {TOKEN_ENV} (e.g. from a Kubernetes Secret) to require 'Authorization: "
            "Bearer <token>', or pass --no-auth (no_auth: true) to serve without authentication"
        )
    warn_no_auth(cfg)
    return None


def warn_no_auth(cfg: ServeConfig) -> None:
    print(
        f"distcls: WARNING: NO AUTHENTICATION (--no-auth): anyone who can reach {cfg.host}:{cfg.port} can use "
        f"the model; set {TOKEN_ENV} instead unless an authenticating proxy is the only way in",
        file=sys.stderr,
        flush=True,
    )


def replica_token_sha256(token_sha256: str | None) -> str | None:
    """The token digest an Ingress replica requires: the one it was built with, else its own DISTCLS_API_TOKEN."""
    own = os.environ.get(TOKEN_ENV, "").strip()
    return token_sha256 or (token_digest(own) if own else None)


def replica_admin_sha256(admin_sha256: str | None) -> str | None:
    """The admin token digest an Ingress replica requires: the one it was built with, else its own DISTCLS_ADMIN_TOKEN."""
    own = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    return admin_sha256 or (token_digest(own) if own else None)


def check_bearer(authorization: str, token_sha256: str | None) -> None:
    """Refuse (401) a request without 'Authorization: Bearer <token>' for the token (None: no token needed)."""
    if token_sha256 is None:
        return
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(given.strip()), token_sha256):
        raise RequestError(
            401,
            "unauthorized",
            f"missing or wrong token; send 'Authorization: Bearer <token>' (the server's {TOKEN_ENV})",
            headers={"WWW-Authenticate": "Bearer"},
        )


def admin_token_sha256(api_token_sha256: str | None) -> str | None:
    """The sha256 of DISTCLS_ADMIN_TOKEN (None: the admin routes are off), refused when it is blank or the same
    as the API token: clients must never be able to change the traffic."""
    raw = env_secret(ADMIN_TOKEN_ENV, "admin token", "to turn the admin route off")
    if raw is None:
        return None
    digest = token_digest(raw)
    if api_token_sha256 is not None and hmac.compare_digest(digest, api_token_sha256):
        raise DistclsError(
            f"serve: {ADMIN_TOKEN_ENV} is the same as {TOKEN_ENV}; the admin token must be one clients never get: set another"
        )
    return digest


def check_admin(authorization: str, admin_sha256: str | None) -> None:
    """Refuse an admin request: 404 when the admin routes are off, 401 without the admin token."""
    if admin_sha256 is None:
        raise RequestError(
            404, "not_found", f"the admin routes are off; set {ADMIN_TOKEN_ENV} where the application runs to turn them on"
        )
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(given.strip()), admin_sha256):
        raise RequestError(
            401,
            "unauthorized",
            f"missing or wrong admin token; send 'Authorization: Bearer <token>' (the server's {ADMIN_TOKEN_ENV}, "
            "never the API token)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def host_names(cfg: ServeConfig, token_sha256: str | None, declarative: bool = False) -> tuple[str, ...] | None:
    """The Host header names the endpoint answers (besides loopback addresses), or None: no Host check.

    A loopback endpoint without a token is reachable from any web page this machine's browser opens, through
    DNS rebinding (a name of the attacker's that resolves to 127.0.0.1): it answers only its own names. With
    a token, on another --host, or in an app that `serve deploy` or a RayService builds (`declarative`, names
    unknown here), there is no check unless --allowed-hosts names the hosts.
    """
    if not cfg.allowed_hosts and (token_sha256 is not None or declarative or not is_loopback(cfg.host)):
        return None
    names = {host_of(name) for name in (cfg.host, "localhost", *cfg.allowed_hosts)}
    return tuple(sorted(names - {"", "0.0.0.0", "::"}))


def host_of(header: str) -> str:
    """The name in a Host header (or an --allowed-hosts entry): lowercased, without the port, the brackets of
    an IPv6 literal ([::1]:8000) or a final dot."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def check_host(header: str | None, names: tuple[str, ...] | None) -> None:
    """Refuse (403) a request whose Host is not one of `names` or a loopback address (None: no check)."""
    if names is None or not header:  # every browser sends Host; a client without one is no rebinding page
        return
    host = host_of(header)
    if host in names or is_loopback(host):
        return
    shown = host[:100]
    raise RequestError(
        403,
        "host_not_allowed",
        f"Host {shown!r} is not a name of this endpoint (a loopback endpoint without a token answers localhost, "
        f"its own address and --allowed-hosts only, against DNS rebinding); use http://localhost, or restart "
        f"the server with --allowed-hosts {shown or 'NAME'} (or with {TOKEN_ENV} set)",
    )

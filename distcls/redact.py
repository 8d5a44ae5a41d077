"""Credentials out of URIs before they are logged (MLflow params and tags) or stored (`distcls.json`).

`--tracking-uri https://user:pw@host`, a `--storage` or `--data` URI with a password in it, or a presigned
S3 URL (`X-Amz-Credential`, `X-Amz-Signature`, `X-Amz-Security-Token`) would otherwise be written into every
checkpoint's record and every MLflow run, where anyone who can read them can use the credentials. The
password of the userinfo and the values of query parameters whose names look like credentials become `***`;
the rest of the URI is kept as written, so that the record still says where things were.
"""

from __future__ import annotations

from urllib.parse import urlsplit

MASK = "***"
# query parameter names that carry credentials (matched as substrings of the lower-cased name): AWS SigV4
# (X-Amz-Credential, X-Amz-Signature, X-Amz-Security-Token), SigV2 (AWSAccessKeyId, Signature), Azure SAS
# (sig), GCS (X-Goog-Signature, X-Goog-Credential), and the generic ones
SECRET_PARAMS = ("credential", "signature", "sig", "token", "key", "secret", "password", "passwd", "pwd", "auth", "session")


def redact_uri(uri: str) -> str:
    """`uri` with its userinfo password and credential-like query values replaced by `***`; a string that is
    not a URI with a `scheme://` comes back unchanged."""
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: not a URI we can take apart, so keep none of it
        return uri.split("://", 1)[0] + "://" + MASK
    if not parts.scheme:
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{host}"
    query = "&".join(redact_param(p) for p in parts.query.split("&")) if parts.query else parts.query
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # nothing to hide: exactly as written
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


def redact_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    if eq and any(word in name.lower() for word in SECRET_PARAMS):
        return f"{name}={MASK}"
    return param


def redact_values(value: object) -> object:
    """A config or record (dicts, lists, tuples of values) with every string passed through `redact_uri`."""
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, dict):
        return {key: redact_values(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)
    return value

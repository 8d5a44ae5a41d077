"""Reading a model directory someone else may have written: a checkpoint or an export, verified.

An export is a directory like a checkpoint: `distcls.json` (the checkpoint's record plus `export`: format,
runtime, quantization, the source checkpoint) and `model.onnx` or `model.ts`, whose sha256 is the
export's identity (`weights_sha256`), verified on every load.

Whoever can write the model bucket can also write the sha256 in distcls.json: the hash proves integrity, not
authorship. So loading also refuses what would run code or read other files: TorchScript (its methods run
as it loads) unless the operator trusts it (`--trust-torchscript`, i.e. DISTCLS_TRUST_TORCHSCRIPT=1, or its
sha256 in DISTCLS_TRUSTED_MODELS), ONNX tensors kept in external files, and an `export.file` other than the
format's own file name.
"""

from __future__ import annotations

import hashlib
import os
import re

from distcls import DistclsError, storage
from distcls.checkpoint import META, read_meta, verify_checkpoint

FORMAT = "distcls-export/1"
FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
TRUST_ENV = "DISTCLS_TRUST_TORCHSCRIPT"  # "1": run any TorchScript export (what --trust-torchscript sets)
TRUSTED_MODELS_ENV = "DISTCLS_TRUSTED_MODELS"  # comma-separated sha256s of TorchScript exports to run


def is_export(meta: dict) -> bool:
    return str(meta.get("format", "")).startswith("distcls-export")


def export_file_name(uri: str, meta: dict) -> str:
    """`export.file`, which must be exactly the format's own file in the export directory (never a path)."""
    export = meta.get("export")
    fmt = export.get("format") if isinstance(export, dict) else None
    if fmt not in FILES:
        raise DistclsError(f"export: {uri} has unknown export format {fmt!r} in {META}; expected onnx or torchscript")
    if export.get("file") != FILES[fmt]:
        raise DistclsError(
            f"export: {uri}'s {META} names export.file {export.get('file')!r}; the model of this "
            f"{fmt} export can only be {FILES[fmt]!r} in its directory, refusing to read any other path"
        )
    return FILES[fmt]


def read_export_file(uri: str, meta: dict) -> bytes:
    """The export's model file, once its sha256 matches distcls.json (as for checkpoints' weights)."""
    file_uri = storage.join_uri(uri, export_file_name(uri, meta))
    if not storage.exists(file_uri):
        raise DistclsError(f"export: {uri} has no model file {meta['export']['file']!r}; export the checkpoint again")
    data = storage.read_bytes(file_uri)
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["weights_sha256"]:
        raise DistclsError(
            f"export: {file_uri} has sha256 {digest[:12]}..., but {META} records "
            f"{meta['weights_sha256'][:12]}...; the file was changed or damaged, refusing to load"
        )
    return data


def trust_torchscript() -> None:
    """--trust-torchscript: run TorchScript exports in this process and in every Ray worker it starts
    (runtime.FORWARDED_ENV carries TRUST_ENV). Inside `ray job submit` only the job's runtime env reaches
    the workers, so there the variable must already be set."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and os.environ.get(TRUST_ENV) != "1":
        raise DistclsError(
            f"export: --trust-torchscript inside `ray job submit` does not reach the job's workers; "
            f"add {TRUST_ENV}=1 to --runtime-env-json's env_vars instead"
        )
    os.environ[TRUST_ENV] = "1"


def trust_env() -> dict[str, str]:
    """The trust variables set in this process (what a Serve config must carry to its replicas)."""
    return {k: os.environ[k] for k in (TRUST_ENV, TRUSTED_MODELS_ENV) if os.environ.get(k)}


def trusted_models() -> set[str]:
    """The sha256s listed in DISTCLS_TRUSTED_MODELS (a malformed entry is an error, not a silent miss)."""
    entries = {e.strip().lower() for e in os.environ.get(TRUSTED_MODELS_ENV, "").split(",") if e.strip()}
    bad = sorted(e for e in entries if not re.fullmatch(r"[0-9a-f]{64}", e))
    if bad:
        raise DistclsError(
            f"export: {TRUSTED_MODELS_ENV} entry {bad[0][:70]!r} is not a sha256; list the full "
            "64-hex-digit sha256 of each trusted model, comma-separated"
        )
    return entries


def check_torchscript_trusted(uri: str, sha256: str) -> None:
    """TorchScript runs the file's own code as it loads (`__setstate__`) and runs: only when trusted."""
    if os.environ.get(TRUST_ENV) == "1" or sha256 in trusted_models():
        return
    raise DistclsError(
        f"export: {uri} is TorchScript, which runs code from the model file, and it is not trusted; "
        f"refusing to load (if you trust whoever can write it: --trust-torchscript, or add its "
        f"sha256 {sha256} to {TRUSTED_MODELS_ENV})"
    )


def message_children(message, where: str):
    """(place, message) for each message directly inside a protobuf message, in field order: every
    message-typed field, read from the descriptors, so that a field a new ONNX adds is walked as well."""
    from collections.abc import Mapping

    from google.protobuf.message import Message

    for field, value in message.ListFields():
        if field.type not in (field.TYPE_MESSAGE, field.TYPE_GROUP):
            continue
        place = f"{where}.{field.name}" if where else field.name
        if isinstance(value, Message):
            yield place, value
            continue
        for key, item in value.items() if isinstance(value, Mapping) else enumerate(value):
            if isinstance(item, Message):
                yield f"{place}[{key!r}]", item


def model_messages(model):
    """(place, message) for every message in an ONNX model, the model first (place ''), depth first in field
    order; a TensorProto is yielded but not entered. Places read like `functions[0].attribute_proto[0].t`."""
    stack = [("", model)]
    while stack:  # a loop, not recursion: nesting depth is the file's to choose
        where, message = stack.pop()
        yield where, message
        if message.DESCRIPTOR.full_name != "onnx.TensorProto":
            stack.extend(reversed(list(message_children(message, where))))


def model_tensors(model):
    """(place, TensorProto) for every tensor anywhere in an ONNX model: initializers, sparse tensors' values
    and indices, node attributes, functions' bodies and default attributes, subgraphs, training info, and
    whatever field holds one next."""
    for where, message in model_messages(model):
        if message.DESCRIPTOR.full_name == "onnx.TensorProto":
            yield where, message


def parse_onnx(data: bytes, file_uri: str, origin: str, fix: str):
    """The ModelProto of `data`, parsed only: no external data is read."""
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise DistclsError(
            f"{origin}: checking an ONNX model needs the onnx package, a dependency of distcls; "
            "reinstall distcls (pip install distcls)"
        ) from None
    try:
        return onnx.load_model_from_string(data)
    except DecodeError as exc:
        raise DistclsError(f"{origin}: {file_uri} is not an ONNX model ({exc}); {fix}") from None


def refuse_external_data(data: bytes, file_uri: str, origin: str = "export", fix: str = "export the checkpoint again") -> None:
    """ONNX tensors may name a file to read their bytes from (external data, relative paths like
    `../../etc/x` included, or onnxruntime's in-memory addresses); parse the model without loading any and
    refuse such a tensor wherever it sits, before onnxruntime sees the model. distcls never writes external
    data. A field this onnx package does not know (a newer ONNX's, which onnxruntime may read a tensor
    from) is refused too, rather than skipped. `origin` and `fix` phrase the error for the caller."""
    model = parse_onnx(data, file_uri, origin, fix)
    import onnx  # parse_onnx imported it
    from google.protobuf.unknown_fields import UnknownFieldSet

    for where, message in model_messages(model):
        if unknown := UnknownFieldSet(message):
            raise DistclsError(
                f"{origin}: {file_uri} has a field unknown to onnx {onnx.__version__} (number "
                f"{unknown[0].field_number} in {where or 'the model'}), which could hold a tensor kept in "
                f"another file; refusing to load it: upgrade onnx, or {fix}"
            )
        if message.DESCRIPTOR.full_name != "onnx.TensorProto":
            continue
        if message.data_location != message.DEFAULT or len(message.external_data):
            location = {e.key: e.value for e in message.external_data}.get("location", "")
            raise DistclsError(
                f"{origin}: {file_uri} keeps tensor {message.name!r} ({where}) in the external file "
                f"{location!r}; refusing to read files outside the model (distcls never writes "
                f"external data): {fix}"
            )


def check_safe_to_load(uri: str, meta: dict, data: bytes) -> None:
    """Refuse an export whose loading would run its code (untrusted TorchScript) or read other files."""
    if meta["export"]["format"] == "torchscript":
        check_torchscript_trusted(uri, meta["weights_sha256"])  # == sha256(data), read_export_file checked
    else:
        refuse_external_data(data, storage.join_uri(uri, FILES["onnx"]))


def verify_model(uri: str) -> dict:
    """The metadata of a complete, untampered checkpoint or export, else one-line DistclsError (drivers
    call this before they start Ray)."""
    meta = read_meta(uri)
    if not is_export(meta):
        return verify_checkpoint(uri)
    check_safe_to_load(uri, meta, read_export_file(uri, meta))
    return meta


def model_file_uri(uri: str) -> str:
    """The file whose bytes a checkpoint or export is (its size on disk)."""
    meta = read_meta(uri)
    return storage.join_uri(uri, export_file_name(uri, meta) if is_export(meta) else "model.safetensors")

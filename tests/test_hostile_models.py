"""Model directories written by someone else (issue 16, items 1-3; issue 28: every place ONNX has for a
tensor, and the compile cache). Whoever can write the model bucket also writes the sha256 in distcls.json, so
every export here carries a correct hash: the refusals must come from what the file would do when loaded
(run code, read other files), not from the integrity check.

Each attack is first shown to work when the file reaches torch or onnxruntime directly (a canary file is
overwritten, or its bytes become the model's weights), then shown refused by the loader, in one line."""

import hashlib
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from distcls import DistclsError
from distcls.checkpoint import read_meta
from distcls.cli import main
from distcls.infer import load_model, model_file_uri, onnxrt, verify_model
from distcls.infer.modelfile import TRUST_ENV, TRUSTED_MODELS_ENV, model_tensors
from distcls.runtime import forwarded_env
from distcls.transforms import PreprocessSpec

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

SIZE = 16  # image_size of the hand-made models
CANARY = b"canary: must stay exactly like this\n"


@pytest.fixture(autouse=True)
def untrusted(monkeypatch):
    """No trust from the environment the tests run in; whatever a test sets is undone after it."""
    for name in (TRUST_ENV, TRUSTED_MODELS_ENV, "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def write_export(directory, fmt: str, data: bytes, file: str | None = None, sha256: str | None = None) -> str:
    """An export directory as an attacker with write access makes it: the model file and a distcls.json whose
    sha256 matches (of `data`, or of whatever `file` points at)."""
    os.makedirs(directory, exist_ok=True)
    name = {"onnx": "model.onnx", "torchscript": "model.ts"}[fmt]
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)
    meta = {
        "format": "distcls-export/1",
        "architecture": "hostile",
        "num_classes": 2,
        "class_names": ["a", "b"],
        "preprocessing": PreprocessSpec(image_size=SIZE).to_dict(),
        "weights_sha256": sha256 or hashlib.sha256(data).hexdigest(),
        "export": {
            "format": fmt,
            "runtime": "torch" if fmt == "torchscript" else "onnxruntime",
            "file": name if file is None else file,
            "source_checkpoint": "s3://models/original",
        },
    }
    with open(os.path.join(directory, "distcls.json"), "w") as f:
        json.dump(meta, f)
    return str(directory)


def one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# --- 1. TorchScript runs code ----------------------------------------------------------------------------


class Hostile(torch.nn.Module):
    """Overwrites `canary` as it is loaded (TorchScript calls __setstate__) and returns bytes of `secret` as
    its logits when run: what torch.from_file lets any model.ts do."""

    def __init__(self, canary: str, secret: str):
        super().__init__()
        self.canary, self.secret, self.size = canary, secret, len(CANARY)
        self.written = 0

    @torch.jit.export
    def __getstate__(self) -> tuple[str, str, int, bool]:
        return self.canary, self.secret, self.size, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[str, str, int, bool]) -> None:
        self.canary, self.secret, self.size, self.training = state
        canary = torch.from_file(self.canary, shared=True, size=self.size, dtype=torch.uint8)
        self.written = int(canary.fill_(88).sum())  # b"X" * size (kept, or TorchScript drops the write)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        stolen = torch.from_file(self.secret, shared=False, size=2, dtype=torch.uint8).float()
        return stolen.unsqueeze(0).repeat(images.shape[0], 1)


@pytest.fixture
def hostile_ts(tmp_path) -> dict:
    canary, secret = tmp_path / "canary.txt", tmp_path / "secret.txt"
    canary.write_bytes(CANARY)
    secret.write_bytes(b"\x01\x07 secret")
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Hostile(str(canary), str(secret))), buf)
    data = buf.getvalue()
    return {
        "data": data,
        "dir": write_export(tmp_path / "ts-export", "torchscript", data),
        "canary": canary,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def test_torchscript_runs_code_when_loaded(hostile_ts):
    """The attack itself, without distcls: loading overwrites the canary, running reads the secret."""
    model = torch.jit.load(io.BytesIO(hostile_ts["data"]))
    assert hostile_ts["canary"].read_bytes() == b"X" * len(CANARY)
    assert model(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)).tolist() == [[1.0, 7.0]]


def test_torchscript_is_refused_by_default(hostile_ts, tmp_path, capsys):
    for load in (load_model, verify_model):
        with pytest.raises(DistclsError) as exc_info:
            load(hostile_ts["dir"])
        message = one_line_error(exc_info)
        assert "is TorchScript, which runs code from the model file" in message
        assert "--trust-torchscript" in message and f"{hostile_ts['sha256']} to {TRUSTED_MODELS_ENV}" in message
    assert main(["label", "--checkpoint", hostile_ts["dir"], "--input", str(tmp_path), "--output", str(tmp_path / "labels")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("distcls: error: export: ") and "is TorchScript" in line
    assert hostile_ts["canary"].read_bytes() == CANARY  # nothing of the model ran


def test_torchscript_runs_when_trusted_by_flag_or_sha256(hostile_ts, monkeypatch):
    monkeypatch.setenv(TRUST_ENV, "1")  # what --trust-torchscript sets
    meta = load_model(hostile_ts["dir"]).meta
    assert hostile_ts["canary"].read_bytes() == b"X" * len(CANARY)  # trusted: it really runs
    assert meta["weights_sha256"] == hostile_ts["sha256"]

    hostile_ts["canary"].write_bytes(CANARY)
    monkeypatch.setenv(TRUST_ENV, "0")
    monkeypatch.setenv(TRUSTED_MODELS_ENV, "ab" * 32)  # another model's sha256
    with pytest.raises(DistclsError, match="is TorchScript"):
        load_model(hostile_ts["dir"])
    assert hostile_ts["canary"].read_bytes() == CANARY
    monkeypatch.setenv(TRUSTED_MODELS_ENV, f"{'ab' * 32}, {hostile_ts['sha256'].upper()} ,")
    assert verify_model(hostile_ts["dir"])["weights_sha256"] == hostile_ts["sha256"]
    load_model(hostile_ts["dir"])
    assert hostile_ts["canary"].read_bytes() == b"X" * len(CANARY)

    monkeypatch.setenv(TRUSTED_MODELS_ENV, hostile_ts["sha256"][:12])  # a prefix is not a sha256
    with pytest.raises(DistclsError, match=f"{TRUSTED_MODELS_ENV} entry '{hostile_ts['sha256'][:12]}' is not a sha256"):
        load_model(hostile_ts["dir"])


def test_trust_flag_reaches_ray_workers_and_serve_configs(hostile_ts, tmp_path, capsys):
    from ray.serve.schema import ServeDeploySchema

    # label: the flag passes the driver's check (the next problem is the empty input), before Ray starts.
    assert (
        main(
            [
                "label",
                "--trust-torchscript",
                "--checkpoint",
                hostile_ts["dir"],
                "--input",
                str(tmp_path / "ts-export"),
                "--output",
                str(tmp_path / "labels"),
            ]
        )
        == 2
    )
    assert "label: no image objects under" in capsys.readouterr().err
    assert os.environ[TRUST_ENV] == "1" and forwarded_env()[TRUST_ENV] == "1"  # what init_ray gives workers
    assert hostile_ts["canary"].read_bytes() == CANARY  # verifying loads nothing

    assert main(["serve-config", "--checkpoint", hostile_ts["dir"], "--trust-torchscript"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    ServeDeploySchema.model_validate(doc)
    assert doc["applications"][0]["runtime_env"] == {"env_vars": {TRUST_ENV: "1"}}


def test_trust_flag_inside_ray_job_needs_the_runtime_env(hostile_ts, monkeypatch, capsys):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # as inside `ray job submit`
    assert main(["serve-config", "--checkpoint", hostile_ts["dir"], "--trust-torchscript"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"add {TRUST_ENV}=1 to --runtime-env-json's env_vars" in line
    monkeypatch.setenv(TRUST_ENV, "1")  # the job's runtime env has it: every worker has it too
    assert main(["serve-config", "--checkpoint", hostile_ts["dir"], "--trust-torchscript"]) == 0


def test_distill_never_runs_a_torchscript_teacher(hostile_ts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(TRUST_ENV, "1")
    monkeypatch.setenv(TRUSTED_MODELS_ENV, hostile_ts["sha256"])
    assert (
        main(
            [
                "distill",
                "--teacher",
                hostile_ts["dir"],
                "--data",
                str(tmp_path),
                "--storage",
                str(tmp_path / "runs"),
                "--weights",
                "none",
            ]
        )
        == 2
    )
    (line,) = capsys.readouterr().err.splitlines()
    assert f"distill: teacher {hostile_ts['dir']} is a torchscript export" in line
    assert "(s3://models/original)" in line
    assert hostile_ts["canary"].read_bytes() == CANARY


@pytest.mark.slow
def test_trusted_torchscript_runs_in_label_actors(hostile_ts, tmp_path):
    """End to end in a fresh process with its own local Ray: --trust-torchscript reaches the actors."""
    import pyarrow.parquet as pq

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", TRUST_ENV, TRUSTED_MODELS_ENV)}
    out = tmp_path / "labels"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distcls.cli",
            "label",
            "--trust-torchscript",
            "--checkpoint",
            hostile_ts["dir"],
            "--input",
            str(images),
            "--output",
            str(out),
            "--concurrency",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 2 and {r["label"] for r in rows} == {"b"}  # logits [1, 7] from the secret's bytes
    assert hostile_ts["canary"].read_bytes() == b"X" * len(CANARY)  # loaded (and so run) in the actor


# --- 2. ONNX external data reads files --------------------------------------------------------------------

WEIGHT_SHAPE = [2, 3, SIZE, SIZE]  # Conv: 2 filters over the whole image -> logits (n, 2)
WEIGHT_COUNT = int(np.prod(WEIGHT_SHAPE))


def external(name: str, location: str, dims=tuple(WEIGHT_SHAPE), data_type=TensorProto.FLOAT) -> TensorProto:
    """A tensor with no data of its own: onnxruntime reads it from `location`, relative to its working dir."""
    t = TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * int(np.prod(dims))))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def inline(name: str) -> TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, WEIGHT_SHAPE, np.ones(WEIGHT_COUNT, np.float32))


def classifier(weight_nodes: list, initializers: list, **model_fields) -> bytes:
    """uint8 NCHW image -> float -> Conv with weight `w` -> logits, the interface of a distcls export."""
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["n", 3, SIZE, SIZE])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])
    nodes = [
        *weight_nodes,
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Flatten", ["c"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "classifier", [image], [logits], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("x", 1)], **model_fields)
    return model.SerializeToString()


def if_subgraph(location: str) -> bytes:
    """The weight comes out of an If whose then-branch holds the external tensor."""
    out = helper.make_tensor_value_info("w_then", TensorProto.FLOAT, WEIGHT_SHAPE)
    then = helper.make_graph(
        [helper.make_node("Identity", ["ext"], ["w_then"])], "then", [], [out], initializer=[external("ext", location)]
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["ones"], ["w_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("w_else", TensorProto.FLOAT, WEIGHT_SHAPE)],
        initializer=[inline("ones")],
    )
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    return classifier([helper.make_node("If", ["cond"], ["w"], then_branch=then, else_branch=other)], [cond])


def sparse_initializer(location: str) -> bytes:
    values = external("w_values", location, dims=(WEIGHT_COUNT,))
    indices = helper.make_tensor("w_indices", TensorProto.INT64, [WEIGHT_COUNT], np.arange(WEIGHT_COUNT))
    graph_model = onnx.load_model_from_string(classifier([], []))
    graph_model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, WEIGHT_SHAPE))
    graph_model.graph.initializer.append(inline("unused"))
    graph_model.graph.node.insert(0, helper.make_node("Identity", ["unused"], ["w"]))
    return graph_model.SerializeToString()


def function_body(location: str) -> bytes:
    weights = helper.make_function(
        "x",
        "Weights",
        [],
        ["w"],
        [helper.make_node("Constant", [], ["w"], value=external("f", location))],
        [helper.make_opsetid("", 17)],
    )
    return classifier([helper.make_node("Weights", [], ["w"], domain="x")], [], functions=[weights])


def function_default(location: str) -> bytes:
    """The weight is a Constant in a function whose value is the function's attribute `weights`; the caller
    leaves it unset, so the default in FunctionProto.attribute_proto (the external tensor) is used."""
    constant = helper.make_node("Constant", [], ["w"])
    constant.attribute.append(helper.make_attribute_ref("value", onnx.AttributeProto.TENSOR, ref_attr_name="weights"))
    weights = helper.make_function(
        "x",
        "Weights",
        [],
        ["w"],
        [constant],
        [helper.make_opsetid("", 17)],
        attribute_protos=[helper.make_attribute("weights", external("default", location))],
    )
    return classifier([helper.make_node("Weights", [], ["w"], domain="x")], [], functions=[weights])


PLACES = {
    "initializer": lambda loc: classifier([], [external("w", loc)]),
    "constant-node": lambda loc: classifier([helper.make_node("Constant", [], ["w"], value=external("w", loc))], []),
    "if-subgraph": if_subgraph,
    "sparse-initializer": sparse_initializer,
    "function": function_body,
    "function-default-attribute": function_default,
}


STOLEN_LOGITS = [[3.0 * SIZE * SIZE, 6.0 * SIZE * SIZE]]  # all-ones image through the canary's weights


@pytest.fixture(params=["bare-name", "dot-dot"])
def stolen_location(request, tmp_path, monkeypatch) -> str:
    """A file outside any model whose bytes are valid weights (filter 0 all 1.0, filter 1 all 2.0), and the
    external-data location that makes onnxruntime read it: a bare name in the working directory, or
    `../../../<path>` from a working directory of / (as in many containers). onnxruntime refuses only
    absolute paths and paths that leave its working directory."""
    canary = tmp_path / "canary.bin"
    weights = np.concatenate([np.full(WEIGHT_COUNT // 2, 1.0), np.full(WEIGHT_COUNT // 2, 2.0)])
    weights.astype(np.float32).tofile(canary)
    if request.param == "bare-name":
        monkeypatch.chdir(tmp_path)
        return "canary.bin"
    monkeypatch.chdir("/")
    return "../../.." + str(canary)


def test_onnxruntime_reads_external_data_outside_the_model(stolen_location):
    """The attack itself, without distcls: the canary's bytes become the weights."""
    for make in (PLACES["initializer"], PLACES["constant-node"], PLACES["function-default-attribute"]):
        session = ort.InferenceSession(make(stolen_location), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"image": np.ones((1, 3, SIZE, SIZE), np.uint8)})[0]
        assert logits.tolist() == STOLEN_LOGITS


@pytest.mark.parametrize("place", sorted(PLACES))
def test_onnx_external_data_is_refused_anywhere_in_the_model(stolen_location, tmp_path, place, capsys):
    directory = write_export(tmp_path / "onnx-export", "onnx", PLACES[place](stolen_location))
    for load in (load_model, verify_model):
        with pytest.raises(DistclsError) as exc_info:
            load(directory)
        message = one_line_error(exc_info)
        assert "model.onnx keeps tensor " in message
        assert f"in the external file {stolen_location!r}; refusing to read files outside the model" in message
    assert main(["evaluate", "--checkpoint", directory, "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("distcls: error: export: ") and "external file" in line


def test_a_function_default_attribute_cannot_leak_a_file(tmp_path, monkeypatch, capsys):
    """Issue 28: a FunctionProto's default attribute value was the one place the old, listed walk missed;
    onnxruntime then read ./leak.txt from the worker's working directory and returned its bytes as scores."""
    weights = np.concatenate([np.full(WEIGHT_COUNT // 2, 1.0), np.full(WEIGHT_COUNT // 2, 2.0)])
    weights.astype(np.float32).tofile(tmp_path / "leak.txt")
    monkeypatch.chdir(tmp_path)
    data = function_default("leak.txt")
    model = onnx.load_model_from_string(data)
    assert not model.graph.initializer and model.functions[0].attribute_proto[0].t.data_location == TensorProto.EXTERNAL
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])  # the attack, without distcls
    assert session.run(None, {"image": np.ones((1, 3, SIZE, SIZE), np.uint8)})[0].tolist() == STOLEN_LOGITS

    directory = write_export(tmp_path / "onnx-export", "onnx", data)
    for load in (verify_model, load_model):
        with pytest.raises(DistclsError) as exc_info:
            load(directory)
        assert "keeps tensor 'default' (functions[0].attribute_proto[0].t) in the external file 'leak.txt'; " in (
            one_line_error(exc_info)
        )
    assert main(["label", "--checkpoint", directory, "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("distcls: error: export: ") and "'leak.txt'" in line


def tensor_field_paths() -> list[tuple[str, ...]]:
    """Every chain of message fields from ModelProto to a field of type TensorProto, through each message
    type at most once, read from the installed onnx's protobuf descriptors: a field a new ONNX adds (a new
    place for a tensor, a new message that holds one) is in this list without anyone writing it here."""
    from google.protobuf.descriptor import FieldDescriptor

    paths = []

    def walk(descriptor, path: tuple[str, ...], seen: frozenset) -> None:
        for field in descriptor.fields:
            if field.type not in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
                continue
            kind = field.message_type.full_name
            if kind == "onnx.TensorProto":
                paths.append((*path, field.name))
            elif kind not in seen:
                walk(field.message_type, (*path, field.name), seen | {kind})

    walk(onnx.ModelProto.DESCRIPTOR, (), frozenset({"onnx.ModelProto"}))
    return paths


TENSOR_FIELD_PATHS = tensor_field_paths()


def model_with_tensor_at(path: tuple[str, ...], tensor: TensorProto) -> tuple[bytes, str]:
    """(a ModelProto holding `tensor` at `path`, the place the checker should name), one element per
    repeated field. Not a runnable model: the checker parses, it does not run."""
    from google.protobuf.message import Message

    model = onnx.ModelProto(ir_version=10)
    message, place = model, []
    for name in path:
        value = getattr(message, name)
        single = isinstance(value, Message)
        message = value if single else value.add()
        place.append(name if single else f"{name}[0]")
    message.CopyFrom(tensor)
    return model.SerializeToString(), ".".join(place)


def test_the_descriptor_walk_finds_every_known_place():
    """The list below is built from the descriptors; here, that it is not empty or shallow by mistake."""
    names = {".".join(p) for p in TENSOR_FIELD_PATHS}
    for known in (
        "graph.initializer",
        "graph.sparse_initializer.values",
        "graph.sparse_initializer.indices",
        "graph.node.attribute.t",
        "graph.node.attribute.tensors",
        "graph.node.attribute.sparse_tensors.values",
        "functions.node.attribute.g.initializer",
        "functions.attribute_proto.t",
        "functions.attribute_proto.graphs.sparse_initializer.indices",
        "training_info.algorithm.node.attribute.sparse_tensor.values",
        "training_info.initialization.initializer",
    ):
        assert known in names
    assert len(names) == len(TENSOR_FIELD_PATHS) >= 40


@pytest.mark.parametrize("path", TENSOR_FIELD_PATHS, ids=".".join)
def test_an_external_tensor_is_refused_at_every_place_onnx_has_for_one(tmp_path, path):
    """Every place, by the descriptors: the refusal comes from a generic walk of the model, not a list."""
    data, place = model_with_tensor_at(path, external("hidden", "leak.txt"))
    assert list(model_tensors(onnx.load_model_from_string(data))) == [(place, external("hidden", "leak.txt"))]
    directory = write_export(tmp_path / "onnx-export", "onnx", data)
    with pytest.raises(DistclsError) as exc_info:
        verify_model(directory)
    assert f"keeps tensor 'hidden' ({place}) in the external file 'leak.txt'; refusing" in one_line_error(exc_info)
    marked_only = TensorProto(name="hidden", data_type=TensorProto.FLOAT, dims=[1], data_location=TensorProto.EXTERNAL)
    with pytest.raises(DistclsError, match=f"keeps tensor 'hidden' \\({re.escape(place)}\\) in the external file ''"):
        verify_model(write_export(tmp_path / "marked", "onnx", model_with_tensor_at(path, marked_only)[0]))


def test_a_field_this_onnx_does_not_know_is_refused(tmp_path):
    """A newer ONNX's field arrives as an unknown protobuf field, which no walk can look into: refused."""
    hidden = external("hidden", "leak.txt").SerializeToString()
    graph = onnx.GraphProto(name="g").SerializeToString() + bytes([0xBA, 0x3E, len(hidden)]) + hidden  # field 999
    model = onnx.ModelProto(ir_version=10)
    model.graph.ParseFromString(graph)
    directory = write_export(tmp_path / "onnx-export", "onnx", model.SerializeToString())
    with pytest.raises(DistclsError) as exc_info:
        verify_model(directory)
    message = one_line_error(exc_info)
    assert f"model.onnx has a field unknown to onnx {onnx.__version__} (number 999 in graph)" in message
    assert "upgrade onnx, or export the checkpoint again" in message


def test_self_contained_onnx_still_loads(tmp_path):
    directory = write_export(tmp_path / "onnx-export", "onnx", classifier([], [inline("w")]))
    model = load_model(directory)
    meta = model.meta
    assert model.predict(np.ones((2, 3, SIZE, SIZE), dtype=np.uint8)).tolist() == [[3.0 * 256] * 2] * 2
    assert verify_model(directory) == meta


def test_not_an_onnx_model_is_one_line(tmp_path):
    directory = write_export(tmp_path / "onnx-export", "onnx", b"\x0a\xff\xff\xff garbage")
    with pytest.raises(DistclsError, match="model.onnx is not an ONNX model .*; export the checkpoint again"):
        verify_model(directory)


# --- 3. export.file escapes the export directory ---------------------------------------------------------


@pytest.fixture
def outside_model(tmp_path) -> tuple[str, bytes]:
    """A valid model file outside the export directory, which the attacker's distcls.json points at."""
    data = classifier([], [inline("w")])
    path = tmp_path / "other-bucket" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(data)
    return str(path), data


@pytest.mark.parametrize(
    "file",
    [
        "ABSOLUTE",
        "../other-bucket/model.onnx",
        "/other-bucket/x",
        "/etc/passwd",
        "../..",
        "sub/model.onnx",
        "./model.onnx",
        "model.ts",
        "",
    ],
)
def test_export_file_outside_the_directory_is_refused(tmp_path, outside_model, file):
    path, data = outside_model
    file = path if file == "ABSOLUTE" else file
    target = path if file in (path, "../other-bucket/model.onnx") else "/etc/passwd"
    sha256 = hashlib.sha256(pathlib.Path(target).read_bytes()).hexdigest()  # the attacker writes the matching hash
    directory = write_export(tmp_path / "export", "onnx", data, file=file, sha256=sha256)
    for load in (load_model, verify_model, model_file_uri):
        with pytest.raises(DistclsError) as exc_info:
            load(directory)
        message = one_line_error(exc_info)
        assert (
            f"names export.file {file!r}; the model of this onnx export can only be 'model.onnx' in its "
            "directory, refusing to read any other path" in message
        )


def test_export_format_must_be_known(tmp_path):
    directory = write_export(tmp_path / "export", "onnx", classifier([], [inline("w")]))
    meta_file = pathlib.Path(directory) / "distcls.json"
    meta = json.loads(meta_file.read_text())
    meta["export"]["format"] = "pickle"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DistclsError, match="unknown export format 'pickle' in distcls.json; expected onnx or torch"):
        load_model(directory)


# --- 4. The ONNX compile cache decides which model runs ---------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch) -> pathlib.Path:
    """A compile cache of the test's own (not yet made), and a checkpoint whose cache entry it would hold."""
    from distcls.checkpoint import from_pretrained

    path = tmp_path / "cache"
    monkeypatch.setenv(onnxrt.CACHE_ENV, str(path))
    from_pretrained(out=str(tmp_path / "ckpt"), model="mobilenet_v3_small", weights="none", image_size=SIZE)
    return path


def plant_cache_entry(ckpt: str, data: bytes) -> pathlib.Path:
    """What someone who can write the cache does: the model, and a compiled.json whose sha256 matches."""
    key = onnxrt.cache_key(read_meta(ckpt))
    record = {"onnx_sha256": hashlib.sha256(data).hexdigest(), "compile_seconds": 0.0}
    assert onnxrt.write_cached(key, data, record) is None
    return pathlib.Path(onnxrt.cache_root(), "onnx", key)


def test_a_cached_model_with_external_data_is_refused_before_onnxruntime(cache, tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ckpt")
    stolen = np.concatenate([np.full(WEIGHT_COUNT // 2, 1.0), np.full(WEIGHT_COUNT // 2, 2.0)])
    stolen.astype(np.float32).tofile(tmp_path / "leak.txt")
    monkeypatch.chdir(tmp_path)
    entry = plant_cache_entry(ckpt, function_default("leak.txt"))
    for attempt in (lambda: onnxrt.read_cached(entry.name), lambda: load_model(ckpt, "onnx", "cpu")):
        with pytest.raises(DistclsError) as exc_info:
            attempt()
        message = one_line_error(exc_info)
        assert message.startswith(f"infer: compile cache: {entry / 'model.onnx'} keeps tensor 'default' (functions[0]")
        assert message.endswith(
            f"in the external file 'leak.txt'; refusing to read files outside the model (distcls "
            f"never writes external data): delete {entry} (distcls never caches such a model; "
            "find out who wrote it)"
        )
    # a self-contained cached model is still used as it is (this one: the hand-made 2-class graph)
    plant_cache_entry(ckpt, classifier([], [inline("w")]))
    model = load_model(ckpt, "onnx", "cpu")
    assert model.note.startswith("compiled ONNX from the cache") and model.predict(
        np.ones((1, 3, SIZE, SIZE), np.uint8)
    ).shape == (1, 2)


@pytest.mark.parametrize("where", ["root", "onnx", "entry", "model.onnx"])
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722], ids=lambda m: f"mode-{m:o}")
def test_a_cache_others_can_write_is_refused(cache, tmp_path, where, mode):
    ckpt = str(tmp_path / "ckpt")
    entry = plant_cache_entry(ckpt, classifier([], [inline("w")]))
    target = {"root": cache, "onnx": cache / "onnx", "entry": entry, "model.onnx": entry / "model.onnx"}[where]
    os.chmod(target, mode)
    for attempt in (lambda: onnxrt.read_cached(entry.name), lambda: load_model(ckpt, "auto", "cpu")):
        with pytest.raises(DistclsError) as exc_info:
            attempt()
        assert one_line_error(exc_info) == (
            f"infer: the ONNX compile cache {target} can be written by other users (mode {mode:o}), refusing to "
            f"use it; chmod go-w {target}, or set {onnxrt.CACHE_ENV} to a folder of your own"
        )
    os.chmod(target, 0o700)
    assert onnxrt.read_cached(entry.name) is not None


def test_a_cache_another_user_owns_is_refused(cache, tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ckpt")
    if os.geteuid() == 0:  # root: give a cache to nobody
        plant_cache_entry(ckpt, classifier([], [inline("w")]))
        os.chown(cache, 65534, 65534)
        target, owner = cache, 65534
    else:  # anyone else: a folder root owns
        target, owner = pathlib.Path("/usr"), 0
        monkeypatch.setenv(onnxrt.CACHE_ENV, str(target))
    with pytest.raises(DistclsError) as exc_info:
        load_model(ckpt, "auto", "cpu")
    assert one_line_error(exc_info) == (
        f"infer: the ONNX compile cache {target} is owned by user id {owner}, not by this user ({os.geteuid()}), "
        f"refusing to use it; set {onnxrt.CACHE_ENV} to a folder of your own"
    )


def test_the_cache_is_made_private(cache, tmp_path):
    old = os.umask(0o002)  # a group-writable umask, common with per-user groups
    try:
        entry = plant_cache_entry(str(tmp_path / "ckpt"), classifier([], [inline("w")]))
    finally:
        os.umask(old)
    for path in (cache, cache / "onnx", entry):
        assert os.stat(path).st_mode & 0o777 == 0o700
    assert os.stat(entry / "model.onnx").st_mode & 0o777 == 0o600
    assert onnxrt.read_cached(entry.name)[0] == classifier([], [inline("w")])

"""cluster/ and jobs/: every manifest parses and validates against Ray's own schemas, entrypoints exist."""

import glob
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distcls.config import EvaluateConfig, LabelConfig, PackConfig, ServeConfig, TrainConfig, TuneConfig, load_config
from distcls.serving import serve_config

ROOT = Path(__file__).resolve().parent.parent
YAML_FILES = sorted(
    glob.glob(str(ROOT / "cluster" / "**" / "*.yaml"), recursive=True)
    + glob.glob(str(ROOT / "jobs" / "**" / "*.yaml"), recursive=True)
)
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))


def pinned_ray() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text).group(1)


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def ray_resource(path: Path) -> dict:
    """The file's Ray resource (RayCluster, RayJob or RayService); a NetworkPolicy may follow it."""
    (doc,) = [d for d in load_docs(path) if d["apiVersion"].startswith("ray.io/")]
    return doc


def walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def test_there_are_manifests_and_job_configs():
    names = {Path(f).name for f in YAML_FILES}
    assert {
        "ray-cluster.aws.yaml",
        "raycluster.yaml",
        "rayjob-train.yaml",
        "rayjob-label.yaml",
        "rayservice.yaml",
        "train.yaml",
        "evaluate.yaml",
        "label.yaml",
        "serve.yaml",
    } <= names, names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(Path(p).relative_to(ROOT)))
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_launcher_config_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.aws.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert config["docker"]["image"].startswith(f"rayproject/ray:{pinned_ray()}-")
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))


def test_rayservice_serve_config_is_what_serve_config_prints():
    from ray.serve.schema import ServeDeploySchema

    from distcls.cli import build_parser
    from distcls.config import config_from_args

    text = (ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text()
    service = ray_resource(ROOT / "cluster" / "kuberay" / "rayservice.yaml")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    command = re.search(r"#\s*(distcls serve-config .+)", text).group(1)
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert embedded == serve_config(config_from_args(ServeConfig, args))
    # the canary: its own deployment, the split in the Ingress's user_config, and build_app's args rebuild both
    (app,) = embedded["applications"]
    deployments = {d["name"]: d["user_config"] for d in app["deployments"]}
    assert list(deployments) == ["ImageClassifier", "ImageClassifier-canary", "Ingress"]
    assert deployments["Ingress"]["weights"] == {"main": 90.0, "canary": 10.0}
    rebuilt = load_config(ServeConfig, overrides=app["args"])
    assert [(s.name, s.checkpoint, s.weight) for s in rebuilt.variant_specs()] == [
        ("main", deployments["ImageClassifier"]["checkpoint"], 90.0),
        ("canary", deployments["ImageClassifier-canary"]["checkpoint"], 10.0),
    ]


def test_kuberay_versions_tokens_and_head():
    ray_version = pinned_ray()
    for path in KUBERAY:
        doc = ray_resource(path)
        nodes = list(walk(doc))
        images = [n["image"] for n in nodes if "image" in n]
        assert images and all(img.endswith(f"ray{ray_version}") or f":{ray_version}" in img for img in images), (
            path.name,
            images,
        )
        for n in nodes:
            if "rayVersion" in n:
                assert n["rayVersion"] == ray_version, path.name
            if "headGroupSpec" in n:
                assert n["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
                assert n["headGroupSpec"]["serviceType"] == "ClusterIP"
        envs = [e for n in nodes for e in n.get("env", []) if isinstance(e, dict)]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in envs, path.name
        assert any(e.get("name") == "RAY_AUTH_TOKEN" and "secretKeyRef" in e.get("valueFrom", {}) for e in envs)
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray_version}-" in dockerfile


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec in a Ray resource: head, worker groups, RayJob submitter."""
    return [n for n in walk(doc) if "containers" in n]


def pod_templates(doc: dict) -> list[dict]:
    return [n for n in walk(doc) if isinstance(n.get("spec"), dict) and "containers" in n["spec"]]


def test_pods_run_as_non_root_with_least_privilege():
    """Every container of every manifest: a non-root uid (the Dockerfile's), no privilege escalation, no
    capabilities, a read-only root with /tmp (where Ray writes) an emptyDir; the autoscaler sidecar too."""
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    uid = int(re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M).group(1))
    assert uid != 0
    for path in KUBERAY:
        doc = ray_resource(path)
        specs = pod_specs(doc)
        assert specs, path.name
        for spec in specs:
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid, path.name
            assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, path.name
            empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
            for container in spec["containers"]:
                where = (path.name, container["name"])
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, where
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc.get("runAsUser", uid) != 0 and sc.get("privileged", False) is False, where
                tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp and tmp[0]["name"] in empty_dirs, where
        for autoscaler in (n["autoscalerOptions"] for n in walk(doc) if "autoscalerOptions" in n):
            sc = autoscaler["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, path.name


def admitted(policy: dict, peer_labels: dict, port: int) -> bool:
    """Whether a NetworkPolicy admits a pod with `peer_labels` to `port` (matchLabels peers, TCP ports)."""
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            wanted = peer.get("podSelector", {}).get("matchLabels", {})
            if wanted.items() <= peer_labels.items():
                return True
    return False


OPERATOR = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"}
STRANGER = {"app": "something-else"}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayservice.yaml"])
def test_network_policy_admits_only_the_cluster_and_the_operator(name):
    """GCS (6379), the dashboard (8265), Ray client (10001) and Ray's other ports: the cluster's own pods
    (and the RayJob submitters) only, GCS and dashboard also the operator; the serve port: anyone."""
    docs = load_docs(ROOT / "cluster" / "kuberay" / name)
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    labels = [t["metadata"]["labels"] for t in pod_templates(ray_resource(ROOT / "cluster" / "kuberay" / name))]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert labels and all(selector.items() <= pod.items() for pod in labels), (selector, labels)  # covers every pod
    own = labels[0]
    peers = [own]
    if name == "raycluster.yaml":  # the RayJobs' submitter pods talk to this cluster's dashboard
        peers += [
            t["metadata"]["labels"]
            for job in ("rayjob-train.yaml", "rayjob-label.yaml")
            for t in pod_templates(ray_resource(ROOT / "cluster" / "kuberay" / job))
        ]
    for peer in peers:
        assert all(admitted(policy, peer, port) for port in (6379, 8265, 10001, 8000, 8076, 23456)), peer
    assert admitted(policy, OPERATOR, 6379) and admitted(policy, OPERATOR, 8265)
    assert not any(admitted(policy, OPERATOR, port) for port in (10001, 8076, 52365, 23456))
    assert admitted(policy, STRANGER, 8000) and admitted(policy, {}, 8000)
    assert not any(admitted(policy, STRANGER, port) for port in (6379, 8265, 10001, 8076, 52365, 23456))


def test_every_manifest_that_serves_has_the_api_token():
    """An endpoint on 0.0.0.0 refuses to start without DISTCLS_API_TOKEN: each place it can run gets it
    from a secret, never from a file in this repository."""
    for name, optional in (("rayservice.yaml", False), ("raycluster.yaml", True)):  # jobs/serve.py may run there
        doc = ray_resource(ROOT / "cluster" / "kuberay" / name)
        for spec in pod_specs(doc):
            for container in spec["containers"]:
                (env,) = [e for e in container["env"] if e["name"] == "DISTCLS_API_TOKEN"]
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "distcls-api-token" and ref.get("optional", False) is optional, name
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.aws.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in launcher[key] if "ray start" in c]
        assert start and all('DISTCLS_API_TOKEN="$(cat ~/.distcls/api_token)"' in c for c in start), key
    assert "~/.distcls/api_token" in launcher["file_mounts"]
    assert any("/home/ray/.distcls/api_token:ro" in o for o in launcher["docker"]["run_options"])
    job = yaml.safe_load((ROOT / "jobs" / "configs" / "serve.yaml").read_text())
    assert job["host"] == "0.0.0.0" and not job.get("no_auth")  # the documented job needs the token


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-label.yaml"])
def test_rayjob_entrypoints_exist_and_answer_help(name):
    doc = ray_resource(ROOT / "cluster" / "kuberay" / name)
    argv = shlex.split(doc["spec"]["entrypoint"])
    script = ROOT / argv[1].replace("/home/ray/distcls/", "")
    config = ROOT / argv[argv.index("--config") + 1].replace("/home/ray/distcls/", "")
    assert script.exists() and config.exists()
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--config" in out.stdout, out.stderr


@pytest.mark.parametrize("script", sorted((ROOT / "jobs").glob("*.py")), ids=lambda p: p.name)
def test_job_entrypoints_help(script):
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    # Every job takes a --config YAML, except the fixed-size GPU check (its sizes are the check).
    assert out.returncode == 0 and ("--cpu-smoke" if script.name == "bench_gpu.py" else "--config") in out.stdout, out.stderr


@pytest.mark.parametrize(
    "name,cls",
    [
        ("train", TrainConfig),
        ("evaluate", EvaluateConfig),
        ("label", LabelConfig),
        ("serve", ServeConfig),
        ("tune", TuneConfig),
        ("pack", PackConfig),
    ],
)
def test_job_configs_load_with_the_cli_loader(name, cls):
    cfg = load_config(cls, str(ROOT / "jobs" / "configs" / f"{name}.yaml"))
    assert isinstance(cfg, cls)


@pytest.mark.slow  # ~160 s: two Ray nodes, a training and a labeling job submitted (`make cluster-demo` runs the same)
def test_two_node_cluster_run():
    """cluster/two_nodes.py: head + second node with token auth, train (STRICT_SPREAD) and label jobs."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "cluster" / "two_nodes.py")], capture_output=True, text=True, timeout=1200, cwd=ROOT
    )
    assert out.returncode == 0, (out.stdout[-4000:], out.stderr[-4000:])
    for line in (
        "2 nodes alive",
        "`ray job submit` with no token is refused",
        "`ray job submit` with a wrong token is refused",
        "a node joining with no token is refused",
        "a node joining with a wrong token is refused",
        "training job SUCCEEDED",
        "the checkpoint is calibrated (temperature",  # its working_dir was deleted under the driver (issue 31)
        "epoch 1's line shows once per process",
        "on 2 different nodes",
        "labeling job SUCCEEDED",
        "label rows",
        "no process of this cluster is left",
        "all checks passed",
    ):
        assert line in out.stdout, line


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_node_cluster_survives_a_lost_node():
    """cluster/two_nodes.py --lost-node: the second node's raylet is killed during training; a replacement
    node joins and the job finishes from its last checkpoint."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "cluster" / "two_nodes.py"), "--lost-node"],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
    )
    assert out.returncode == 0, (out.stdout[-4000:], out.stderr[-4000:])
    for line in (
        "second node lost (raylet pid",
        "a replacement node joined",
        "after the node was lost",
        "epochs [1, 2, 3]; restarted from its checkpoint",
        "the checkpoint is calibrated (temperature",
        "all checks passed",
    ):
        assert line in out.stdout, line


def two_nodes(*flags: str) -> str:
    """cluster/two_nodes.py with `flags`; it must exit 0. Returns its output."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "cluster" / "two_nodes.py"), *flags], capture_output=True, text=True, timeout=1800, cwd=ROOT
    )
    assert out.returncode == 0, (out.stdout[-4000:], out.stderr[-4000:])
    return out.stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_node_preemption_restores_the_step_checkpoint_without_counting_a_failure():
    """cluster/two_nodes.py --preempt: `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` mid-epoch; the workers
    take a step checkpoint at the notice, the node is killed, and the job (--num-workers 1,2, --max-failures 0)
    restores that checkpoint and finishes on one worker with every epoch complete."""
    out = two_nodes("--preempt")
    for line in (
        "DRAIN_NODE_REASON_PREEMPTION` accepted",
        "a step checkpoint taken at the preemption notice",
        "second node lost (raylet pid",
        "after the drain, with --max-failures 0",
        "Ray Train charged the loss to preemption, not to --max-failures: RETRY, source preemption",
        "the job log says: preemption notice: node(s)",
        "the job log says: step checkpoint (preemption)",
        "the job log says: resuming from",
        "the job log says it shrank: resized: 2 -> 1 workers",
        "epoch 1 trained on all 200 samples",
        "epoch 3 trained on all 200 samples",
        "the checkpoint is calibrated (temperature",
        "all checks passed",
    ):
        assert line in out, line


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_node_elastic_run_shrinks_to_one_worker_with_every_epoch_complete():
    """cluster/two_nodes.py --elastic: the second node is killed after a mid-epoch step checkpoint; the job
    (--num-workers 1,2) goes on with one worker, result.json records the resize, every epoch saw every sample."""
    out = two_nodes("--elastic")
    for line in (
        "a mid-epoch step checkpoint registered",
        "second node lost (raylet pid",
        "after the node was lost",
        "Ray Train's failure decisions: RETRY, source worker group",
        "the job log says it shrank: resized: 2 -> 1 workers",
        "result.json: resizes [{",
        "epoch 1 trained on all 200 samples",
        "epoch 2 trained on all 200 samples",
        "epoch 3 trained on all 200 samples",
        "the checkpoint is calibrated (temperature",
        "all checks passed",
    ):
        assert line in out, line

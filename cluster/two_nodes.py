"""A real two-node Ray cluster on this machine, with token authentication, used the way a cluster is used.

    .venv/bin/python cluster/two_nodes.py        (or `make cluster-demo`)

1. starts the loopback S3 server and writes a slice of Fashion-MNIST into it;
2. `ray start --head` (RAY_AUTH_MODE=token, dashboard on 127.0.0.1) and a second node with
   `ray start --address`, each in its own process group and --temp-dir (as on two machines; see common());
3. shows that the cluster refuses a `ray job submit` and a third node's `ray start` that come with no token
   or a wrong one;
4. submits `jobs/train.py` with `ray job submit --working-dir .` and STRICT_SPREAD placement, so its two
   training workers land on different nodes; the job must end SUCCEEDED with a calibrated checkpoint, its
   log must show the epoch line once, and the run's result.json names the node of every worker;
5. submits `jobs/label.py` the same way over the test images and counts the Parquet rows;
6. with --lost-node: a 3-epoch training job (STRICT_SPREAD, --max-failures 2); after epoch 1's checkpoint the
   second node's raylet is SIGKILLed, a replacement node joins, and the job must finish from the checkpoint;
7. stops everything it started (both nodes, every Ray process under its temp dir, the S3 server).

With --preempt or --elastic, steps 3-6 give way to drills on an elastic 3-epoch job (--num-workers 1,2, one
worker per node): --preempt drains the second node for preemption mid-epoch (`ray drain-node`), waits for the
step checkpoint taken at the notice, kills the node, and the job (--max-failures 0) must restore that checkpoint
and finish on one worker; --elastic kills the second node after a mid-epoch step checkpoint and the job must
finish on one worker; --compare then runs the same job undisturbed and prints both accuracies. Both check the
resize in the log and result.json, and from a per-sample log that every epoch trained on every sample.

Exit status 0 only if every check held. Prints each step and what it found.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from distcls.tools.s3server import free_port  # noqa: E402

BIN = Path(sys.executable).parent
BUCKET = "s3://two-nodes"
# distcls's test hook (distcls.train.data.CONSUMPTION_ENV): each training worker logs the sample ids it trains on
CONSUMPTION_ENV = "DISTCLS_TEST_CONSUMPTION_LOG"
GONE = (ProcessLookupError, PermissionError, subprocess.TimeoutExpired)  # already stopped: fine


def say(text: str) -> None:
    print(f"[two-nodes] {text}", flush=True)


class Cluster:
    """Two `ray start --block` processes (head + worker), each in its own process group."""

    def __init__(self, work: Path, env: dict[str, str], cpus_per_node: int):
        self.work, self.env, self.cpus = work, env, cpus_per_node
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.procs: list[subprocess.Popen] = []
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str], log: str) -> None:
        with open(self.work / log, "w") as out:  # the child keeps its own descriptor
            self.procs.append(
                subprocess.Popen(
                    [str(BIN / "ray"), "start", "--block", *args],
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def start(self) -> None:
        self._start(
            [
                "--head",
                "--port",
                str(self.gcs_port),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
                "--include-dashboard",
                "true",
                *self.common("ray"),
            ],
            "head.log",
        )
        self.wait_nodes(1, "head")
        self.start_second()

    def common(self, temp_dir: str) -> list[str]:
        # Each node its own --temp-dir, as on separate machines: a node started without one takes the head's
        # and shares its session directory. Then (1) both nodes' runtime env agents unpack a job's working_dir
        # into the same runtime_resources/working_dir_files/_ray_pkg_<hash>; the second one, on its cache miss,
        # removes and re-extracts that directory (download_and_unpack_package(overwrite=True)) when the job's
        # driver connects, so the driver, started in it on the head, runs on in a deleted directory: its next
        # os.getcwd() (the calibration's imports after training) fails with FileNotFoundError; (2) both nodes'
        # log monitors tail the same worker logs, and every line a worker prints reaches the job's log twice.
        # Free ports for each node's agents: Ray's fixed defaults (dashboard agent 52365, ...) collide with any
        # other Ray instance on this machine, and a head without its dashboard agent accepts no job.
        ports = {
            flag: free_port()
            for flag in (
                "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port",
                "--runtime-env-agent-port",
                "--metrics-export-port",
            )
        }
        return [
            "--temp-dir",
            str(self.work / temp_dir),
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(self.cpus),
            "--disable-usage-stats",
            *(str(x) for kv in ports.items() for x in kv),
        ]

    def start_second(self) -> None:
        """The second node (again, after it was lost: a replacement machine joining)."""
        self.second = len(self.procs)
        self._start(["--address", f"127.0.0.1:{self.gcs_port}", *self.common(f"ray{self.second}")], f"worker{self.second}.log")
        self.wait_nodes(2, "second node")

    def nodes(self) -> list[dict]:
        out = subprocess.run(
            [str(BIN / "ray"), "list", "nodes", "--address", self.dashboard, "--format", "json", "--filter", "state=ALIVE"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip().startswith("[") else []

    def wait_nodes(self, n: int, what: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs[:1] + self.procs[1:][-1:]):  # head, newest node
                raise SystemExit(f"[two-nodes] FAILED: `ray start` for the {what} exited; see {self.work}")
            if len(self.nodes()) >= n:
                return
            time.sleep(2)
        raise SystemExit(f"[two-nodes] FAILED: the {what} did not join within {timeout:.0f}s")

    def kill_second_raylet(self) -> int:
        """SIGKILL the second node's raylet (the node is lost; its workers die with it). Returns its pid."""
        pids = [p for p in descendants(self.procs[self.second].pid) if process_name(p) == "raylet"]
        if not pids:
            raise SystemExit("[two-nodes] FAILED: no raylet process found under the second node")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids[0]

    def try_to_join(self, env: dict[str, str], timeout: float = 90) -> tuple[int | None, int]:
        """`ray start --address` for a third node with `env` (no token, or a wrong one): (its exit code, or
        None if still running at the timeout; nodes alive afterwards). Everything it started is stopped."""
        with open(self.work / "intruder.log", "w") as out:
            proc = subprocess.Popen(
                [
                    str(BIN / "ray"),
                    "start",
                    "--block",
                    "--address",
                    f"127.0.0.1:{self.gcs_port}",
                    "--node-ip-address",
                    "127.0.0.1",
                    "--num-cpus",
                    "1",
                    "--disable-usage-stats",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        alive = len(self.nodes())
        with contextlib.suppress(*GONE):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(*GONE):
            proc.wait(timeout=10)
        return code, alive

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(*GONE):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 30
        for proc in self.procs:
            with contextlib.suppress(*GONE):
                proc.wait(timeout=max(1, deadline - time.time()))
        # Anything still running that belongs to this cluster (its session dir is under our temp dir).
        for proc in self.procs:
            with contextlib.suppress(*GONE):
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in leftover_pids(self.work):
            with contextlib.suppress(*GONE):
                os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def leftover_pids(work: Path) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(work).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def submit(
    cluster: Cluster, job_id: str, entry: list[str], runtime_env: dict, env: dict | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--submission-id",
        job_id,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        *entry,
    ]
    for attempt in range(6):
        out = subprocess.run(cmd, env=env or cluster.env, capture_output=True, text=True, timeout=timeout)
        # The job server answers 500 "No available agent to submit job, please try again later" while the
        # head's dashboard agent is still starting (or busy on a loaded machine): what `ray job submit` users
        # do, retry.
        if "try again later" not in out.stderr:
            return out
        say(f"job server not ready (attempt {attempt + 1}): retrying in 10 s")
        time.sleep(10)
    return out


def job_status(cluster: Cluster, job_id: str) -> str:
    """The job's status from the job server (JobSubmissionClient, authenticated with RAY_AUTH_TOKEN)."""
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(cluster.dashboard).get_job_status(job_id).value)


def run_job(cluster: Cluster, job_id: str, entry: list[str], runtime_env: dict, what: str) -> str:
    """`ray job submit` (blocks, streams the job's output); the job must end SUCCEEDED. Returns its log."""
    from ray.job_submission import JobSubmissionClient

    out = submit(cluster, job_id, entry, runtime_env)
    print(out.stdout[-3000:], out.stderr[-3000:], flush=True)
    status = job_status(cluster, job_id)
    check(
        out.returncode == 0 and status == "SUCCEEDED",
        f"{what} job SUCCEEDED (submit rc {out.returncode}, status {status})",
        out.stdout + out.stderr,
    )
    return JobSubmissionClient(cluster.dashboard).get_job_logs(job_id)


def check_training_log(checkpoint: str, logs: str, epochs: int) -> None:
    """The run ended calibrated (a temperature in the checkpoint's distcls.json, the job log's `calibration:`
    line says so) and each epoch's line is in the job log once (rank 0 prints it)."""
    from distcls import read_checkpoint_meta

    meta = read_checkpoint_meta(checkpoint)
    temperature = (meta.get("calibration") or {}).get("temperature")
    said = next((line.strip() for line in logs.splitlines() if line.startswith("calibration:")), "none")
    check(
        temperature is not None and "temperature" in said,
        f"the checkpoint is calibrated (temperature {temperature}; the job log's line: {said[:100]})",
        logs,
    )
    for epoch in range(1, epochs + 1):
        lines = [line for line in logs.splitlines() if f"epoch {epoch}/{epochs} " in line and "train_loss" in line]
        check(lines != [], f"epoch {epoch}'s line is in the job log", logs)
        # A restarted epoch (--lost-node) is printed again by its new rank 0, from another process.
        pids = [line.split("pid=", 1)[-1].split(")", 1)[0] for line in lines]
        check(len(set(pids)) == len(pids), f"epoch {epoch}'s line shows once per process ({len(lines)} lines)", logs)


def check(ok: bool, what: str, details: str = "") -> None:
    if not ok:
        raise SystemExit(f"[two-nodes] FAILED, expected: {what}\n{details[-4000:]}")
    say(f"ok: {what}")


def train_command(args: argparse.Namespace, name: str, epochs: int, *extra: str) -> list[str]:
    """`python jobs/train.py ...` on the bucket's Fashion-MNIST slice, run `name`; `extra`: more flags."""
    return [
        "python",
        "jobs/train.py",
        "--config",
        "jobs/configs/train.yaml",
        "--data",
        f"{BUCKET}/fmnist/train",
        "--val-data",
        f"{BUCKET}/fmnist-test/test",
        "--image-size",
        str(args.image_size),
        "--epochs",
        str(epochs),
        "--no-use-gpu",
        "--storage",
        f"{BUCKET}/runs",
        "--name",
        name,
        *extra,
    ]


def start_job(cluster: Cluster, job_id: str, entry: list[str], runtime_env: dict):
    """Submit without waiting (JobSubmissionClient): (the client, the job id)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    for attempt in range(6):
        try:
            env = {**runtime_env, "working_dir": str(ROOT)}
            return client, client.submit_job(entrypoint=" ".join(entry), submission_id=job_id, runtime_env=env)
        except RuntimeError as exc:  # 500 "No available agent ..., please try again later": retry, as in submit()
            if "try again later" not in str(exc) or attempt == 5:
                raise
            time.sleep(10)
    raise AssertionError("unreachable")


def wait_running(client, job: str, until, what: str, timeout: float = 600) -> None:
    """Poll until `until()` holds; the job must still be RUNNING then."""
    deadline = time.time() + timeout
    while time.time() < deadline and not client.get_job_status(job).is_terminal() and not until():
        time.sleep(0.5)
    status = str(client.get_job_status(job).value)
    check(status == "RUNNING" and until(), f"{what} (job status {status})", client.get_job_logs(job))


def finish_job(client, job: str, since: float, what: str, timeout: float = 900) -> str:
    """Wait for the job to end; it must have SUCCEEDED. Returns its log."""
    deadline = time.time() + timeout
    while time.time() < deadline and not client.get_job_status(job).is_terminal():
        time.sleep(2)
    status, logs = str(client.get_job_status(job).value), client.get_job_logs(job)
    print(logs[-3000:], flush=True)
    check(
        status == "SUCCEEDED", f"training job SUCCEEDED {time.perf_counter() - since:.0f}s after {what} (status {status})", logs
    )
    return logs


def lose_second_node(cluster: Cluster) -> float:
    """SIGKILL the second node's raylet and wait until the cluster has 1 node; returns when it was killed."""
    killed_at = time.perf_counter()
    pid = cluster.kill_second_raylet()
    deadline = time.time() + 120
    while time.time() < deadline and len(cluster.nodes()) != 1:
        time.sleep(1)
    check(
        len(cluster.nodes()) == 1,
        f"second node lost (raylet pid {pid} SIGKILLed; 1 node alive after {time.perf_counter() - killed_at:.0f}s)",
    )
    return killed_at


def lose_a_node(cluster: Cluster, runtime_env: dict, args: argparse.Namespace) -> None:
    """A 3-epoch training job (STRICT_SPREAD: one worker per node, --max-failures 2); once epoch 1's checkpoint
    exists, the second node's raylet is SIGKILLed (the node and its worker are gone) and a replacement node
    joins, as an autoscaler would start one. The job must finish from the last checkpoint."""
    from distcls import storage

    run = f"{BUCKET}/runs/lost-node"
    flags = ["--batch-size", "16", "--num-workers", "2", "--placement-strategy", "STRICT_SPREAD", "--max-failures", "2"]
    client, job = start_job(cluster, "train-lost-node", train_command(args, "lost-node", 3, *flags, "--keep", "3"), runtime_env)
    say("submitted a 3-epoch training job (STRICT_SPREAD, --max-failures 2); waiting for epoch 1's checkpoint")

    def checkpoints() -> list[str]:
        return [p for p in storage.list_files(run) if "/checkpoint_" in p] if storage.exists(run) else []

    wait_running(client, job, lambda: bool(checkpoints()), "training still running after its first checkpoint")
    killed_at = lose_second_node(cluster)
    cluster.start_second()
    check(len(cluster.nodes()) == 2, f"a replacement node joined {time.perf_counter() - killed_at:.0f}s after the loss")
    logs = finish_job(client, job, killed_at, "the node was lost")
    result = json.loads(storage.read_text(f"{run}/result.json"))
    epochs = [h["epoch"] for h in result["epochs"]]
    restored = [h.get("restored_from_epoch") for h in result["epochs"]]  # 0: fresh; N: restored from epoch N
    check(
        epochs == [1, 2, 3] and restored[0] == 0 and restored[-1] >= 1,
        f"epochs {epochs}; restarted from its checkpoint (restored_from_epoch per epoch: {restored})",
        logs,
    )
    check_training_log(result["checkpoint"], logs, epochs=3)


FAULT_EPOCHS = 3
# What `ray drain-node` tells Ray: the node is force-killed after this many seconds. Clouds give 30-120 s; on this
# machine, loaded, a step takes seconds and the notice is asked for every 10 steps, so the drill gives more.
DRAIN_DEADLINE_S = 300


def elastic_job(cluster: Cluster, runtime_env: dict, args: argparse.Namespace, name: str, *flags: str):
    """Submit a 3-epoch elastic job (--num-workers 1,2; a worker takes all but one of its node's CPUs, so a node
    holds one worker and Ray Data the last CPU; batch 4 for 25 steps an epoch at 20 images per class) that logs
    the sample ids each worker trains on into a folder. Returns (client, job id, that folder)."""
    consumed = cluster.work / f"consumed-{name}"
    consumed.mkdir()
    elastic = ["--batch-size", "4", "--num-workers", "1,2", "--cpus-per-worker", str(args.cpus_per_node - 1)]
    elastic += ["--placement-strategy", "STRICT_SPREAD", "--checkpoint-every-minutes", "0", "--keep", "3", "--seed", "0"]
    env = {**runtime_env, "env_vars": {**runtime_env["env_vars"], CONSUMPTION_ENV: str(consumed)}}
    client, job = start_job(cluster, f"train-{name}", train_command(args, name, FAULT_EPOCHS, *elastic, *flags), env)
    return client, job, consumed


def worker_line(line: str) -> str:
    """A job log line without Ray's colored `(RayTrainWorker pid=...)` prefix."""
    return line.rsplit("\x1b[0m", 1)[-1].strip() if "pid=" in line else line.strip()


def failure_decisions(cluster: Cluster, name: str) -> list[str]:
    """Ray Train's failure policy decisions in run `name`, from its controller's log on the head: e.g.
    `RETRY, source preemption, count 1 of inf` (a preemption has its own count, apart from --max-failures')."""
    found = []
    for log in sorted((cluster.work / "ray" / "session_latest" / "logs" / "train").glob("ray-train-sys-controller-*.log")):
        text = log.read_text()
        if f'"run_name": "{name}"' not in text:
            continue
        for m in re.finditer(r"\[FailurePolicy\] (\w+)\\n  Source: ([\w ]+)\\n  Error count: (\d+) \(max allowed: (\w+)\)", text):
            found.append(f"{m[1]}, source {m[2]}, count {m[3]} of {m[4]}")
    return found


def consumed_ids(folder: Path, epoch: int) -> list[str]:
    """The sample ids the workers trained on in `epoch` (0-based), every worker group, repeats included."""
    return [line for f in sorted(folder.glob(f"epoch-{epoch}-rank-*.txt")) for line in f.read_text().split()]


def registered_step_checkpoint(run: str) -> tuple[str, dict] | None:
    """The checkpoint Ray Train would restore now, (its name, its metrics), if it is a mid-epoch one."""
    from distcls import read_checkpoint_meta, storage

    try:  # Ray Train's record of the checkpoints it registered: the latest is what a restart restores
        snapshot = json.loads(storage.read_text(storage.join_uri(run, "checkpoint_manager_snapshot.json")))
        latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    except Exception:  # not written yet, or being rewritten
        return None
    if not isinstance(latest, str):
        return None
    metrics = read_checkpoint_meta(storage.join_uri(run, latest))["metrics"]
    return (latest, metrics) if metrics.get("mid_epoch") else None


def check_shrunk_run(name: str, logs: str, consumed: Path, args: argparse.Namespace) -> dict:
    """The job ended on one worker after starting on two: the resize is in the log and in result.json, every
    epoch's metrics say their worker count, and every epoch trained on every sample (the consumption log)."""
    from distcls import storage

    result = json.loads(storage.read_text(f"{BUCKET}/runs/{name}/result.json"))
    resized = [worker_line(line) for line in logs.splitlines() if "resized: 2 -> 1 workers" in line]
    check(resized != [], f"the job log says it shrank: {resized[0] if resized else 'no resized line'}", logs)
    sizes = [(r["from_workers"], r["to_workers"]) for r in result["resizes"]]
    epochs = [(h["epoch"], h["workers"]) for h in result["epochs"]]
    check(
        sizes == [(2, 1)] and [e for e, _ in epochs] == list(range(1, FAULT_EPOCHS + 1)) and epochs[-1][1] == 1,
        f"result.json: resizes {result['resizes']}; (epoch, workers) {epochs}",
        logs,
    )
    n = 10 * args.train_per_class
    for epoch in range(FAULT_EPOCHS):
        ids = consumed_ids(consumed, epoch)
        check(
            len(set(ids)) == n,
            f"epoch {epoch + 1} trained on all {n} samples ({len(set(ids))} distinct, {len(ids) - len(set(ids))} repeated)",
        )
    check_training_log(result["checkpoint"], logs, epochs=FAULT_EPOCHS)
    return result


def preempt(cluster: Cluster, runtime_env: dict, args: argparse.Namespace) -> None:
    """Preemption: a third into epoch 1 the second node is drained for preemption (`ray drain-node`, what KubeRay
    and the autoscalers do on a spot notice). The workers must take a step checkpoint at the notice; then the node
    is killed (the cloud reclaiming it). With --max-failures 0 the job can only finish if Ray Train counts the
    loss as a preemption, not a failure: it must restore that checkpoint and finish on the head's one worker."""
    name = "preempt"
    client, job, consumed = elastic_job(cluster, runtime_env, args, name, "--max-failures", "0")
    n = 10 * args.train_per_class
    say(f"submitted a {FAULT_EPOCHS}-epoch elastic job (--num-workers 1,2, --max-failures 0); waiting for a third of epoch 1")
    wait_running(client, job, lambda: len(consumed_ids(consumed, 0)) >= n // 3, "a third of epoch 1 trained")
    (node,) = [n["node_id"] for n in cluster.nodes() if not n["is_head_node"]]
    drain = [str(BIN / "ray"), "drain-node", "--address", f"127.0.0.1:{cluster.gcs_port}", "--node-id", node]
    drain += ["--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot"]
    drain += ["--deadline-remaining-seconds", str(DRAIN_DEADLINE_S)]
    out = subprocess.run(drain, env=cluster.env, capture_output=True, text=True, timeout=120)
    drained_at = time.perf_counter()
    check(
        out.returncode == 0, f"`ray drain-node --node-id {node[:8]} --reason DRAIN_NODE_REASON_PREEMPTION` accepted", out.stderr
    )
    found: list = []

    def checkpointed() -> bool:
        if not found and "step checkpoint (preemption)" in client.get_job_logs(job):
            found.extend(registered_step_checkpoint(f"{BUCKET}/runs/{name}") or [])
        return bool(found)

    wait_running(client, job, checkpointed, "a step checkpoint taken at the preemption notice", timeout=DRAIN_DEADLINE_S)
    say(
        f"the preemption step checkpoint {found[0]} ({found[1]['samples_in_epoch']} samples of epoch "
        f"{found[1]['epoch'] + 1}) registered {time.perf_counter() - drained_at:.0f}s after the drain"
    )
    lose_second_node(cluster)
    logs = finish_job(client, job, drained_at, "the drain, with --max-failures 0")
    for text in (
        "preemption notice: node(s) " + node[:8],
        "step checkpoint (preemption)",
        f"resuming from {BUCKET}/runs/{name}/{found[0]}",
    ):
        said = next((worker_line(line) for line in logs.splitlines() if text in line), None)
        check(said is not None, f"the job log says: {said or text}", logs)
    decisions = failure_decisions(cluster, name)
    check(
        any("source preemption" in d for d in decisions) and not any("source worker group" in d for d in decisions),
        "Ray Train charged the loss to preemption, not to --max-failures: " + "; ".join(decisions),
    )
    check_shrunk_run(name, logs, consumed, args)


def elastic(cluster: Cluster, runtime_env: dict, args: argparse.Namespace) -> dict:
    """Elastic workers: the second node is killed mid-epoch, after a step checkpoint; the job (--num-workers 1,2,
    the default --max-failures 3 of a range) must go on with one worker and finish with every epoch complete."""
    name = "elastic"
    client, job, consumed = elastic_job(cluster, runtime_env, args, name, "--checkpoint-every-steps", "5")
    say(f"submitted a {FAULT_EPOCHS}-epoch elastic job (--num-workers 1,2, a step checkpoint every 5 steps)")
    found: list = []

    def checkpointed() -> bool:
        found[:] = registered_step_checkpoint(f"{BUCKET}/runs/{name}") or []
        return bool(found)

    wait_running(client, job, checkpointed, "a mid-epoch step checkpoint registered")
    say(f"step checkpoint {found[0]}: epoch {found[1]['epoch'] + 1}, {found[1]['samples_in_epoch']} samples of it")
    killed_at = lose_second_node(cluster)
    logs = finish_job(client, job, killed_at, "the node was lost")
    say("Ray Train's failure decisions: " + "; ".join(failure_decisions(cluster, name)))
    return check_shrunk_run(name, logs, consumed, args)


def compare(cluster: Cluster, runtime_env: dict, args: argparse.Namespace, shrunk: dict) -> None:
    """The elastic job again (same flags, same seed) on two nodes throughout: both accuracies, printed."""
    cluster.start_second()
    client, job, _ = elastic_job(cluster, runtime_env, args, "undisturbed", "--checkpoint-every-steps", "5")
    say("a replacement node joined; the same job again, undisturbed")
    finish_job(client, job, time.perf_counter(), "it was submitted")
    from distcls import storage

    straight = json.loads(storage.read_text(f"{BUCKET}/runs/undisturbed/result.json"))
    a, b = shrunk["epochs"][-1]["val_accuracy"], straight["epochs"][-1]["val_accuracy"]
    samples, best = (
        straight["epochs"][-1]["val_samples"],
        (shrunk["metrics"]["val_accuracy"], straight["metrics"]["val_accuracy"]),
    )
    say(
        f"measured: final val accuracy {a:.4f} (lost a node) vs {b:.4f} (undisturbed): {100 * (a - b):+.1f} points "
        f"on {samples} validation images; best checkpoints {best[0]:.4f} vs {best[1]:.4f}"
    )


def faults(cluster: Cluster, runtime_env: dict, args: argparse.Namespace) -> None:
    if args.preempt:
        preempt(cluster, runtime_env, args)
        if args.elastic:
            cluster.start_second()
            say("a replacement node joined")
    if args.elastic:
        shrunk = elastic(cluster, runtime_env, args)
        if args.compare:
            compare(cluster, runtime_env, args, shrunk)


def basics(cluster: Cluster, runtime_env: dict, env: dict, args: argparse.Namespace) -> None:
    """Steps 3-6 of the module docstring: refused clients, the training and labeling jobs, --lost-node, refused
    nodes."""
    from distcls import read_labels, storage

    nodes = cluster.nodes()
    # The refused clients are told nothing of token auth (no RAY_AUTH_MODE, no token) or hold a wrong
    # token: either way the cluster itself (job server, GCS) must refuse them, not the client's own check.
    no_auth_env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    for what, bad_env in (("no token", no_auth_env), ("a wrong token", {**env, "RAY_AUTH_TOKEN": "0" * 64})):
        out = submit(cluster, f"refused-{secrets.token_hex(3)}", ["python", "-c", "print('hi')"], {}, env=bad_env, timeout=120)
        said = (out.stderr or out.stdout).strip()
        check(
            out.returncode != 0,
            f"`ray job submit` with {what} is refused ({said.splitlines()[-1][:120] if said else 'no output'})",
            out.stdout + out.stderr,
        )

    flags = ["--batch-size", "16", "--num-workers", "2", "--placement-strategy", "STRICT_SPREAD", "--max-failures", "0"]
    say("ray job submit --working-dir . -- python jobs/train.py ... --placement-strategy STRICT_SPREAD")
    logs = run_job(cluster, "train-two-nodes", train_command(args, "two-nodes", 1, *flags), runtime_env, "training")
    result = json.loads(storage.read_text(f"{BUCKET}/runs/two-nodes/result.json"))
    checkpoint = result["checkpoint"]
    check(storage.exists(storage.join_uri(checkpoint, "model.safetensors")), f"checkpoint at {checkpoint}")
    check_training_log(checkpoint, logs, epochs=1)
    workers = result["metrics"]["worker_nodes"].split(",")
    alive = {n["node_id"] for n in nodes}
    check(
        len(set(workers)) == 2 and set(workers) <= alive,
        "the 2 training workers ran on 2 different nodes: " + ", ".join(f"rank {r} on {w[:8]}" for r, w in enumerate(workers)),
    )

    label = ["python", "jobs/label.py", "--checkpoint", checkpoint, "--input", f"{BUCKET}/fmnist-test/test"]
    label += ["--output", f"{BUCKET}/labels", "--concurrency", "1", "--batch-size", "16"]
    say("ray job submit --working-dir . -- python jobs/label.py ...")
    run_job(cluster, "label-two-nodes", label, runtime_env, "labeling")
    rows = read_labels(f"{BUCKET}/labels", columns=["path"]).num_rows
    check(rows == 10 * args.test_per_class, f"{rows} label rows, one per test image")
    if args.lost_node:
        lose_a_node(cluster, runtime_env, args)
    # Last: after a refused join attempt the job server was seen answering "No available agent" for
    # minutes (Ray 2.60), so the jobs above run first.
    for what, bad_env in (("no token", no_auth_env), ("a wrong token", {**env, "RAY_AUTH_TOKEN": "0" * 64})):
        code, alive_after = cluster.try_to_join(bad_env)
        log = (cluster.work / "intruder.log").read_text()
        reason = next(
            (line.strip() for line in reversed(log.splitlines()) if "auth" in line.lower() or "token" in line.lower()),
            "no reason printed",
        )
        check(
            alive_after == 2 and code != 0,
            f"a node joining with {what} is refused (`ray start` exit {code}, {alive_after} nodes alive: {reason[:110]})",
            log,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-per-class", type=int, default=20, help="Fashion-MNIST training images per class")
    parser.add_argument("--test-per-class", type=int, default=5, help="test images per class (labeled by the job)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--cpus-per-node",
        type=int,
        default=None,
        help="logical CPUs each node advertises (default: 2; 3 with --preempt/--elastic)",
    )
    parser.add_argument(
        "--lost-node",
        action="store_true",
        help="then kill the second node's raylet during a training job (--max-failures 2); "
        "the job must finish from its last checkpoint on the surviving node",
    )
    parser.add_argument(
        "--preempt",
        action="store_true",
        help="instead of steps 3-6: drain the second node for preemption mid-epoch (`ray drain-node`), then kill it; "
        "an elastic job (--num-workers 1,2, --max-failures 0) must restore its preemption step checkpoint and finish on one",
    )
    parser.add_argument(
        "--elastic",
        action="store_true",
        help="instead of steps 3-6: kill the second node after a mid-epoch step checkpoint; the elastic job "
        "(--num-workers 1,2) must finish on one worker with every epoch complete",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="with --elastic: also run the same job (same seed) on two nodes undisturbed and print both accuracies",
    )
    args = parser.parse_args(argv)
    if args.compare and not args.elastic:
        parser.error("--compare needs --elastic (it compares the elastic run with an undisturbed one)")
    if args.cpus_per_node is None:
        args.cpus_per_node = 3 if (args.preempt or args.elastic) else 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from distcls.tools.config import FashionMnistConfig
    from distcls.tools.fmnist import write_fashion_mnist
    from distcls.tools.s3server import S3Server, restore_env, use_server_env

    work = Path(tempfile.mkdtemp(prefix="distcls-2n-"))
    token = secrets.token_hex(32)
    started = time.perf_counter()
    with S3Server(port=0) as s3:
        previous = use_server_env(s3)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)  # this process queries job status
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=token,
            HOME=str(work / "home"),
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )  # `python` in jobs = this venv's
        (work / "home").mkdir()
        cluster = Cluster(work, env, args.cpus_per_node)
        try:
            say(
                f"S3 server on {s3.endpoint_url}; writing Fashion-MNIST ({args.train_per_class}/class train, "
                f"{args.test_per_class}/class test)"
            )
            for out, per_class, split in (
                ("fmnist", args.train_per_class, "train"),
                ("fmnist-test", args.test_per_class, "test"),
            ):
                write_fashion_mnist(
                    FashionMnistConfig(out=f"{BUCKET}/{out}", limit_per_class=per_class, splits=(split,)), progress=False
                )
            say(f"starting a head and a second node (token auth, dashboard {cluster.dashboard}) in {work}")
            cluster.start()
            nodes = cluster.nodes()
            check(len(nodes) == 2, f"2 nodes alive: {', '.join(n['node_id'][:8] for n in nodes)}")
            # Only the endpoint travels in the jobs' runtime env (which Ray logs and its jobs API returns); the
            # bucket's credentials are in each node's own environment, as on a real cluster.
            runtime_env = {"env_vars": {"AWS_ENDPOINT_URL": s3.endpoint_url}}
            if args.preempt or args.elastic:
                faults(cluster, runtime_env, args)
            else:
                basics(cluster, runtime_env, env, args)
        finally:
            say("stopping both nodes")
            cluster.stop()
            restore_env(previous)
    left = leftover_pids(work)
    shutil.rmtree(work, ignore_errors=True)
    check(not left, "no process of this cluster is left", str(left))
    say(f"all checks passed in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

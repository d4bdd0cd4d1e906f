"""A Ray cluster of several nodes on one machine: a head and worker nodes, each its own `ray start` (its own raylet,
object store, temp dir and ports, all on 127.0.0.1), token authentication on, and a way to lose a worker node
the way a machine is lost: SIGKILL to its raylet and every process it started, at once.

Used by tests/e2e/test_multinode.py and benchmarks/multinode.py. Each node is started from the venv's `ray` in a
session of its own (start_new_session), so a node's processes are those of its session plus any that name its temp
dir; nothing else on the machine is touched (never `ray stop`, which ends every Ray on the machine).

    with LocalCluster(base, env={"AWS_...": ...}) as cluster:
        cluster.start_head(num_cpus=0)
        a = cluster.add_worker("worker-1", num_cpus=4, resources={"worker_node": 2})
        cluster.wait_for_nodes(2)
        ... cluster.submit(...) ...
        cluster.kill(a)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
# How fast the head declares a silent node dead: Ray's defaults (a health check every 3 s, dead after 5 misses of
# up to 10 s) take 15-65 s; a test wants seconds. These are Ray's own settings, passed to the head only.
FAST_FAILURE_DETECTION = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                          "health_check_failure_threshold": 3}
START_ATTEMPTS = 3  # `ray start` of a worker node, when Ray's own 30 s registration wait runs out
START_SECONDS = 240  # a node measured 5-30 s to come up here; minutes while other jobs load the 2 cores
# `ray start` for a worker node on loopback. Ray turns a GCS address of 127.0.0.1 into the machine's routable address
# before it connects (services.resolve_ip_for_localhost: right for a real cluster, where nodes are other machines),
# and the head, bound to 127.0.0.1, is not there. Ray's own CLI, with that one function made the identity.
RAY_START_ON_LOOPBACK = (
    "import sys, ray._private.services as services; services.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)


def kill_what_is_left(process: subprocess.Popen, left: Callable[[], list], wait: float = 5) -> None:
    """After a SIGTERM to a blocking `ray start`: wait for it, then SIGKILL the processes `left()` still names (for up
    to 15 s), and the `ray start` itself if it is still there."""
    try:
        process.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        procs = left()
        if not procs:
            break
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=5)
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def clean_env() -> dict[str, str]:
    """This process's environment without Ray or AWS settings (a test session's own Ray sets RAY_* variables), with
    the venv's bin first on PATH (a job's `python` is the venv's, as on a cluster node) and this checkout first on
    PYTHONPATH, so that every node's workers import this engine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def http(url: str, token: str | None = None, timeout: float = 10, data: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@dataclass
class Node:
    name: str
    temp_dir: Path
    process: subprocess.Popen
    log_path: Path
    resources: dict = field(default_factory=dict)
    killed_at: float | None = None

    def pids(self) -> list[psutil.Process]:
        """The node's processes: its session (raylet, object store, agents, workers), plus anything that names its
        temp dir on its command line (a process that left the session)."""
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.pid == os.getpid():
                    continue
                if (proc.pid == self.process.pid or os.getsid(proc.pid) == self.process.pid
                        or str(self.temp_dir) in " ".join(proc.info["cmdline"] or ())):
                    found.append(proc)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return found

    def owns(self, pid: int) -> bool:
        """Whether process `pid` belongs to this node (its session, or a child of one of its processes)."""
        try:
            proc = psutil.Process(pid)
            chain = [proc, *proc.parents()]
            return any(p.pid == self.process.pid or os.getsid(p.pid) == self.process.pid for p in chain)
        except (psutil.Error, ProcessLookupError):
            return False


class LocalCluster:
    """Start with start_head(), add_worker(); end with stop() (or use it as a context manager)."""

    def __init__(self, base: Path | None = None, *, env: dict[str, str] | None = None, token: str | None = None,
                 system_config: dict | None = None):
        # short: Ray's socket paths (under each temp dir) must stay under 107 characters
        self.base = Path(base) if base is not None else Path(__import__("tempfile").mkdtemp(prefix="rn-", dir="/tmp"))
        self.token = token or secrets.token_hex(32)
        self.env = clean_env() | (env or {}) | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.system_config = FAST_FAILURE_DETECTION if system_config is None else system_config
        self.head: Node | None = None
        self.workers: list[Node] = []
        self.gcs_address = ""
        self.dashboard = ""

    # --- starting --------------------------------------------------------------------------------------------
    def _start(self, name: str, args: list[str], env: dict[str, str], resources: dict | None) -> Node:
        temp_dir = self.base / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.base / f"{name}.log"
        node_manager, object_manager, agent_http, agent_grpc, metrics, runtime_env = free_ports(6)
        command = [sys.executable, "-c", RAY_START_ON_LOOPBACK, "start", "--block", "--node-ip-address=127.0.0.1", f"--node-name={name}",
                   f"--temp-dir={temp_dir}", f"--node-manager-port={node_manager}",
                   f"--object-manager-port={object_manager}", f"--dashboard-agent-listen-port={agent_http}",
                   f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                   f"--runtime-env-agent-port={runtime_env}", "--min-worker-port=0", "--max-worker-port=0",
                   "--disable-usage-stats", f"--resources={json.dumps(resources or {})}", *args]
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       cwd=temp_dir)
        return Node(name, temp_dir, process, log_path, dict(resources or {}))

    def start_head(self, *, num_cpus: float = 0, resources: dict | None = None, object_store_bytes: int = 200_000_000) -> Node:
        gcs, dashboard, client = free_ports(3)
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps the head's --node-ip-address=127.0.0.1 as given (Ray otherwise
        # swaps it for the machine's routable address and listens on every interface); worker nodes refuse that
        # mode, and are given 127.0.0.1 explicitly.
        env = self.env | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        args = ["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", f"--num-cpus={num_cpus}",
                f"--object-store-memory={object_store_bytes}"]
        if self.system_config:
            args.append(f"--system-config={json.dumps(self.system_config)}")
        self.head = self._start("head", args, env, resources)
        self.gcs_address, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + START_SECONDS
        while True:  # the job API answers once the dashboard and its job module are up
            try:
                if http(f"{self.dashboard}/api/jobs/", self.token, timeout=3)[0] == 200:
                    break
            except OSError:
                pass
            self._check_alive(self.head, deadline)
            time.sleep(0.5)
        return self.head

    def add_worker(self, name: str, *, num_cpus: float = 2, resources: dict | None = None,
                   object_store_bytes: int = 200_000_000, wait: bool = True) -> Node:
        args = [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_bytes}"]
        for attempt in range(1, START_ATTEMPTS + 1):
            node = self._start(name, args, self.env, resources)
            if not self._gave_up_registering(node) or attempt == START_ATTEMPTS:
                break
            # Ray's `ray start` waits a fixed 30 s for its raylet to register with the GCS; on 2 cores busy with the
            # rest of the test session it can give up first. Clear what it left and start the node again.
            self.kill(node)
        self.workers.append(node)
        if wait:
            self.wait_for_nodes(1 + len(self.alive_workers()))
        return node

    def _gave_up_registering(self, node: Node, grace: float = 60.0) -> bool:
        """Whether `ray start` exited within `grace` s because its raylet did not register in time."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                return "timed out during startup" in node.log_path.read_text(errors="replace")
            try:
                if any(n["node_name"] == node.name and n["state"] == "ALIVE" for n in self.nodes()):
                    return False
            except (OSError, RuntimeError):  # the head's API is slow to answer under load: ask again
                pass
            time.sleep(0.5)
        return False

    def _check_alive(self, node: Node, deadline: float) -> None:
        if node.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Ray node {node.name} did not come up (exit {node.process.poll()}):\n"
                               f"{node.log_path.read_text(errors='replace')[-3000:]}")

    def alive_workers(self) -> list[Node]:
        return [n for n in self.workers if n.killed_at is None]

    def nodes(self) -> list[dict]:
        """The cluster's nodes as the head's state API lists them (alive and dead)."""
        status, body = http(f"{self.dashboard}/api/v0/nodes?limit=100&detail=1", self.token)
        if status != 200:
            raise RuntimeError(f"the head's node list answered {status}: {body[:500]}")
        return json.loads(body)["data"]["result"]["result"]

    def wait_for_nodes(self, alive: int, timeout: float = START_SECONDS) -> list[dict]:
        """Until exactly `alive` nodes are alive (a killed node counted out by the head, a new one registered)."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.nodes()
            if sum(n["state"] == "ALIVE" for n in nodes) == alive:
                return nodes
            for node in self.alive_workers():
                self._check_alive(node, deadline)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{alive} nodes not alive after {timeout} s: {[(n['node_name'], n['state']) for n in nodes]}")
            time.sleep(0.5)

    # --- losing a node ---------------------------------------------------------------------------------------
    def kill(self, node: Node) -> int:
        """SIGKILL the node: its `ray start`, raylet, object store, agents and workers, at once (a machine lost,
        not a shutdown: nothing is told to stop). Returns how many processes were killed."""
        victims = node.pids()
        node.killed_at = time.time()
        for proc in victims:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=10)
        for left in node.pids():  # a worker forked while the others died
            try:
                left.kill()
            except psutil.Error:
                pass
        node.process.wait(timeout=10)
        return len(victims)

    def node_of(self, pid: int) -> Node | None:
        for node in [self.head, *self.workers]:
            if node is not None and node.killed_at is None and node.owns(pid):
                return node
        return None

    # --- jobs ------------------------------------------------------------------------------------------------
    def submit(self, working_dir: Path, entrypoint: list[str], *, submission_id: str, home: Path,
               timeout: float = 300, no_wait: bool = False) -> subprocess.CompletedProcess | subprocess.Popen:
        """`ray job submit` with the token (HOME set apart: no ~/.ray/auth_token of this machine's user is used)."""
        env = clean_env() | {"HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        command = [str(RAY), "job", "submit", "--address", self.dashboard, "--working-dir", str(working_dir),
                   "--submission-id", submission_id, "--", *entrypoint]
        if no_wait:
            return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=working_dir, start_new_session=True)
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=working_dir)

    def job(self, submission_id: str) -> dict:
        status, body = http(f"{self.dashboard}/api/jobs/{submission_id}", self.token)
        if status != 200:
            raise RuntimeError(f"job {submission_id}: {status} {body[:300]}")
        return json.loads(body)

    def stop_job(self, submission_id: str) -> None:
        """Stop a job that is still running (nothing happens to one that ended)."""
        if self.job(submission_id)["status"] in ("PENDING", "RUNNING"):
            http(f"{self.dashboard}/api/jobs/{submission_id}/stop", self.token, data=b"")

    def job_logs(self, submission_id: str) -> str:
        status, body = http(f"{self.dashboard}/api/jobs/{submission_id}/logs", self.token)
        return json.loads(body).get("logs", "") if status == 200 else body

    # --- stopping --------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """SIGTERM each node's blocking `ray start` (it stops its processes), then SIGKILL what is left."""
        nodes = [n for n in [*self.workers, self.head] if n is not None]
        for node in nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in nodes:
            kill_what_is_left(node.process, node.pids, wait=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

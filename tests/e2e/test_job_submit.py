"""`ray job submit` to a real local Ray head with token authentication (RAY_AUTH_MODE=token, Ray >= 2.52).

The head is started from .venv's `ray` on 127.0.0.1 with its own temp dir and ports, so nothing else on the
machine is touched, and stopped by ending its own processes (never `ray stop`, which ends every Ray on the
machine). A submission without the token, or with a wrong one, is refused; one with the token runs
`python -m engine run` on a small working dir (job file and notes) and the output holds every
(note, question) exactly once.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import APIXABAN_JOB, ROOT, SAMPLE_NOTES
from ray_nodes import free_ports, kill_what_is_left

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
NOTES = 4
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@dataclass(frozen=True)
class Head:
    dashboard: str
    token: str
    temp_dir: Path
    process: subprocess.Popen


def clean_env() -> dict[str, str]:
    """No Ray or AWS settings of this process (the session's own Ray sets RAY_* variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is .venv's, as on a cluster node
    return env


def head_processes(head_pid: int, temp_dir: Path) -> list[psutil.Process]:
    """The head's processes: its session, plus anything that names its own temp dir (workers that moved away)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid == head_pid or os.getsid(proc.pid) == head_pid or str(temp_dir) in " ".join(proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def stop_head(process: subprocess.Popen, temp_dir: Path) -> None:
    """SIGTERM the blocking `ray start` (it stops its processes), then SIGKILL whatever of this head is left."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    kill_what_is_left(process, lambda: [p for p in head_processes(process.pid, temp_dir) if p.pid != os.getpid()])


def http(url: str, token: str | None = None, timeout: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.fixture(scope="module")
def head():
    base = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # short: Ray's socket paths live under it
    temp_dir = base / "ray"  # where ray.init finds it with RAY_TMPDIR=base (see the private-Ray test)
    temp_dir.mkdir()
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env = free_ports(7)
    token = secrets.token_hex(32)
    env = clean_env()
    # Token authentication; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps --node-ip-address=127.0.0.1 as given (Ray
    # otherwise swaps it for the machine's routable address and listens on every interface).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    log = open(temp_dir / "head.log", "w")
    process = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", "--num-cpus=4", "--object-store-memory=300000000",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp_dir)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180  # measured 7-30 s; minutes when the machine is loaded
        while True:  # the job API answers once the dashboard and its job module are up
            try:
                status, _ = http(f"{url}/api/jobs/", token, timeout=3)
                if status == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(f"the Ray head did not come up (exit {process.poll()}):\n{(temp_dir / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield Head(url, token, temp_dir, process)
    finally:
        stop_head(process, temp_dir)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def working_dir(tmp_path_factory) -> tuple[Path, Path]:
    """What `--working-dir` uploads: the job file and the notes, nothing else. Output goes outside it."""
    folder = tmp_path_factory.mktemp("submit-wd")
    output = tmp_path_factory.mktemp("submit-out") / "out"
    pq.write_table(pq.read_table(SAMPLE_NOTES).slice(0, NOTES), folder / "notes.parquet")
    spec = yaml.safe_load(APIXABAN_JOB.read_text())
    spec["input"].update(uri="notes.parquet", limit=None)  # relative: the job's working dir on the cluster
    spec["output"] = {"uri": str(output)}
    spec["model"] = {"backend": "null", "name": "null"}
    spec["batching"] = {"notes_per_shard": 2, "notes_per_batch": 2}
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    return folder, output


def submit(head: Head, working: Path, submission_id: str, *, token: str | None, home: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = clean_env()
    env["HOME"] = str(home)  # no ~/.ray/auth_token of this machine's user is picked up by accident
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return subprocess.run(
        [str(RAY), "job", "submit", "--address", head.dashboard, "--working-dir", str(working),
         "--submission-id", submission_id, "--", "python", "-m", "engine", "run", "job.yaml"],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=working)


def jobs_on(head: Head) -> dict[str, dict]:
    status, body = http(f"{head.dashboard}/api/jobs/", head.token)
    assert status == 200, body
    return {job["submission_id"]: job for job in json.loads(body)}


@pytest.mark.parametrize("token", [None, "wrong"], ids=["no-token", "wrong-token"])
def test_submission_without_the_token_is_refused(head, working_dir, tmp_path, token):
    submission_id = f"refused-{token or 'none'}-{secrets.token_hex(3)}"
    done = submit(head, working_dir[0], submission_id, token=token and "0" * 64, home=tmp_path, timeout=120)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert ("401" in output or "Unauthorized" in output) if token is None else ("403" in output or "Forbidden" in output or "Invalid" in output), output[-2000:]
    assert head.token not in output
    assert submission_id not in jobs_on(head)  # nothing ran
    status, _ = http(f"{head.dashboard}/api/jobs/")  # the REST API itself refuses anonymous callers too
    assert status == 401


def test_submission_with_the_token_runs_the_engine_exactly_once(head, working_dir, tmp_path, apixaban_job):
    folder, output = working_dir
    submission_id = f"engine-{secrets.token_hex(4)}"
    started = time.monotonic()
    done = submit(head, folder, submission_id, token=head.token, home=tmp_path)
    seconds = time.monotonic() - started
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-4000:]
    job = jobs_on(head)[submission_id]
    assert job["status"] == "SUCCEEDED", job
    assert job.get("driver_info"), job  # the driver joined this cluster (a private Ray would not register here)
    assert job["driver_info"]["node_ip_address"] == "127.0.0.1"
    files = sorted((output / "answers").glob("*.parquet"))
    answers = pa.concat_tables([pq.read_table(f) for f in files])
    questions = len(apixaban_job.questions)
    assert answers.num_rows == NOTES * questions
    pairs = answers.group_by(["note_id", "question_id"]).aggregate([([], "count_all")])
    assert pairs.num_rows == NOTES * questions and pc.max(pairs["count_all"]).as_py() == 1
    assert json.loads((output / "report.json").read_text())["notes"] == NOTES
    assert head.token not in logs
    print(f"ray job submit round trip: {seconds:.1f} s")


def test_head_listens_on_loopback_only(head):
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in {p.pid for p in head_processes(head.process.pid, head.temp_dir)}}
    assert listening and {ip for ip, _ in listening} <= LOOPBACK, listening


PRIVATE_RAY_PROBE = """
import json, os, psutil
from engine.runtime import ensure_ray
ensure_ray()
import ray
mine = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
listening = sorted({c.laddr.ip for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in mine})
print(json.dumps({"listening": listening, "node_ip": ray.util.get_node_ip_address(),
                  "gcs": ray.get_runtime_context().gcs_address}))
ray.shutdown()
"""


def test_local_run_starts_a_private_ray_on_loopback(head):
    """A local run (no RAY_ADDRESS) never joins a head started on the machine with `ray start`, even one that
    plain ray.init() would find (this module's head, through RAY_TMPDIR), and its Ray listens on 127.0.0.1 only."""
    env = clean_env()
    env["RAY_TMPDIR"] = str(head.temp_dir.parent)  # ray.init() alone would join the head from here
    assert (head.temp_dir / "ray_current_cluster").exists()
    done = subprocess.run([sys.executable, "-c", PRIVATE_RAY_PROBE], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    head_gcs = (head.temp_dir / "ray_current_cluster").read_text().strip()
    assert probe["gcs"] != head_gcs, probe
    assert probe["node_ip"] == "127.0.0.1"
    assert probe["listening"] and set(probe["listening"]) <= LOOPBACK, probe

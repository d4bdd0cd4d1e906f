"""Ray start-up: join the cluster a `ray job submit` runs in, or start a private local one bound to 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
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


def ensure_ray(verbose: bool = False) -> None:
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        options = ray_init_options(verbose)
        loopback = options["address"] == "local" or _is_loopback(os.environ.get("RAY_ADDRESS", ""))
        with _keep_loopback_ip() if loopback else contextlib.nullcontext():
            ray.init(**options)
    if not verbose:  # Ray Data's INFO lines ("execution finished in ...") are noise next to the engine's summary
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = DataContext.get_current()
    context.target_max_block_size = TARGET_BLOCK_BYTES
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    context.enable_rich_progress_bars = False

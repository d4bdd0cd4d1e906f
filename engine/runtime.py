"""Ray start-up: join the cluster a `ray job submit` runs in, or start a private local one bound to 127.0.0.1."""

from __future__ import annotations

import logging
import os

LOCAL_LOGICAL_CPUS = 8  # fractional actors plus read/parse tasks deadlock on 2-4 logical CPUs (shared/RECIPES.md)
TARGET_BLOCK_BYTES = 32 * 1024 * 1024
WORKER_ENV = {
    "VLLM_LOGGING_LEVEL": "WARNING",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_CONFIGURE_LOGGING": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def ensure_ray(verbose: bool = False) -> None:
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        env = dict(WORKER_ENV)
        for name in ("ENGINE_CACHE", "HF_HOME", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        options = dict(runtime_env={"env_vars": env}, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
        if not os.environ.get("RAY_ADDRESS"):
            options.update(num_cpus=max(LOCAL_LOGICAL_CPUS, os.cpu_count() or 1), include_dashboard=False,
                           object_store_memory=int(os.environ.get("ENGINE_OBJECT_STORE_BYTES", 1 << 30)))
        ray.init(**options)
    if not verbose:  # Ray Data's INFO lines ("execution finished in ...") are noise next to the engine's summary
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = DataContext.get_current()
    context.target_max_block_size = TARGET_BLOCK_BYTES
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    context.enable_rich_progress_bars = False

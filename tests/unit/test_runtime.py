"""engine.runtime: Ray's own start-up lines are quiet unless --verbose; what is not one of them still shows."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from engine import runtime


def test_only_the_announced_log_level_is_dropped_from_stderr(capfd):
    """The connect runs with stderr (file descriptor 2, where C++ writes) captured: the line announcing the level
    is dropped, everything else, C++ or Python, is written out after it."""
    with pytest.raises(RuntimeError, match="connect failed"):
        with runtime._stderr_without(runtime.CORE_LOG_LEVEL_LINE):
            os.write(2, b"[2026-12-05 08:09:27,592 I 1 1] logging.cc:303: Set ray log level from environment variable "
                        b"RAY_BACKEND_LOG_LEVEL to 3\n")
            os.write(2, b"[2026-12-05 08:09:27,600 E 1 1] gcs_client.cc:1: could not reach the GCS\n")
            print("a Python error line", file=sys.stderr)
            raise RuntimeError("connect failed")
    err = capfd.readouterr().err
    assert runtime.CORE_LOG_LEVEL_LINE not in err
    assert "could not reach the GCS" in err and "a Python error line" in err


@pytest.fixture
def ray_up(monkeypatch):
    """ensure_ray against a Ray that is already up (the connect itself is checked by tests/e2e/test_cli_run.py)."""
    import ray
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = {name: getattr(context, name) for name in ("enable_progress_bars", "print_on_execution_start", "target_max_block_size")}
    levels = {name: logging.getLogger(name).level for name in (*runtime.QUIET_LOGGERS, "ray.data")}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(runtime, "_verbose", False)
    yield context
    for name, value in saved.items():
        setattr(context, name, value)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_ray_notices_are_quiet_by_default_and_warnings_still_pass(ray_up):
    runtime.ensure_ray()
    for name in runtime.QUIET_LOGGERS:
        assert not logging.getLogger(name).isEnabledFor(logging.WARNING), name
        assert logging.getLogger(name).isEnabledFor(logging.ERROR), name
    assert logging.getLogger("ray.data").isEnabledFor(logging.WARNING)  # Ray Data's other warnings still show
    assert ray_up.enable_progress_bars is False


def test_verbose_stays_on_for_the_pipelines_own_call(ray_up):
    """The CLI's --verbose calls ensure_ray(verbose=True) first; run_job's plain ensure_ray() keeps it verbose."""
    runtime.ensure_ray(verbose=True)
    runtime.ensure_ray()
    assert ray_up.enable_progress_bars is True and ray_up.print_on_execution_start is True
    for name in runtime.QUIET_LOGGERS:
        assert logging.getLogger(name).level == logging.NOTSET, name  # as Ray configured its "ray" logger

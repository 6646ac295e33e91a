"""`run_workers`' supervision, with stand-in workers (no model, no sockets) in real processes:

* a SIGTERM that arrives while the parent waits to restart a dead worker stops the service: the
  worker is not started again, and the parent exits;
* a worker that keeps dying before it listens makes the parent give up, exit 1 with a clear line,
  instead of restarting it for ever.

The parent runs in a spawned process of its own (run_workers installs signal handlers and blocks);
its log goes to a file the test reads.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from gateway_support import config_for

from milter.gateway import workers

MODE, MARKS = "MILTER_TEST_WORKER_MODE", "MILTER_TEST_WORKER_MARKS"


def fake_worker(
    config: Any, index: int, log_level: int, shared: Any = None, listening: Event | None = None
) -> None:
    """A worker: "crashloop" mode, worker 0 dies before it listens, every time; "restart" mode, only
    the first time. Any other serves (until SIGTERM, whose default action ends it) and goes with its
    parent."""
    first_life = not (Path(os.environ[MARKS]) / f"w{index}").exists()
    (Path(os.environ[MARKS]) / f"w{index}").touch()
    if index == 0 and (os.environ[MODE] == "crashloop" or first_life):
        os._exit(3)
    if listening is not None:
        listening.set()
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    while True:
        time.sleep(1)


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()
    os._exit(0)


def supervise(mode: str, log_path: str, marks: str, restart_delay: float) -> None:
    """The parent: run_workers with the stand-in workers (the children find them by reference)."""
    logging.basicConfig(filename=log_path, level=logging.INFO, format="%(levelname)s %(message)s")
    os.environ[MODE], os.environ[MARKS] = mode, marks
    workers.check_loads = lambda config: None  # type: ignore[assignment]
    workers._worker_main = fake_worker  # type: ignore[assignment]
    workers.RESTART_DELAY = restart_delay
    config = config_for(0, 0, "sqlite://", listen="", workers=2)
    workers.run_workers(config, logging.INFO)


def start_parent(tmp_path: Path, mode: str, restart_delay: float) -> tuple[BaseProcess, Path]:
    log = tmp_path / "parent.log"
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = multiprocessing.get_context("spawn").Process(
        target=supervise, args=(mode, str(log), str(marks), restart_delay)
    )
    proc.start()
    return proc, log


def wait_for_line(log: Path, needle: str, limit: float = 120.0) -> None:
    for _ in range(int(limit / 0.05)):
        if log.exists() and needle in log.read_text():
            return
        time.sleep(0.05)  # polling the parent's log file
    raise AssertionError(f"{needle!r} not logged in time: {log.read_text() if log.exists() else ''}")


def finish(proc: BaseProcess, limit: float) -> int | None:
    """The parent's exit code, or None if it was still running after `limit` s (then it is killed,
    and its workers follow it)."""
    proc.join(limit)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None
    return proc.exitcode


def test_sigterm_while_a_dead_worker_waits_for_its_restart_stops_the_service(tmp_path: Path) -> None:
    proc, log = start_parent(tmp_path, "restart", restart_delay=5.0)
    wait_for_line(log, "worker_died worker=0")  # logged just before the delay
    os.kill(proc.pid or 0, signal.SIGTERM)
    assert finish(proc, 60) == 0, log.read_text()
    text = log.read_text()
    assert "worker_not_restarted worker=0 reason=stopping" in text
    assert text.count("worker_started worker=0") == 1


def test_a_worker_that_keeps_dying_before_it_listens_makes_the_parent_give_up(tmp_path: Path) -> None:
    proc, log = start_parent(tmp_path, "crashloop", restart_delay=0.05)
    assert finish(proc, 120) == 1, log.read_text()
    text = log.read_text()
    assert f"worker_crashloop worker=0 exitcode=3 deaths={workers.MAX_EARLY_DEATHS}" in text
    assert text.count("worker_started worker=0") == workers.MAX_EARLY_DEATHS

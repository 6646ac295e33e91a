"""`milter serve` as a subprocess: refusing a corrupt model, and `kill -9` during a load run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from gateway_support import (
    MODEL,
    QUARANTINE_SENDER,
    ROOT,
    Outcome,
    Sink,
    account,
    make_message,
    open_store,
    send,
)

from milter.features import SCHEMA
from milter.types import CLASS_NAMES

MILTER = [sys.executable, "-c", "from milter.cli import main; main()"]

POLICY_TOML = """
[policy]
subject_prefix = "[SPAM]"
spam = { tag = false, quarantine = false, reject = false }
bec = { tag = false, quarantine = false, reject = false }
[policy.lists]
deny_senders = ["quarantine@sender.test"]
"""


def write_config(tmp_path: Path, listen: int, downstream: int, model: Path) -> Path:
    cfg = tmp_path / "milter.toml"
    cfg.write_text(
        f"""
[model]
path = "{model}"
[server]
listen = "127.0.0.1:{listen}"
downstream = "127.0.0.1:{downstream}"
workers = 1
downstream_timeout = 5.0
[store]
url = "sqlite:///{tmp_path}/gw.db"
"""
        + POLICY_TOML
    )
    return cfg


def start_serve(cfg: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*MILTER, "-v", "serve", "--config", str(cfg), "--metrics-listen", "off"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


async def wait_listening(port: int, proc: subprocess.Popen[bytes], limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        banner = await reader.readline()
        writer.close()
        if banner.startswith(b"220"):
            return
    raise AssertionError("milter serve did not start listening")


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_model_is_refused_at_start(
    tmp_path: Path, free_port: Callable[[], int], workers: int
) -> None:
    """With workers, the check runs in a short-lived child (the parent keeps no model): its error
    still reaches the admin, as the same class and text, and nothing is left listening."""
    model = tmp_path / "broken.onnx"
    model.write_bytes(b"this is not an onnx model")
    # valid metadata for the current schema, so it is the ONNX file itself that is refused
    meta = {
        "name": "broken",
        "schema": {"version": SCHEMA.version, "digest": SCHEMA.digest},
        "class_names": list(CLASS_NAMES),
        "thresholds": {},
    }
    model.with_suffix(".json").write_text(json.dumps(meta))
    cfg = write_config(tmp_path, free_port(), free_port(), model)
    proc = subprocess.run(
        [*MILTER, "serve", "--config", str(cfg), "--metrics-listen", "off", "--workers", str(workers)],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert b"cannot load model " + str(model).encode() in proc.stderr, proc.stderr
    assert b"worker_started" not in proc.stderr and b"Traceback" not in proc.stderr


def test_a_config_error_found_at_load_names_its_key_with_workers(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    cfg = write_config(tmp_path, free_port(), free_port(), MODEL)
    cfg.write_text(cfg.read_text().replace('url = "sqlite:///', 'url = "nosuchdb:///'))
    proc = subprocess.run(
        [*MILTER, "serve", "--config", str(cfg), "--metrics-listen", "off", "--workers", "2"],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert b"store" in proc.stderr.lower() and b"nosuchdb" in proc.stderr, proc.stderr
    assert b"worker_started" not in proc.stderr and b"Traceback" not in proc.stderr


def test_kill_9_during_load_loses_nothing_that_got_250(tmp_path: Path, free_port: Callable[[], int]) -> None:
    listen, sink_port = free_port(), free_port()
    proc = start_serve(write_config(tmp_path, listen, sink_port, MODEL))
    outcomes: list[Outcome] = []

    async def client(worker: int, stop: asyncio.Event, enough: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            sender = QUARANTINE_SENDER if i % 4 == 0 else "alice@sender.test"
            outcomes.append(
                await send(listen, make_message(f"k{worker}-{i}@test"), mail_from=sender, smtp_timeout=10)
            )
            if sum(o.code == 250 for o in outcomes) >= 60:
                enough.set()
            i += 1

    async def main() -> Sink:
        sink = Sink()
        await sink.start(sink_port)
        try:
            await wait_listening(listen, proc)
            stop, enough = asyncio.Event(), asyncio.Event()
            clients = [asyncio.create_task(client(w, stop, enough)) for w in range(8)]
            await enough.wait()
            os.kill(proc.pid, signal.SIGKILL)  # mid-load: sessions are in every state right now
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*clients)
        finally:
            await sink.stop()
        return sink

    try:
        sink = asyncio.run(main())
    finally:
        with_group_killed(proc)
    assert sum(o.code == 250 for o in outcomes) >= 60
    assert any(o.code != 250 for o in outcomes)  # the kill did cut sessions off
    account(outcomes, sink, open_store(f"sqlite:///{tmp_path}/gw.db"))


def with_group_killed(proc: subprocess.Popen[Any]) -> None:
    """Also end the prepare-pool children the killed gateway left behind."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _child_signal_state() -> tuple[bool, bool]:
    """(SIGINT blocked, SIGINT ignored) in the calling process; runs in a prepare process."""
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    return blocked, signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_prepare_processes_are_born_deaf_to_ctrl_c() -> None:
    # Born with SIGINT blocked (a Ctrl-C while the child still imports is not a traceback), then
    # ignoring it once initialised; the gateway's own thread gets its signal mask back.
    from milter.gateway.server import default_prepare_pool

    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())

    async def main() -> tuple[bool, bool]:
        pool = default_prepare_pool(1)()
        try:
            state: tuple[bool, bool] = await asyncio.wait_for(pool.call(_child_signal_state), 60)
            return state
        finally:
            pool.shutdown()

    assert asyncio.run(main()) == (True, True)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before


def test_default_log_and_ctrl_c_on_the_process_group(tmp_path: Path, free_port: Callable[[], int]) -> None:
    """Without -v, serve still logs its start, the providers really used and a line per message;
    Ctrl-C (SIGINT to the whole process group, as a terminal sends it) stops it cleanly: the prepare
    processes leave stopping to the gateway instead of dying with a KeyboardInterrupt each."""
    listen, sink_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [*MILTER, "serve", "--config", str(write_config(tmp_path, listen, sink_port, MODEL)),
             "--metrics-listen", "off"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True,
        )

        async def main() -> Outcome:
            sink = Sink()
            await sink.start(sink_port)
            try:
                await wait_listening(listen, proc)
                return await send(listen, make_message("logged@test"))
            finally:
                await sink.stop()

        try:
            outcome = asyncio.run(main())
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=60) == 0
        finally:
            with_group_killed(proc)
    log = log_path.read_text()
    assert outcome.code == 250
    assert "providers in use: ['CPUExecutionProvider']" in log and " listening " in log
    assert "message_id=<logged@test>" in log and " reply=250" in log
    assert "alembic" not in log and "Traceback" not in log and "KeyboardInterrupt" not in log, log

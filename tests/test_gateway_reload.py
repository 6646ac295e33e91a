"""Hot model reload (SIGHUP): the new model and its thresholds take over, a bad one is refused, and
no message is lost or refused while workers swap models under load."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
from gateway_support import (
    MODEL,
    OFF,
    QUARANTINE_SENDER,
    ROOT,
    TEST_POLICY,
    Outcome,
    Sink,
    account,
    config_for,
    make_message,
    open_store,
    running_gateway,
    send,
)
from test_gateway_serve import MILTER, POLICY_TOML, wait_listening, with_group_killed

from milter.config import ModelConfig
from milter.errors import ModelError
from milter.features import SCHEMA
from milter.gateway.reload import check_probabilities, load_checked

SAMPLES = sorted((ROOT / "fixtures" / "sample").glob("*.eml"))


# -- models --------------------------------------------------------------------------------------


def model_variant(
    directory: Path, name: str, spam_thresholds: dict[str, float] | None = None, onnx: bytes | None = None
) -> Path:
    """A second valid model: the shipped graph with a different ONNX doc_string (so other bytes and
    another sha256), under another name, optionally with other spam thresholds.

    Appending a field to a serialised protobuf message is valid protobuf (for a repeated or singular
    field the last occurrence wins), so this needs no `onnx` package: doc_string is ModelProto field 6,
    wire type 2 (length-delimited)."""
    directory.mkdir(parents=True, exist_ok=True)
    doc = f"variant {name}".encode()
    data = onnx if onnx is not None else MODEL.read_bytes() + bytes([6 << 3 | 2, len(doc)]) + doc
    meta = json.loads(MODEL.with_suffix(".json").read_text())
    meta["name"] = name
    meta["onnx"]["sha256"] = hashlib.sha256(data).hexdigest()
    if spam_thresholds is not None:
        meta["thresholds"]["spam"] = spam_thresholds
    path = directory / f"{name}.onnx"
    path.write_bytes(data)
    path.with_suffix(".json").write_text(json.dumps(meta))
    path.with_suffix(".lgb.txt").write_bytes(MODEL.with_suffix(".lgb.txt").read_bytes())
    path.with_suffix(".tensor.onnx").write_bytes(MODEL.with_suffix(".tensor.onnx").read_bytes())
    return path


def install(model: Path, live: Path) -> None:
    """Make `model` the live one the way the registry does: all staged, then .onnx, the explainer and the
    tensor graph, .json."""
    live.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".onnx", ".lgb.txt", ".tensor.onnx", ".json"):
        src, dst = model.with_suffix(suffix), live.with_suffix(suffix)
        tmp = dst.with_name(f".{dst.name}.tmp")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)


def models_by_message_id(db: Path) -> dict[str, list[str]]:
    """Message-ID (without <>) -> the model of each verdict row recorded for it."""
    out: dict[str, list[str]] = {}
    with sqlite3.connect(db) as conn:
        for mid, model in conn.execute("SELECT message_id, model FROM messages"):
            out.setdefault(str(mid).strip("<>"), []).append(model)
    return out


# -- unit: the smoke check -----------------------------------------------------------------------


def test_check_probabilities_refuses_rows_that_are_not_distributions() -> None:
    check_probabilities("m", np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=np.float32))
    for bad in ([[np.nan, 0.5, 0.5]], [[0.5, 0.5, 0.5]], [[1.2, -0.1, -0.1]], np.zeros((0, 3))):
        with pytest.raises(ModelError):
            check_probabilities("m", np.asarray(bad, dtype=np.float32))


# -- in-process gateway --------------------------------------------------------------------------

# The model's own spam thresholds decide (spam=None); bec is off so only spam scores can act.
MODEL_POLICY = replace(TEST_POLICY, spam=None, bec=OFF)
TAG_EVERYTHING = {"tag": 0.0, "quarantine": 1.0}  # model B: every message's spam score tags it


def headers_of(raw: bytes) -> bytes:
    """The header block without our Authentication-Results, which every relayed message gets on top."""
    head = raw.partition(b"\r\n\r\n")[0]
    ours = re.match(rb"Authentication-Results: gw\.test;.*?\r\n(?![ \t])", head, re.DOTALL)
    return head[ours.end() :] if ours else head  # the field and its folded lines


def test_reload_swaps_model_and_thresholds(tmp_path: Path, free_port: Callable[[], int]) -> None:
    live = tmp_path / "models" / "current.onnx"
    install(model_variant(tmp_path / "a", "model-a"), live)
    model_b = model_variant(tmp_path / "b", "model-b", spam_thresholds=TAG_EVERYTHING)
    url = f"sqlite:///{tmp_path}/gw.db"
    store = open_store(url)
    sink_port = free_port()

    async def main() -> None:
        sink = Sink()
        await sink.start(sink_port)
        cfg = replace(config_for(free_port(), sink_port, url), policy=MODEL_POLICY, model=ModelConfig(live))
        scanner = await asyncio.to_thread(load_checked, live, cfg.policy)
        async with running_gateway(cfg, scanner, store) as gw:
            port = gw.address[1]
            assert (await send(port, make_message("before@test"))).code == 250
            install(model_b, live)
            result = await gw.reload_model()
            assert (result.ok, result.old, result.current) == (True, "model-a", "model-b")
            assert "CPUExecutionProvider" in result.providers
            assert (await send(port, make_message("after@test"))).code == 250
            metrics = gw.metrics.render().decode()
        await sink.stop()
        # model A's thresholds let the ham message through untouched; B's tag-everything ones tag it
        assert b"X-Milter-Verdict" not in headers_of(sink.messages[0].raw)
        assert headers_of(sink.messages[1].raw).startswith(b"X-Milter-Verdict: spam\r\n")
        assert 'milter_model_info{name="model-b"' in metrics
        assert 'milter_model_reloads_total{outcome="ok"} 1.0' in metrics
        assert 'milter_model_reloads_total{outcome="failed"} 0.0' in metrics

    asyncio.run(main())
    rows = models_by_message_id(tmp_path / "gw.db")
    assert rows == {"before@test": ["model-a"], "after@test": ["model-b"]}


def test_bad_replacements_are_refused_and_the_old_model_keeps_serving(
    tmp_path: Path, free_port: Callable[[], int], caplog: pytest.LogCaptureFixture
) -> None:
    live = tmp_path / "models" / "current.onnx"
    model_a = model_variant(tmp_path / "a", "model-a")
    install(model_a, live)
    garbage = model_variant(tmp_path / "g", "garbage", onnx=b"\x08\x07 this is not an onnx model")
    other_schema = model_variant(tmp_path / "s", "other-schema")
    meta = json.loads(other_schema.with_suffix(".json").read_text())
    meta["schema"]["digest"] = "0" * len(SCHEMA.digest)
    other_schema.with_suffix(".json").write_text(json.dumps(meta))
    half_promoted = model_variant(tmp_path / "h", "half-promoted")  # its ONNX beside model-a's JSON
    bad_explainer = model_variant(tmp_path / "e", "bad-explainer")  # its trees text cut short
    text = bad_explainer.with_suffix(".lgb.txt")
    text.write_bytes(text.read_bytes()[: len(text.read_bytes()) // 2])
    url = f"sqlite:///{tmp_path}/gw.db"
    store = open_store(url)
    sink_port = free_port()

    def only_onnx(model: Path) -> None:
        install(model_a, live)  # model-a's JSON, then another model's ONNX over it
        (live.parent / ".tmp").write_bytes(model.read_bytes())
        os.replace(live.parent / ".tmp", live)

    cases: list[tuple[str, Callable[[], None], str]] = [
        ("garbage", lambda: install(garbage, live), "cannot load model"),
        ("schema", lambda: install(other_schema, live), "feature schema"),
        ("half", lambda: only_onnx(half_promoted), "sha256 differs"),
        ("explainer", lambda: install(bad_explainer, live), "explainer"),
    ]

    async def main() -> None:
        sink = Sink()
        await sink.start(sink_port)
        cfg = replace(config_for(free_port(), sink_port, url), model=ModelConfig(live))
        scanner = await asyncio.to_thread(load_checked, live, cfg.policy)
        async with running_gateway(cfg, scanner, store) as gw:
            for label, replace_model, reason in cases:
                replace_model()
                result = await gw.reload_model()
                assert (result.ok, result.current) == (False, "model-a"), label
                assert result.reason is not None and reason in result.reason, result.reason
                out = await send(gw.address[1], make_message(f"{label}@test"))
                assert out.code == 250, out
            metrics = gw.metrics.render().decode()
        await sink.stop()
        assert len(sink.messages) == len(cases)
        assert 'milter_model_info{name="model-a"' in metrics
        assert f'milter_model_reloads_total{{outcome="failed"}} {len(cases)}.0' in metrics

    with caplog.at_level("ERROR", logger="milter.gateway.reload"):
        asyncio.run(main())
    failures = [r.getMessage() for r in caplog.records if "model reload failed" in r.getMessage()]
    assert len(failures) == len(cases)
    assert all(m.startswith("model reload failed, keeping model-a: ") for m in failures)
    rows = models_by_message_id(tmp_path / "gw.db")
    assert rows == {f"{label}@test": ["model-a"] for label, _, _ in cases}


# -- milter serve subprocesses -------------------------------------------------------------------


class LogTail:
    """Collects a subprocess's stderr lines in a thread (an unread pipe would block its logging)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            with self._lock:
                self.lines.append(line.decode(errors="replace").rstrip())

    def matching(self, pattern: str) -> list[str]:
        with self._lock:
            return [line for line in self.lines if re.search(pattern, line)]

    async def wait_for(
        self, pattern: str, count: int, proc: subprocess.Popen[bytes], limit: float = 90
    ) -> None:
        """Until `count` lines match (a deadline only so a broken reload fails instead of hanging)."""
        deadline = time.monotonic() + limit
        while len(self.matching(pattern)) < count:
            assert proc.poll() is None, "\n".join(self.lines[-30:])
            assert time.monotonic() < deadline, f"waited for {count} x {pattern!r}:\n" + "\n".join(
                self.lines[-30:]
            )
            await asyncio.sleep(0.1)


def serve(tmp_path: Path, listen: int, downstream: int, live: Path, workers: int) -> subprocess.Popen[bytes]:
    cfg = tmp_path / "milter.toml"
    cfg.write_text(
        f'[model]\npath = "{live}"\n[server]\nlisten = "127.0.0.1:{listen}"\n'
        f'downstream = "127.0.0.1:{downstream}"\ndownstream_timeout = 10.0\n'
        f'[store]\nurl = "sqlite:///{tmp_path}/gw.db"\n' + POLICY_TOML
    )
    return subprocess.Popen(
        [*MILTER, "-v", "serve", "--config", str(cfg), "--workers", str(workers), "--metrics-listen", "off"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def fixture_message(index: int) -> tuple[str, bytes]:
    """A real sample message under a Message-ID of its own (its original ones removed)."""
    raw = SAMPLES[index % len(SAMPLES)].read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head, sep, body = raw.partition(b"\r\n\r\n")
    mid = f"r{index}@reload.test"
    kept = [f"Message-ID: <{mid}>".encode()]
    dropping = False
    for line in head.split(b"\r\n"):
        folded = line[:1] in (b" ", b"\t")
        dropping = dropping if folded else line.lower().startswith(b"message-id:")
        if not dropping:
            kept.append(line)
    return f"<{mid}>", b"\r\n".join(kept) + sep + body


def test_sighup_reloads_single_process_serve(tmp_path: Path, free_port: Callable[[], int]) -> None:
    live = tmp_path / "models" / "current.onnx"
    install(model_variant(tmp_path / "a", "model-a"), live)
    model_b = model_variant(tmp_path / "b", "model-b")
    listen, sink_port = free_port(), free_port()
    proc = serve(tmp_path, listen, sink_port, live, workers=1)
    assert proc.stderr is not None
    log = LogTail(proc.stderr)

    async def main() -> None:
        sink = Sink()
        await sink.start(sink_port)
        try:
            await wait_listening(listen, proc)
            assert (await send(listen, make_message("one@test"))).code == 250
            install(model_b, live)
            os.kill(proc.pid, signal.SIGHUP)
            await log.wait_for(r"model reloaded: model-a -> model-b, providers \[", 1, proc)
            assert (await send(listen, make_message("two@test"))).code == 250
        finally:
            await sink.stop()

    try:
        asyncio.run(main())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "\n".join(log.lines[-30:])
    finally:
        with_group_killed(proc)
    assert models_by_message_id(tmp_path / "gw.db") == {"one@test": ["model-a"], "two@test": ["model-b"]}


def test_sighup_under_load_with_two_workers_loses_nothing(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    live = tmp_path / "models" / "current.onnx"
    model_a, model_b = model_variant(tmp_path / "a", "model-a"), model_variant(tmp_path / "b", "model-b")
    install(model_a, live)
    listen, sink_port = free_port(), free_port()
    proc = serve(tmp_path, listen, sink_port, live, workers=2)
    assert proc.stderr is not None
    log = LogTail(proc.stderr)
    outcomes: list[Outcome] = []
    minimum = 40

    async def client(worker: int, clients: int, done: asyncio.Event) -> None:
        # Keep sending until the reloads are over, so sessions are in flight through every swap.
        i = worker
        while not done.is_set() or i < minimum:
            mid, raw = fixture_message(i)
            sender = QUARANTINE_SENDER if i % 5 == 0 else "alice@sender.test"
            out = await send(listen, raw, mail_from=sender, smtp_timeout=60)
            assert out.mid == mid
            outcomes.append(out)
            i += clients

    async def reloads(done: asyncio.Event) -> None:
        # (model to install, the reload line each worker logs, how many such lines by then in all)
        steps = [(model_b, "model-a -> model-b", 2), (model_a, "model-b -> model-a", 2),
                 (model_b, "model-a -> model-b", 4)]
        for model, change, lines in steps:
            install(model, live)
            os.kill(proc.pid, signal.SIGHUP)  # to the parent, as systemd's ExecReload does
            await log.wait_for(rf"worker=\d .*model reloaded: {change}, providers", lines, proc)
        done.set()

    async def main() -> Sink:
        sink = Sink()
        await sink.start(sink_port)
        try:
            await wait_listening(listen, proc)
            done = asyncio.Event()
            clients = 8
            await asyncio.gather(reloads(done), *(client(w, clients, done) for w in range(clients)))
        finally:
            await sink.stop()
        return sink

    try:
        sink = asyncio.run(main())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "\n".join(log.lines[-30:])
    finally:
        with_group_killed(proc)

    assert len(outcomes) >= minimum
    assert len({o.mid for o in outcomes}) == len(outcomes)
    refused = [o for o in outcomes if o.code != 250]
    assert not refused, refused[:5]
    account(outcomes, sink, open_store(f"sqlite:///{tmp_path}/gw.db"))  # each 250 in one place, once
    for worker in (0, 1):
        reloaded = log.matching(rf"worker={worker} .*model reloaded: ")
        assert len(reloaded) == 3, reloaded
    assert not log.matching("model reload failed")
    # every verdict carries one of the two models, and each served some of the traffic
    rows = models_by_message_id(tmp_path / "gw.db")
    assert sorted(rows) == sorted(o.mid.strip("<>") for o in outcomes)
    assert all(len(models) == 1 for models in rows.values())
    assert {m for models in rows.values() for m in models} <= {"model-a", "model-b"}


class _UnreadableStore:
    """A store whose labels cannot be read (database gone mid-reload)."""

    def sender_labels(self) -> list[tuple[str | None, str, int]]:
        from milter.errors import StoreError

        raise StoreError("cannot read sender labels: database is locked")


def test_a_reload_that_cannot_read_the_labels_keeps_the_old_model_and_policy() -> None:
    import functools

    from milter.config import PolicyConfig
    from milter.gateway.metrics import GatewayMetrics
    from milter.gateway.process import ModelSlot
    from milter.gateway.reload import ModelReloader

    old = load_checked(MODEL, PolicyConfig())
    slot = ModelSlot(old)
    reloader = ModelReloader(
        slot, MODEL, PolicyConfig(), GatewayMetrics(),
        loader=functools.partial(load_checked, store=_UnreadableStore()),  # type: ignore[arg-type]
    )
    result = asyncio.run(reloader.reload())
    assert not result.ok and result.reason == "StoreError: cannot read sender labels: database is locked"
    assert slot.scanner is old


def test_a_gateway_starts_only_with_a_model_that_passes_the_reloads_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up loads through the reload's checks, the smoke scan included: a model that gives rows
    that are not probabilities was refused by a reload but served when the gateway (re)started with it
    (milter-train writes current.onnx without a promote)."""
    import milter.gateway.reload as reload_module
    from milter.config import Config, ModelConfig, StoreConfig
    from milter.gateway.workers import load

    config = Config(model=ModelConfig(path=model_variant(tmp_path / "m", "start-me"), explain=False),
                    store=StoreConfig(url=f"sqlite:///{tmp_path / 'store.db'}"))
    loaded = load(config)
    assert loaded.scanner.classifier.name == "start-me"
    loaded.store.close()

    def not_probabilities(name: str, probs: Any) -> None:
        raise ModelError(f"model {name} gives rows that are not probabilities (|sum - 1| up to 7)")

    monkeypatch.setattr(reload_module, "check_probabilities", not_probabilities)
    with pytest.raises(ModelError, match="not probabilities"):
        load(config)

"""`milter model` against the fleet's registry in the store ([model] registry = "store").

Several gateway nodes share one store: a promotion validates the model exactly as a local one
(milter.registry.validate), then publishes its files into the store and makes it the fleet's current
model; every node adopts it by itself within [model] registry_poll_seconds (milter.gateway.fleet), so
there is no SIGHUP to send. `status` lists what each node serves and said at its last check-in.
"""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from rich.table import Table

from milter.errors import ModelError
from milter.registry import companions, sha256_file, validate, write_files
from milter.store import Store
from milter.store.registry import CurrentModel, ModelFiles, NodeStatus, PublishedModel

ADOPT_HINT = "every node adopts it within [model] registry_poll_seconds (milter model status)"


def who() -> str:
    """Who changed the fleet's model, for model_log: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:255]


@contextmanager
def _staged() -> Iterator[Path]:
    stage = Path(tempfile.mkdtemp(prefix="milter-model-"))
    try:
        yield stage / "candidate.onnx"
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _files_of(staged: Path, name: str) -> ModelFiles:
    lgb, tensor = companions(staged)  # the same companions write_files lays out
    return ModelFiles(name=name, onnx_sha256=sha256_file(staged), onnx=staged.read_bytes(),
                      meta_json=staged.with_suffix(".json").read_bytes(),
                      lgb_text=lgb.read_bytes() if lgb.is_file() else None,
                      tensor_onnx=tensor.read_bytes() if tensor.is_file() else None)


def promote(store: Store, onnx: Path, json_path: Path | None) -> tuple[str, str | None]:
    """Validate, publish, make current for the fleet: (name, the previous current name or None)."""
    json_path = json_path or onnx.with_suffix(".json")
    for path in (onnx, json_path):
        if not path.is_file():
            raise ModelError(f"candidate file {path} not found")
    with _staged() as staged:  # validated from the copy, so the bytes checked are the bytes published
        shutil.copyfile(onnx, staged)
        shutil.copyfile(json_path, staged.with_suffix(".json"))
        for src, dst in zip(companions(onnx), companions(staged), strict=True):
            if src.is_file():
                shutil.copyfile(src, dst)
        meta = validate(staged)
        files = _files_of(staged, meta.name)
    previous = store.model_current()
    store.model_publish(files, who())
    store.model_set_current(meta.name, "promote", who())
    return meta.name, previous.name if previous else None


def rollback(store: Store, name: str | None) -> tuple[str, str | None]:
    """Make `name` (default: the model current before this one) the fleet's current model again,
    validated as a promotion (a model from before a feature-schema change is refused)."""
    previous = store.model_current()
    to = name or store.model_previous()
    if to is None:
        raise ModelError("no earlier model in the store's log to roll back to: name one")
    files = store.model_fetch(to)
    if files is None:
        known = ", ".join(m.name for m in store.model_list()) or "none"
        raise ModelError(f"no model named {to!r} in the store (known: {known})")
    with _staged() as staged:
        write_files(staged, files.onnx, files.meta_json, files.lgb_text, files.tensor_onnx)
        validate(staged)
    store.model_set_current(to, "rollback", who())
    return to, previous.name if previous else None


def model_json(row: PublishedModel) -> dict[str, object]:
    return {"name": row.name, "sha256": row.onnx_sha256, "promoted_at": row.promoted_at.isoformat(),
            "promoted_by": row.promoted_by, "current": row.is_current}


def models_table(rows: list[PublishedModel]) -> Table:
    table = Table("", "name", "sha256", "published (UTC)", "by")
    for r in rows:
        table.add_row("*" if r.is_current else "", r.name, r.onnx_sha256[:12],
                      r.promoted_at.strftime("%Y-%m-%d %H:%M"), r.promoted_by)
    if not rows:
        table.caption = "no models in the store"
    return table


def ago(when: datetime, now: datetime | None = None) -> str:
    """'42s ago', '5m ago', '3h ago', '2d ago'."""
    seconds = max(0, int(((now or datetime.now(UTC)) - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def node_json(row: NodeStatus, fleet: CurrentModel | None) -> dict[str, object]:
    return {"node": row.node, "model": row.model, "sha256": row.onnx_sha256,
            "current": fleet is not None and row.onnx_sha256 == fleet.onnx_sha256,
            "last_checkin": row.last_checkin.isoformat(), "last_error": row.last_error,
            "pid": row.pid, "host": row.host}


def nodes_table(rows: list[NodeStatus], fleet: CurrentModel | None) -> Table:
    table = Table("node", "model", "current", "last check-in (UTC)", "", "last error", "host / pid")
    for r in rows:
        current = "yes" if fleet is not None and r.onnx_sha256 == fleet.onnx_sha256 else "NO"
        table.add_row(r.node, r.model, current, r.last_checkin.strftime("%Y-%m-%d %H:%M:%S"),
                      ago(r.last_checkin), r.last_error or "", f"{r.host} / {r.pid}")
    fleet_text = f"{fleet.name} ({fleet.onnx_sha256[:12]})" if fleet else "none promoted yet"
    table.caption = f"fleet's current model: {fleet_text}" + ("" if rows else "; no node has checked in")
    return table


def dumps(obj: dict[str, object]) -> str:
    return json.dumps(obj)

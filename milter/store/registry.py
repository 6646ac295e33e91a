"""The SQL of the fleet's model registry (`models`, `model_log`, `nodes`), behind the Store's `model_*`
and `node_*` methods.

Several gateway nodes share one store, so a promotion must reach all of them without a copy step per
machine: the model's files themselves live in `models` (a few MiB each), and `model_log` says which one
the fleet should serve: its newest row. Each node polls that row (milter.gateway.fleet), fetches the
files when it changed, installs them locally through milter.registry's validated swap and reports what
it serves in `nodes`.

A name is bound to one ONNX digest for good: publishing the same model again is a no-op (a retried
promotion), publishing other bytes under a name already used is refused, so that "model X" means the
same bytes on every node and in every verdict row.

Own module, like history.py and release.py: the Store methods delegate here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from milter.errors import StoreError
from milter.store.models import MODEL_LOG, MODELS, NODES

ACTIONS = ("promote", "rollback")
_m, _log, _n = MODELS.c, MODEL_LOG.c, NODES.c


@dataclass(frozen=True)
class ModelFiles:
    """A model as files: ONNX bytes, metadata JSON bytes, LightGBM text and tensor graph (None: none
    shipped)."""

    name: str
    onnx_sha256: str
    onnx: bytes
    meta_json: bytes
    lgb_text: bytes | None = None
    tensor_onnx: bytes | None = None


@dataclass(frozen=True)
class PublishedModel:
    """One row of `milter model list` against the store (no bytes)."""

    name: str
    onnx_sha256: str
    promoted_at: datetime
    promoted_by: str
    is_current: bool


@dataclass(frozen=True)
class CurrentModel:
    """What the fleet should serve: the newest model_log row's model."""

    name: str
    onnx_sha256: str


@dataclass(frozen=True)
class NodeStatus:
    """A node's latest check-in."""

    node: str
    model: str
    onnx_sha256: str
    last_checkin: datetime
    last_error: str | None
    pid: int
    host: str


def _now() -> datetime:
    return datetime.now(UTC)


def publish(writer: Engine, files: ModelFiles, by: str) -> bool:
    """Add a model; True when added, False when the same name and digest were already there."""
    values = {"name": files.name, "onnx_sha256": files.onnx_sha256, "onnx": files.onnx,
              "meta_json": files.meta_json, "lgb_text": files.lgb_text, "tensor_onnx": files.tensor_onnx,
              "promoted_at": _now(), "promoted_by": by}
    with writer.begin() as conn:
        # ON CONFLICT DO NOTHING: two admins publishing one model at once must both succeed
        stmt = _insert_ignoring_conflict(writer.dialect.name).values(values).returning(_m.name)
        added = conn.execute(stmt).first() is not None  # RETURNING: rowcount is not portable here
        stored = conn.execute(select(_m.onnx_sha256).where(_m.name == files.name)).scalar_one()
    if stored != files.onnx_sha256:
        raise StoreError(
            f"the store already holds a different model named {files.name} (sha256 {stored[:12]}…): "
            "a name is bound to its bytes; retrain or rename"
        )
    return added


def _insert_ignoring_conflict(dialect: str) -> postgresql.Insert | sqlite.Insert:
    if dialect == "postgresql":
        return postgresql.insert(MODELS).on_conflict_do_nothing(index_elements=["name"])
    if dialect == "sqlite":
        return sqlite.insert(MODELS).on_conflict_do_nothing(index_elements=["name"])
    raise StoreError(f"the model registry needs PostgreSQL or SQLite, not {dialect}")


def set_current(writer: Engine, name: str, action: str, by: str) -> None:
    """Make the published model `name` the fleet's current one (a new model_log row)."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    with writer.begin() as conn:
        if conn.execute(select(_m.name).where(_m.name == name)).first() is None:
            names = conn.execute(select(_m.name).order_by(_m.promoted_at)).scalars()
            known = ", ".join(str(n) for n in names) or "none"
            raise StoreError(f"no model named {name!r} in the store (known: {known})")
        conn.execute(insert(MODEL_LOG).values(at=_now(), name=name, action=action, by=by))


def current(engine: Engine) -> CurrentModel | None:
    stmt = (
        select(_log.name, _m.onnx_sha256)
        .join(MODELS, _m.name == _log.name)
        .order_by(_log.id.desc())
        .limit(1)
    )
    with engine.connect() as conn:
        row = conn.execute(stmt).first()
    return None if row is None else CurrentModel(str(row[0]), str(row[1]))


def previous(engine: Engine) -> str | None:
    """The model current before the current one (rollback without a name): like an undo, so two
    rollbacks return to where they started."""
    with engine.connect() as conn:
        names = [str(n) for n in conn.execute(select(_log.name).order_by(_log.id.desc())).scalars()]
    if not names:
        return None
    return next((n for n in names[1:] if n != names[0]), None)


def fetch(engine: Engine, name: str) -> ModelFiles | None:
    stmt = select(_m.name, _m.onnx_sha256, _m.onnx, _m.meta_json, _m.lgb_text, _m.tensor_onnx).where(
        _m.name == name
    )
    with engine.connect() as conn:
        row = conn.execute(stmt).first()
    if row is None:
        return None
    return ModelFiles(str(row.name), str(row.onnx_sha256), bytes(row.onnx), bytes(row.meta_json),
                      None if row.lgb_text is None else bytes(row.lgb_text),
                      None if row.tensor_onnx is None else bytes(row.tensor_onnx))


def models(engine: Engine) -> list[PublishedModel]:
    """Every published model, oldest first, the fleet's current one marked."""
    now = current(engine)
    stmt = select(_m.name, _m.onnx_sha256, _m.promoted_at, _m.promoted_by).order_by(_m.promoted_at, _m.name)
    with engine.connect() as conn:
        return [
            PublishedModel(str(n), str(d), at, str(by), is_current=now is not None and now.name == n)
            for n, d, at, by in conn.execute(stmt)
        ]


def check_in(writer: Engine, status: NodeStatus) -> None:
    """Insert or replace the node's row (every worker of a node checks in under the node's name, so
    two may race to insert it first: an upsert, not update-then-insert)."""
    values = {"node": status.node, "model": status.model, "onnx_sha256": status.onnx_sha256,
              "last_checkin": status.last_checkin, "last_error": status.last_error, "pid": status.pid,
              "host": status.host}
    changes = {k: v for k, v in values.items() if k != "node"}
    dialect = writer.dialect.name
    if dialect == "postgresql":
        stmt: postgresql.Insert | sqlite.Insert = postgresql.insert(NODES).on_conflict_do_update(
            index_elements=["node"], set_=changes)
    elif dialect == "sqlite":
        stmt = sqlite.insert(NODES).on_conflict_do_update(index_elements=["node"], set_=changes)
    else:
        raise StoreError(f"the model registry needs PostgreSQL or SQLite, not {dialect}")
    with writer.begin() as conn:
        conn.execute(stmt.values(values))


def nodes(engine: Engine) -> list[NodeStatus]:
    stmt = select(_n.node, _n.model, _n.onnx_sha256, _n.last_checkin, _n.last_error, _n.pid, _n.host)
    with engine.connect() as conn:
        return [NodeStatus(str(r.node), str(r.model), str(r.onnx_sha256), r.last_checkin, r.last_error,
                           int(r.pid), str(r.host)) for r in conn.execute(stmt.order_by(_n.node))]

"""SQLAlchemy 2.0 ORM models of the verdict / quarantine store: every table lives in this module.

`messages` holds one row per scanned message (the verdict, cheap to list); `quarantine` holds the raw
bytes of quarantined messages only, so listing verdicts never drags message bodies off disk; `history`
holds the correspondence history (milter.history), one row per entry, shared by every gateway;
`models`, `model_log` and `nodes` are the fleet's model registry (milter/store/registry.py).
Alembic migrations in milter/migrations/versions/ must mirror these definitions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names so that migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no time zones: values are stored as naive UTC there and given back as aware UTC, so
    comparisons (purge cut-offs) and round trips behave the same as on PostgreSQL's timestamptz.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class Message(Base):
    """The verdict for one scanned message, plus the learning-loop label once someone gives one."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(index=True)
    queue_id: Mapped[str | None] = mapped_column(String(64))
    mail_from: Mapped[str | None] = mapped_column(Text)
    rcpt_tos: Mapped[list[str]] = mapped_column(JSON)
    client_addr: Mapped[str | None] = mapped_column(String(64))
    client_name: Mapped[str | None] = mapped_column(Text)
    helo: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str | None] = mapped_column(String(500), index=True)
    from_addr: Mapped[str | None] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    verdict: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(16), index=True)
    score_ham: Mapped[float] = mapped_column(Float)
    score_spam: Mapped[float] = mapped_column(Float)
    score_bec: Mapped[float] = mapped_column(Float)
    reasons: Mapped[list[str]] = mapped_column(JSON)
    # milter.explain.Explanation.as_json() for flagged verdicts; NULL for accepted mail and older rows
    explanation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    model: Mapped[str] = mapped_column(String(200))
    # float32 little-endian, in the feature schema's order; NULL when vectors are not kept.
    feature_vector: Mapped[bytes | None] = mapped_column(LargeBinary)
    schema_digest: Mapped[str] = mapped_column(String(128))
    label: Mapped[str | None] = mapped_column(String(16))
    label_source: Mapped[str | None] = mapped_column(String(64))
    labelled_at: Mapped[datetime | None] = mapped_column()
    # What the correspondence history learns from (`milter history rebuild` replays them); NULL for
    # verdicts stored before revision 0003.
    from_display: Mapped[str | None] = mapped_column(Text)
    reply_to: Mapped[str | None] = mapped_column(Text)
    outbound: Mapped[bool | None] = mapped_column(Boolean)  # our users' mail to their correspondents
    teaches: Mapped[bool | None] = mapped_column(Boolean)  # the history learned from it (Decision.teaches)

    quarantine: Mapped[Quarantine | None] = relationship(
        back_populates="message", cascade="all, delete-orphan", passive_deletes=True, uselist=False
    )


class Quarantine(Base):
    """Raw bytes of a quarantined message; `raw` becomes NULL once deleted by an operator. A release
    claims the row before it delivers, so that of several nodes releasing it at once only one does."""

    __tablename__ = "quarantine"

    message_pk: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    released_at: Mapped[datetime | None] = mapped_column()
    deleted_at: Mapped[datetime | None] = mapped_column()
    # A release in progress (milter/store/release.py): the releasing process's token ("host pid N
    # random") and when it claimed the message, by the database's clock. NULL when none is.
    release_claim: Mapped[str | None] = mapped_column(String(255))
    release_claimed_at: Mapped[datetime | None] = mapped_column()

    message: Mapped[Message] = relationship(back_populates="quarantine")


class HistoryEntry(Base):
    """One entry of the correspondence history (milter.history.HistoryRow, `kind`, `key` and `member`
    as documented there). Gateways add to the counts (Store.history_apply) and never overwrite them:
    several processes and nodes learn at once."""

    __tablename__ = "history"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(500), primary_key=True)
    member: Mapped[str] = mapped_column(String(500), primary_key=True, default="")
    first_seen: Mapped[float] = mapped_column(Float)  # POSIX seconds
    # indexed: ageing deletes, and gateways re-read, by last_seen
    last_seen: Mapped[float] = mapped_column(Float, index=True)
    inbound: Mapped[int] = mapped_column(Integer)
    outbound: Mapped[int] = mapped_column(Integer)


class RegistryModel(Base):
    """A model published to the fleet: its files' bytes, so a node needs nothing but the store.
    A name is bound to one ONNX digest for good (publishing another under it is refused)."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    onnx_sha256: Mapped[str] = mapped_column(String(64))
    onnx: Mapped[bytes] = mapped_column(LargeBinary)
    meta_json: Mapped[bytes] = mapped_column(LargeBinary)
    lgb_text: Mapped[bytes | None] = mapped_column(LargeBinary)  # NULL: a model from before explanations
    tensor_onnx: Mapped[bytes | None] = mapped_column(LargeBinary)  # NULL: a model without a tensor graph
    promoted_at: Mapped[datetime] = mapped_column()
    promoted_by: Mapped[str] = mapped_column(String(255))


class ModelLogEntry(Base):
    """One change of the fleet's current model; the row with the highest id says which model it is."""

    __tablename__ = "model_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column()
    name: Mapped[str] = mapped_column(ForeignKey("models.name"), index=True)
    action: Mapped[str] = mapped_column(String(16))  # "promote" or "rollback"
    by: Mapped[str] = mapped_column(String(255))


class NodeEntry(Base):
    """What one gateway node said at its latest check-in (every registry poll of every worker)."""

    __tablename__ = "nodes"

    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    onnx_sha256: Mapped[str] = mapped_column(String(64))
    last_checkin: Mapped[datetime] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255))


def _table(model: type[Base]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


# The tables themselves, for Core statements on the gateway's hot path (see Store.record_batch).
MESSAGES = _table(Message)
QUARANTINE = _table(Quarantine)
HISTORY = _table(HistoryEntry)
MODELS = _table(RegistryModel)
MODEL_LOG = _table(ModelLogEntry)
NODES = _table(NodeEntry)

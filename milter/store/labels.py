"""Labelled examples that arrive without a stored verdict (user reports of mail the store never saw).

`record_labelled` writes the scan result and its label in one transaction, so a crash cannot leave
an unlabelled verdict behind that retention would later purge as if nobody had reported it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from milter.store.engine import WRITE_OPTION
from milter.store.mapping import clean, new_message
from milter.store.store import Store, _guard
from milter.types import VERDICTS, Envelope

if TYPE_CHECKING:
    from milter.scan import ScanResult


def record_labelled(
    store: Store,
    result: ScanResult,
    label: str,
    source: str,
    schema_digest: str,
    envelope: Envelope | None = None,
    received_at: datetime | None = None,
) -> int:
    """Store a verdict with its label already set (feature vector kept: it is a training example)."""
    if label not in VERDICTS:
        raise ValueError(f"label must be one of {', '.join(VERDICTS)}, got {label!r}")
    now = datetime.now(UTC)
    msg = new_message(result, envelope or Envelope(), schema_digest, True, received_at or now)
    msg.label, msg.label_source, msg.labelled_at = label, clean(source, 64), now
    writer = store.engine.execution_options(**{WRITE_OPTION: True})
    with _guard("cannot record labelled example"), Session(writer, expire_on_commit=False) as s, s.begin():
        s.add(msg)
        s.flush()
        pk = msg.id
    return pk

"""`prepare` stand-ins that misbehave on cue, for the gateway's limit tests (tests/test_gateway_limits.py).

They run in the gateway's real prepare processes, which import them by name (module level, spawn).
Any other message is prepared normally.
"""

from __future__ import annotations

import os
import time
from typing import Any

from milter.features.summary import Extracted
from milter.scan import prepare

#: A header that makes the job never end: only killing its process stops it.
HANG = b"X-Test-Fault: hang"
#: A header that makes the process die at once, as a segfault in a C extension would.
CRASH = b"X-Test-Fault: crash"
#: A header that makes the process keep GROW_BYTES more memory for as long as it lives.
GROW = b"X-Test-Fault: grow"
GROW_BYTES = 400 << 20

_kept: list[bytearray] = []  # per process: what GROW allocated stays allocated, as a leak would


def faulty_prepare(raw: bytes, *args: Any) -> Extracted:
    if HANG in raw:
        while True:
            time.sleep(0.5)
    if CRASH in raw:
        os._exit(70)
    if GROW in raw:
        _kept.append(bytearray(GROW_BYTES))  # zero-filled: every page is resident
    return prepare(raw, *args)

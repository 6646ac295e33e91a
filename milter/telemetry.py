"""ONNX Runtime's own telemetry, turned off in every process of ours before onnxruntime is imported.

onnxruntime >= 1.29 on Linux carries Microsoft's 1DS telemetry, on by default: about 9 s after
`import onnxruntime` a thread of the library resolves `mobile.events.data.microsoft.com` through the
host's resolver to upload a ProcessInfo event (session events follow), and it keeps a device id and an
event cache under ~/.cache/Microsoft/DeveloperTools/.onnxruntime. A mail gateway must contact nothing
its configuration does not name, so this is off, with no setting to turn it back on.

What controls it, measured with `strace -f -e trace=connect,sendto` against onnxruntime 1.32.0 (whose
library holds the variable's name and the collector's URL as literals):

* `ORT_DISABLE_TELEMETRY=1` in the environment before the library is loaded: no uploader, no device id,
  no DNS query. The library reads it once, when `import onnxruntime` creates its environment; set after
  the import it changes nothing.
* `onnxruntime.disable_telemetry_events()` after the import does not stop the ProcessInfo upload (the
  same queries went out as with nothing done); it only mutes later events, so it is a fallback here.
* The library also stays silent when it sees a CI variable (`CI`, `GITHUB_ACTIONS`, `TF_BUILD`, ...):
  tests/test_no_contact.py removes those, or it could not see this module fail.

Hence the call sits in `milter/__init__.py` and `training/__init__.py`: any `import milter...` or
`import training...` runs it before `milter.classifier` or `training.model` imports onnxruntime, and the
variable is inherited by the spawned gateway workers and prepare processes and the training pools.
"""

from __future__ import annotations

import os
import sys

ENV_VAR = "ORT_DISABLE_TELEMETRY"


def disable_onnxruntime_telemetry() -> None:
    """Set ORT_DISABLE_TELEMETRY=1 for this process and its children; idempotent, no I/O."""
    os.environ[ENV_VAR] = "1"  # forced, even over a "0": nothing leaves the host unasked
    ort = sys.modules.get("onnxruntime")
    if ort is not None:
        # Imported before us (an embedding program, a test): too late for this process's ProcessInfo
        # event; muting the later ones is what is left to do.
        ort.disable_telemetry_events()

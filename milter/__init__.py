"""mailsift: the gateway (`milter serve`), `milter scan` and the admin commands."""

from milter.telemetry import disable_onnxruntime_telemetry

# Before any module of ours imports onnxruntime: the library reads the switch only at import.
disable_onnxruntime_telemetry()

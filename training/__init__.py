"""Offline training pipeline: corpora -> dataset -> LightGBM -> ONNX -> report -> models/ (`milter-train`)."""

import os

# LightGBM's OpenMP threads spin while waiting by default; on a busy 2-core machine that made a
# 2-thread fit 13x slower than 1 thread. Passive waiting must be set before lightgbm is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from milter.telemetry import disable_onnxruntime_telemetry

# Before training.model imports onnxruntime: the library reads the switch only at import.
disable_onnxruntime_telemetry()

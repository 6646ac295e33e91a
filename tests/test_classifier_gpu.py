"""Which graph scores the mail, on which provider (docs/gpu.md, issue 15): the TreeEnsemble graph on the
CPU, the tensor graph on CUDA, and a CUDA session that cannot be made falls back loudly, never silently.

This machine has onnxruntime's CPU build: the CUDA session itself is exercised by bench/gpu.py and the
device check on a GPU host. Here: the fallback and its log lines, the tensor graph's digest at load, the
placement check on a real profile (of a CPU session, which it must refuse), the metrics gauge and the
batch settings that follow the graph. The tests that need "no CUDA provider" skip on a GPU host.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from milter.classifier import (
    CPU,
    CUDA,
    CUDA_PROVIDER_OPTIONS,
    TENSOR,
    TREE_ENSEMBLE,
    Classifier,
    CudaUnavailable,
    check_placement,
    node_placement,
    tensor_graph_path,
)
from milter.cli import main
from milter.commands.scan import BATCH, batch_size
from milter.config import DEFAULT_MODEL, load_config, parse_config
from milter.errors import ModelError
from milter.features import extract
from milter.gateway.metrics import GatewayMetrics
from milter.gateway.server import batch_settings
from milter.scan import Scanner, build_scanner

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
no_cuda = pytest.mark.skipif(
    CUDA in ort.get_available_providers(), reason="a GPU host: the CUDA path is the device check's"
)


def copy_model(tmp_path: Path, tensor: bool = True) -> Path:
    dst = tmp_path / "model.onnx"
    for suffix in (".onnx", ".json", ".lgb.txt", ".tensor.onnx"):
        if tensor or suffix != ".tensor.onnx":
            shutil.copyfile(DEFAULT_MODEL.with_suffix(suffix), dst.with_suffix(suffix))
    return dst


def fixture_vectors(n: int = 24) -> np.ndarray[Any, np.dtype[np.float32]]:
    paths = sorted((FIXTURES / "sample").glob("*.eml"))[:n]
    return np.stack([extract(p.read_bytes()).vector for p in paths])


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "milter.classifier" and r.levelno == level]


def test_the_shipped_model_names_its_tensor_graph_and_the_gateway_uses_tf32_off() -> None:
    from training.tensor_graph import CUDA_PROVIDER_OPTIONS as TRAINING_OPTIONS

    meta = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    assert meta["tensor_graph"]["file"] == tensor_graph_path(DEFAULT_MODEL).name == "current.tensor.onnx"
    assert CUDA_PROVIDER_OPTIONS == TRAINING_OPTIONS == {"use_tf32": "0"}


@no_cuda
def test_provider_cuda_without_a_cuda_provider_falls_back_loudly_once_and_still_scores(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="milter.classifier"):
        clf = Classifier.load(DEFAULT_MODEL, provider="cuda")
    warnings, errors = records(caplog, logging.WARNING), records(caplog, logging.ERROR)
    assert len(warnings) == 1 and len(errors) == 1, caplog.text
    assert CUDA in warnings[0].getMessage() and "tree-ensemble graph" in warnings[0].getMessage()
    assert 'provider = "cuda"' in errors[0].getMessage() and "scored on the CPU" in errors[0].getMessage()
    assert (clf.graph, clf.providers, clf.on_gpu) == (TREE_ENSEMBLE, [CPU], False)
    assert clf.fallback is not None and CUDA in clf.fallback
    loaded = [r.getMessage() for r in records(caplog, logging.INFO) if "loaded from" in r.getMessage()]
    assert len(loaded) == 1 and "the tree-ensemble graph on CPUExecutionProvider" in loaded[0]
    X = fixture_vectors()
    cpu = Classifier.load(DEFAULT_MODEL, provider="cpu")
    np.testing.assert_array_equal(clf.predict(X), cpu.predict(X))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="milter.classifier"):
        clf.predict(X)  # scoring says nothing more: once per load
    assert not caplog.records


@no_cuda
def test_provider_auto_on_a_cpu_build_is_the_ordinary_case_not_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="milter.classifier"):
        clf = Classifier.load(DEFAULT_MODEL)
    assert not records(caplog, logging.WARNING) and not records(caplog, logging.ERROR)
    assert "no CUDA session" in caplog.text and "scoring with the tree-ensemble graph" in caplog.text
    assert (clf.graph, clf.providers) == (TREE_ENSEMBLE, [CPU])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="milter.classifier"):
        assert Classifier.load(DEFAULT_MODEL, provider="cpu").fallback is None
    assert "no CUDA session" not in caplog.text  # "cpu" asks for no CUDA: nothing to explain


@pytest.mark.parametrize("provider", ["auto", "cpu", "cuda"])
def test_a_tensor_graph_that_does_not_match_its_digest_is_refused_at_load(
    tmp_path: Path, provider: str
) -> None:
    model = copy_model(tmp_path)
    tensor = tensor_graph_path(model)
    tensor.write_bytes(tensor.read_bytes()[:-10])
    with pytest.raises(ModelError, match=r"tensor graph model\.tensor\.onnx does not match its metadata"):
        Classifier.load(model, provider=provider)


@pytest.mark.parametrize("provider", ["auto", "cpu", "cuda"])
def test_a_model_without_a_tensor_graph_still_loads_and_scores(tmp_path: Path, provider: str) -> None:
    """Models exported before the tensor graph: no metadata entry, no file."""
    model = copy_model(tmp_path, tensor=False)
    meta = json.loads(model.with_suffix(".json").read_text())
    del meta["tensor_graph"]
    model.with_suffix(".json").write_text(json.dumps(meta))
    clf = Classifier.load(model, provider=provider)
    assert clf.graph == TREE_ENSEMBLE
    probs = clf.predict(fixture_vectors(4))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_a_named_tensor_graph_missing_on_disk_leaves_the_cpu_graph_loadable(tmp_path: Path) -> None:
    model = copy_model(tmp_path, tensor=False)
    clf = Classifier.load(model, provider="cpu")
    assert clf.graph == TREE_ENSEMBLE


def test_an_unknown_provider_is_refused() -> None:
    with pytest.raises(ModelError, match="provider must be one of auto, cpu, cuda"):
        Classifier.load(DEFAULT_MODEL, provider="gpu")


def test_the_tensor_graph_on_the_cpu_provider_scores_as_the_classifier() -> None:
    """The file the CUDA path loads, run here through onnxruntime's CPU provider."""
    session = ort.InferenceSession(tensor_graph_path(DEFAULT_MODEL).read_bytes(), providers=[CPU])
    X = fixture_vectors()
    (probs,) = session.run(["probabilities"], {"input": X})
    cpu = Classifier.load(DEFAULT_MODEL, provider="cpu")
    assert float(np.max(np.abs(np.asarray(probs) - cpu.predict(X)))) <= 1e-5


def profiled_cpu_run() -> tuple[list[str], Any]:
    """A real profile: the tensor graph on the CPU provider, one run, as the CUDA check makes one."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "p")
        graph = tensor_graph_path(DEFAULT_MODEL).read_bytes()
        session = ort.InferenceSession(graph, options, providers=[CPU])
        session.run(None, {"input": fixture_vectors(2)})
        events = json.loads(Path(session.end_profiling()).read_text())
    return list(session.get_providers()), events


def test_the_placement_check_refuses_any_node_off_cuda() -> None:
    providers, events = profiled_cpu_run()
    placed = node_placement(events)
    assert placed and set(placed.values()) == {CPU}
    with pytest.raises(CudaUnavailable, match="does not use CUDAExecutionProvider"):
        check_placement(providers, events)
    with pytest.raises(CudaUnavailable, match=r"node\(s\) ran off CUDA"):
        check_placement([CUDA, CPU], events)
    with pytest.raises(CudaUnavailable, match="no node"):
        check_placement([CUDA], [])
    # the same profile with every node on CUDA is what a GPU host must show
    on_cuda = [{**e, "args": {**e["args"], "provider": CUDA}} if e.get("cat") == "Node" else e
               for e in events]
    check_placement([CUDA, CPU], on_cuda)
    one_off = list(on_cuda)
    first = next(i for i, e in enumerate(one_off) if e.get("cat") == "Node")
    one_off[first] = {**one_off[first], "args": {**one_off[first]["args"], "provider": CPU}}
    with pytest.raises(CudaUnavailable, match="1 node"):
        check_placement([CUDA, CPU], one_off)


def test_the_metrics_say_which_graph_and_provider_score() -> None:
    metrics = GatewayMetrics()
    metrics.set_model("m1", [CPU], TREE_ENSEMBLE)
    text = metrics.render().decode()
    assert 'milter_model_graph_info{graph="tree-ensemble",provider="CPUExecutionProvider"} 1.0' in text
    metrics.set_model("m2", [CUDA, CPU], TENSOR)
    text = metrics.render().decode()
    assert 'milter_model_graph_info{graph="tensor",provider="CUDAExecutionProvider"} 1.0' in text
    assert 'graph="tree-ensemble"' not in text  # one series: what scores now


@dataclass(frozen=True)
class _OnGpu:
    """Stands for a classifier whose CUDA session loaded (not constructible on this host)."""

    on_gpu: bool = True


def test_batching_follows_the_graph() -> None:
    cfg = parse_config({"model": {"gpu_batch_size": 1024, "gpu_batch_wait_ms": 7}})
    cpu = Classifier.load(DEFAULT_MODEL, provider="cpu")
    assert batch_settings(cfg, cpu) == (cfg.server.batch_max, cfg.server.batch_wait_ms)
    assert batch_settings(cfg, _OnGpu()) == (1024, 7.0)
    assert batch_settings(cfg, object()) == (cfg.server.batch_max, cfg.server.batch_wait_ms)
    scanner = build_scanner(cfg)
    assert batch_size(cfg, scanner) == (1024 if scanner.classifier.on_gpu else BATCH)
    on_gpu = Scanner(_OnGpu(), scanner.policy)  # type: ignore[arg-type]
    assert batch_size(cfg, on_gpu) == 1024


@no_cuda
def test_milter_scan_with_provider_cuda_says_so_and_still_scans(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "milter.toml"
    config.write_text('[model]\nprovider = "cuda"\n')
    message = sorted((FIXTURES / "sample").glob("*.eml"))[0]
    with caplog.at_level(logging.INFO, logger="milter.classifier"):
        result = CliRunner().invoke(main, ["-v", "scan", "--json", "--config", str(config), str(message)])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output.splitlines()[-1])
    assert row["verdict"] in ("ham", "bulk", "spam", "bec")
    assert len(records(caplog, logging.ERROR)) == 1
    assert "scoring with the tree-ensemble graph on CPUExecutionProvider" in caplog.text
    assert load_config(config).model.provider == "cuda"

"""`milter-retrain --dask`: the retrain's trees grown on a Dask cluster by LightGBM's own Dask estimator.

Why: one process holds one LightGBM fit; labelled history of millions of rows outgrows it, and sites
that run Dask already have the workers. Everything else stays what the single-process retrain does, so
the champion/challenger gate compares like with like:

* the same rows, labels, weights and LightGBM parameters (training.model.lgb_params) go to
  `lightgbm.dask.DaskLGBMClassifier`, as a Dask array cut into partitions of at most PARTITION_ROWS rows;
  LightGBM's data-parallel learner then trains one model across the workers (`num_threads` becomes each
  worker's thread count, which is all `lgb_params` sets per machine);
* early stopping: the Dask estimator has no early-stopping callback, so the fit runs `max_rounds` and the
  stopping rule of `lgb.early_stopping` is replayed here, on the client, over the validation rows' weighted
  multi-class log-loss after each round; the booster is cut at the best iteration, as lgb.train returns
  it (the rounds grown after it are thrown away: the price of having no early-stopping callback);
* the out-of-fold tree fits behind the thresholds (FitConfig.threshold_folds) run on the cluster as well,
  one Dask fit per fold, at the final model's number of rounds;
* the text stage (sparse logistic regressions, training.model.fit_text_stage), the ONNX export, the parity
  check, the thresholds and the gate stay on the client, unchanged: they read the booster
  (`booster_` of the fitted estimator), not the estimator.

The result is not bit-identical to the single-process fit (each worker bins and bags its own partition),
so the gate's tolerances apply to it as to any retrain; tests/test_retrain_dask.py measures the difference.

Dask is optional: `pip install 'mailsift-gateway[distributed]'`. Without it, `--dask` fails with that hint.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from milter.errors import MilterError
from milter.features import Protected
from milter.types import CLASS_NAMES, Envelope
from training.model import FitConfig, Rows, lgb_params

log = logging.getLogger(__name__)

EXTRA = "distributed"
INSTALL_HINT = f"pip install 'mailsift-gateway[{EXTRA}]'"
LOCAL_PREFIX = "local:"
#: Rows per Dask partition at most: big enough that per-partition overhead is small, small enough that
#: a worker's share arrives in several pieces (memory) and every worker of a small cluster gets some.
PARTITION_ROWS = 100_000
CONNECT_TIMEOUT_S = 10.0
LOG_EPS = 1e-15  # LightGBM's multi_logloss clips probabilities here (kEpsilon)


def _require_dask() -> tuple[Any, Any]:
    """(dask.array, distributed), or a MilterError naming the extra: --dask must say how to get it."""
    try:
        dask_array = importlib.import_module("dask.array")
        distributed = importlib.import_module("distributed")
        importlib.import_module("lightgbm.dask")
    except ImportError as exc:
        raise MilterError(f"--dask needs the optional '{EXTRA}' extra ({INSTALL_HINT}): {exc}") from None
    return dask_array, distributed


def local_workers(spec: str) -> int | None:
    """N for "local:N" (a LocalCluster of N single-thread worker processes), None for a scheduler address."""
    if not spec.startswith(LOCAL_PREFIX):
        return None
    count = spec.removeprefix(LOCAL_PREFIX)
    if not count.isdigit() or int(count) < 1:
        raise MilterError(f"--dask {spec!r}: expected local:N with N >= 1 workers")
    return int(count)


@contextmanager
def connect(spec: str, timeout: float = CONNECT_TIMEOUT_S) -> Iterator[Any]:
    """A `distributed.Client` for `spec`, closed afterwards (with the LocalCluster it started, if any).

    An unreachable scheduler fails within `timeout` seconds, before any data is loaded."""
    _, distributed = _require_dask()
    workers = local_workers(spec)
    cluster = None
    try:
        if workers is not None:
            # processes, one thread each, loopback only: nothing listens beyond this host
            cluster = distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None,
            )
            client = distributed.Client(cluster, timeout=timeout)
        else:
            client = distributed.Client(spec, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:  # distributed raises these for a bad address
        if cluster is not None:
            cluster.close()
        raise MilterError(f"cannot reach the Dask scheduler at {spec!r}: {exc}") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _scattered(
    client: Any, dask_array: Any, arrays: Sequence[npt.NDArray[Any]], order: npt.NDArray[np.intp], rows: int
) -> list[Any]:
    """Each of `arrays` (same length), taken in `order`, as a Dask array in partitions of `rows` rows,
    partition i of every one sent straight to the same worker (round robin), not embedded in the graph the
    scheduler carries (from_array would ship the whole matrix through it).

    A partition is gathered from `order` just before it is sent and dropped after: the client never holds
    a reordered copy of the whole matrix. At 1,000,000 rows of 1,697 float32 features that copy was 6.8 GB
    beside the caller's own 6.8 GB (bench/retrain_scale.py on one 23 GB host ran out of memory with it)."""
    workers = sorted(client.nthreads())
    out = []
    for a in arrays:
        pieces = []
        for i, start in enumerate(range(0, len(order), rows)):
            part = a[order[start : start + rows]]
            future = client.scatter(part, workers=[workers[i % len(workers)]])
            pieces.append(dask_array.from_delayed(future, shape=part.shape, dtype=part.dtype))
            del part
        out.append(dask_array.concatenate(pieces))
    return out


def shuffle_order(y: npt.NDArray[np.int64], seed: int, rows: int) -> npt.NDArray[np.intp]:
    """A seeded random order of the rows, checked so that every partition of `rows` rows holds every class.

    Each worker runs lightgbm's sklearn-style classifier on its own partitions, which numbers the classes
    it sees: a worker without bec would call spam class 0 and the ensemble would be garbage. The fit
    rows come grouped (corpora, then admin labels), so they are shuffled first; a class too rare to
    reach every partition is an error (lgb.train without --dask has no such limit)."""
    order: npt.NDArray[np.intp] = np.random.default_rng(seed).permutation(len(y))
    ordered = y[order]
    wanted = set(range(len(CLASS_NAMES)))
    for start in range(0, len(y), rows):
        missing = sorted(wanted - {int(k) for k in np.unique(ordered[start : start + rows])})
        if missing:
            raise MilterError(
                f"--dask: a partition of {rows} training rows holds no "
                f"{', '.join(CLASS_NAMES[k] for k in missing)}; every Dask partition needs every class "
                "(fewer workers, or run without --dask)"
            )
    return order


def validation_loss(booster: lgb.Booster, val: Rows) -> npt.NDArray[np.float64]:
    """Weighted multi-class log-loss of `val` after each round, as lgb.train's validation reports it."""
    X, y, w = val
    rounds, k = booster.current_iteration(), len(CLASS_NAMES)
    raw = np.zeros((len(y), k), dtype=np.float64)
    out = np.zeros(rounds, dtype=np.float64)
    for i in range(rounds):  # one round's trees at a time: O(rounds), not O(rounds²)
        raw += np.asarray(booster.predict(X, raw_score=True, start_iteration=i, num_iteration=1)).reshape(
            len(y), k
        )
        shifted = raw - raw.max(axis=1, keepdims=True)
        p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        picked = np.maximum(p[np.arange(len(y)), y], LOG_EPS)
        out[i] = float(np.sum(w * -np.log(picked)) / np.sum(w))
    return out


def early_stop(losses: Sequence[float], patience: int) -> tuple[int, int]:
    """(round it stops after, best iteration), 1-based: lgb.early_stopping's rule (strict improvement;
    stop once `patience` rounds passed without one) replayed over per-round validation losses."""
    best, best_at = math.inf, 0
    for i, loss in enumerate(losses):
        if loss < best:
            best, best_at = loss, i
        elif i - best_at >= patience:
            return i + 1, best_at + 1
    return len(losses), best_at + 1


def _cut(booster: lgb.Booster, best: int) -> lgb.Booster:
    """The first `best` rounds of `booster`, as lgb.train returns an early-stopped model (it reloads
    the model from its text at the best iteration unless asked to keep training)."""
    cut = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
    cut.best_iteration = best
    return cut


@dataclass
class DaskTrees:
    """training.model.TreeFitter on a Dask cluster (`client`); records what it did for the metadata."""

    client: Any
    address: str
    partition_rows: int = PARTITION_ROWS
    fits: int = 0

    def __call__(
        self, train: Rows, names: Sequence[str], cfg: FitConfig, rounds: int, val: Rows | None = None
    ) -> lgb.Booster:
        booster = self._fit(train, names, cfg, rounds)
        if val is None:
            return booster
        stopped, best = early_stop(validation_loss(booster, val).tolist(), cfg.early_stopping)
        log.info("dask fit: %d rounds grown; lgb.train would stop after %d, best %d", rounds, stopped, best)
        return _cut(booster, best)

    def _fit(self, train: Rows, names: Sequence[str], cfg: FitConfig, rounds: int) -> lgb.Booster:
        dask_array, _ = _require_dask()
        from lightgbm.dask import DaskLGBMClassifier

        rows = max(1, min(self.partition_rows, math.ceil(len(train[1]) / max(1, self.workers()))))
        X, y, w = train
        order = shuffle_order(y, cfg.seed, rows)
        # num_threads: each worker's own thread count (lightgbm.dask sets it); num_class: the estimator
        # derives it from the labels
        params = {k: v for k, v in lgb_params(cfg).items() if k not in ("num_class", "num_threads")}
        model = DaskLGBMClassifier(client=self.client, n_estimators=rounds, **params)
        dX, dy, dw = _scattered(self.client, dask_array, (X, y, w), order, rows)
        model.fit(dX, dy, sample_weight=dw, feature_name=list(names))
        self.fits += 1
        booster: lgb.Booster = model.booster_
        return booster

    def workers(self) -> int:
        return len(self.client.nthreads())

    def describe(self) -> dict[str, Any]:
        """The metadata's `fitted_on`: where and how the trees were grown."""
        return {
            "engine": "dask",
            "estimator": "lightgbm.dask.DaskLGBMClassifier",
            "scheduler": self.address,
            "workers": self.workers(),
            "partition_rows": self.partition_rows,
            "fits": self.fits,
            "early_stopping": "replayed on the client over per-round validation log-loss",
            "versions": {m: importlib.import_module(m).__version__ for m in ("dask", "distributed")},
        }


# --- re-extraction of stale stored messages -------------------------------------------------------


Extracted = tuple[int, npt.NDArray[np.float32] | None, str | None]  # (store id, vector, error)


def _extract_one(item: tuple[int, bytes, Envelope], module: str, protected: Protected) -> Extracted:
    """One stored message's vector with the named features module (imported on the worker)."""
    pk, raw, envelope = item
    try:
        features = importlib.import_module(module)
        vector = np.asarray(features.extract(raw, envelope, protected).vector, dtype=np.float32)
    except Exception as exc:  # one unparseable message must not fail the bag; the caller counts it
        return pk, None, f"{type(exc).__name__}: {exc}"
    return pk, vector, None


def extract_bag(
    client: Any, items: Sequence[tuple[int, bytes, Envelope]], module: str, protected: Protected
) -> list[Extracted]:
    """Feature vectors of stored raw messages, as a Dask bag over the cluster (a feature-schema change
    re-extracts every held message; that is the part of a retrain that grows with the store)."""
    if not items:
        return []
    bag = importlib.import_module("dask.bag")
    parts = max(1, min(len(items), 4 * max(1, len(client.nthreads()))))
    seq = bag.from_sequence(list(items), npartitions=parts).map(_extract_one, module, protected)
    result: list[Extracted] = client.compute(seq).result()
    return result

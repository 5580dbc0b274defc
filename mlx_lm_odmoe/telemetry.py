"""Counters the on-demand block and the expert stores update.

All counters are plain Python/numpy so reading them never touches the model's
graph. Route counts seen on the no-sync fast path are parked as index arrays
and folded in lazily, so that path stays sync-free. Folding them in is an MLX
operation, and MLX streams belong to the thread that made them, so only the
thread computing the model folds (the "owner"); a reader on another thread
(an HTTP handler, say) asks for it and waits briefly for :meth:`service`.
"""

import bisect
import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

logger = logging.getLogger("mlx_lm_odmoe")

# Fetch latency histogram bucket edges, in microseconds (log2 spaced).
LATENCY_EDGES_US = [2**i for i in range(4, 25)]


def show_summaries():
    """Print this package's INFO lines on stderr when nothing else would:
    ``mlx_lm.generate`` configures no logging, so the summaries asked for
    with ``$MLX_LM_ODMOE_LOG_INTERVAL`` would go nowhere. An application
    that set up logging (a handler here or on the root logger) is left alone."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


class Telemetry:
    def __init__(self, moe_layers: List[int], num_experts: int, log_interval_s: float = None):
        self.log_interval_s = (
            log_interval_s or 0.0
        )  # seconds; the runtime passes settings.log_interval
        self._last_log = time.monotonic()
        if log_interval_s:
            show_summaries()
        self.moe_layers = list(moe_layers)
        self.num_experts = num_experts
        self._row = {l: i for i, l in enumerate(self.moe_layers)}
        self._lock = threading.Lock()
        self._pending = []
        self._owner = None  # thread that records lazy routes
        self._fold_wanted = threading.Event()
        self._folded = threading.Event()
        # Routes since start, kept across reset(): what warm start saves.
        self.lifetime_use = np.zeros((len(self.moe_layers), num_experts), dtype=np.int64)
        self.reset()

    def reset(self):
        with self._lock:
            n = len(self.moe_layers)
            self.expert_use = np.zeros((n, self.num_experts), dtype=np.int64)
            self.layer_hits = np.zeros(n, dtype=np.int64)
            self.layer_misses = np.zeros(n, dtype=np.int64)
            self.bytes_read = 0
            self.evictions = 0
            self.prefetched_bytes = 0
            self.prefetch_hits = 0
            self.prefetch_late = 0  # of those, still being read when needed (also misses)
            self.wasted_bytes = 0
            self.read_wait_s = 0.0  # host time blocked on expert reads
            self.predictor_s = 0.0  # host time in the predictor's calls
            self.preloaded_bytes = 0  # warm start
            self.predicted = {}  # target layer -> experts predicted for it
            self.recall_hits = 0
            self.recall_total = 0
            self.forward_calls = 0
            self.latencies_s = deque(maxlen=1 << 16)
            self.latency_hist = np.zeros(len(LATENCY_EDGES_US) + 1, dtype=np.int64)
            self._pending.clear()
            self.started = time.time()

    # -- updates -----------------------------------------------------------
    def record_routes(self, layer: int, ids: np.ndarray, hits: int = None, calls: int = 1):
        """Routes of ``calls`` forward passes of one layer (host ids)."""
        row = self._row[layer]
        counts = np.bincount(ids.reshape(-1), minlength=self.num_experts)
        with self._lock:
            self.expert_use[row] += counts
            self.lifetime_use[row] += counts
            self.forward_calls += calls
            if hits is not None:
                self.layer_hits[row] += hits
        if self._log_due():
            self._last_log = time.monotonic()
            logger.info(self.summary())

    def _log_due(self) -> bool:
        interval = self.log_interval_s
        return bool(interval) and time.monotonic() - self._last_log >= interval

    def record_routes_lazy(self, layer: int, indices):
        """Routes served from a fully resident layer: every expert is a hit."""
        self._owner = threading.get_ident()
        self._pending.append((layer, indices))
        # A summary due is folded in too: fully resident models would
        # otherwise log only every 512 layer calls.
        if len(self._pending) > 512 or self._fold_wanted.is_set() or self._log_due():
            self._drain(keep=8)

    def service(self):
        """Fold parked routes in if another thread asked: the computing
        thread calls this between steps (the server does, when idle too)."""
        if self._fold_wanted.is_set():
            self._drain()

    def _request_fold(self, wait_s: float):
        self._folded.clear()
        self._fold_wanted.set()
        self._folded.wait(wait_s)

    def _drain(self, keep: int = 0):
        # Entries older than the newest few were evaluated by later tokens,
        # so converting them costs a copy, not a sync; each layer's decode
        # steps go over in one array (one conversion, not hundreds).
        import mlx.core as mx

        todo = self._pending[: len(self._pending) - keep]
        del self._pending[: len(todo)]
        steps, passes = {}, []
        for layer, idx in todo:
            if idx.size == idx.shape[-1]:  # one token: its top-k are distinct
                steps.setdefault(layer, []).append(idx.reshape(-1))
            else:
                passes.append((layer, idx))
        for layer, idxs in steps.items():
            ids = np.array(mx.concatenate(idxs))
            self.record_routes(layer, ids, hits=ids.size, calls=len(idxs))
        for layer, idx in passes:
            ids = np.array(idx)
            self.record_routes(layer, ids, hits=len(np.unique(ids)))
        self._fold_wanted.clear()
        self._folded.set()

    def record_fetch(self, layer: int, hits: int, misses: int, nbytes: int, latencies):
        row = self._row[layer]
        with self._lock:
            self.layer_hits[row] += hits
            self.layer_misses[row] += misses
            self.bytes_read += nbytes
            for dt in latencies:
                self.latencies_s.append(dt)
                us = dt * 1e6
                self.latency_hist[bisect.bisect_left(LATENCY_EDGES_US, us)] += 1

    def record_preload(self, nbytes: int):
        with self._lock:
            self.preloaded_bytes += nbytes
            self.bytes_read += nbytes

    def record_prefetch(self, nbytes: int):
        with self._lock:
            self.prefetched_bytes += nbytes
            self.bytes_read += nbytes

    def record_withdrawn(self, nbytes: int):
        """A guess taken back before its read started: never read."""
        with self._lock:
            self.prefetched_bytes -= nbytes
            self.bytes_read -= nbytes

    def record_prefetch_hits(self, n: int, late: int = 0):
        with self._lock:
            self.prefetch_hits += n
            self.prefetch_late += late

    def record_wasted(self, nbytes: int):
        with self._lock:
            self.wasted_bytes += nbytes

    def record_prediction(self, target_layer: int, experts):
        self.predicted[target_layer] = set(int(e) for e in experts)

    def score_prediction(self, layer: int, experts):
        """Online recall: how many of ``experts`` were predicted for ``layer``."""
        guess = self.predicted.pop(layer, None)
        if guess is not None:
            with self._lock:
                self.recall_hits += len(guess.intersection(int(e) for e in experts))
                self.recall_total += len(experts)

    def record_stall(self, seconds: float):
        with self._lock:
            self.read_wait_s += seconds

    def record_predictor(self, seconds: float):
        with self._lock:
            self.predictor_s += seconds

    def record_evictions(self, n: int):
        with self._lock:
            self.evictions += n

    # -- reading -----------------------------------------------------------
    def lifetime_use_of(self, layer: int) -> np.ndarray:
        """Routes per expert of ``layer`` since start (a live view)."""
        return self.lifetime_use[self._row[layer]]

    def routes_per_layer(self) -> Dict[int, np.ndarray]:
        """{layer: routes per expert} since start (folds parked routes if
        called on the computing thread)."""
        if self._owner in (None, threading.get_ident()):
            self._drain()
        with self._lock:
            return {l: self.lifetime_use[row].copy() for l, row in self._row.items()}

    def summary(self) -> str:
        """One line for logs."""
        with self._lock:
            h, m = int(self.layer_hits.sum()), int(self.layer_misses.sum())
            lat = np.array(self.latencies_s) if self.latencies_s else None
            read = self.bytes_read
        rate = f"{h / (h + m):.3f}" if h + m else "n/a"
        p50 = f"{np.percentile(lat, 50) * 1e3:.2f}" if lat is not None else "n/a"
        p99 = f"{np.percentile(lat, 99) * 1e3:.2f}" if lat is not None else "n/a"
        return (
            f"experts: hit rate {rate} ({h} hits, {m} misses), "
            f"{read / 1e6:.1f} MB read, fetch p50 {p50} ms p99 {p99} ms"
        )

    def snapshot(self, wait_s: float = 1.0) -> Dict:
        """Every counter. From a thread other than the computing one, parked
        routes are folded in by that thread within ``wait_s`` if it is
        between steps or idle; otherwise the figures are those of the last fold."""
        if self._owner in (None, threading.get_ident()):
            self._drain()
        elif self._pending:
            self._request_fold(wait_s)
        with self._lock:
            hits, misses = int(self.layer_hits.sum()), int(self.layer_misses.sum())
            lat = np.array(self.latencies_s) if self.latencies_s else None
            use = self.expert_use.copy()
            per_layer = {}
            for l, row in self._row.items():
                h, m = int(self.layer_hits[row]), int(self.layer_misses[row])
                per_layer[l] = {
                    "hits": h,
                    "misses": m,
                    "hit_rate": h / (h + m) if h + m else None,
                    "load_balance": load_balance_coefficient(use[row]),
                }
            return {
                "hits": hits,
                "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
                "bytes_read": int(self.bytes_read),
                "evictions": int(self.evictions),
                "prefetched_bytes": int(self.prefetched_bytes),
                "prefetch_hits": int(self.prefetch_hits),
                "prefetch_late": int(self.prefetch_late),
                "wasted_bytes": int(self.wasted_bytes),
                "read_wait_s": float(self.read_wait_s),
                "predictor_s": float(self.predictor_s),
                "preloaded_bytes": int(self.preloaded_bytes),
                "predictor_recall": self.recall_hits / self.recall_total
                if self.recall_total
                else None,
                "fetch_latency_p50_ms": float(np.percentile(lat, 50) * 1e3)
                if lat is not None
                else None,
                "fetch_latency_p99_ms": float(np.percentile(lat, 99) * 1e3)
                if lat is not None
                else None,
                "fetch_latency_histogram_us": {
                    "edges": LATENCY_EDGES_US,
                    "counts": self.latency_hist.tolist(),
                },
                "load_balance": load_balance_coefficient(use.sum(0)),
                "per_layer": per_layer,
                "expert_use": {l: use[row].tolist() for l, row in self._row.items()},
            }


def load_balance_coefficient(counts: np.ndarray):
    """E * sum(f_i^2) of the routing fractions: 1.0 is perfectly even,
    E means every route went to one expert."""
    total = counts.sum()
    if total == 0:
        return None
    f = counts / total
    return float(len(counts) * (f * f).sum())


# -- what mlx_lm_odmoe.stats(model) returns ----------------------------------


@dataclass(frozen=True)
class LayerStats:
    hits: int
    misses: int
    hit_rate: Optional[float]
    load_balance: Optional[float]  # E * sum(f_i^2): 1 even, E all to one expert


@dataclass(frozen=True)
class ExpertStats:
    # The cache
    budget_bytes: Optional[int]
    resident_bytes: int
    slots_per_layer: int
    num_experts: int
    expert_nbytes: int  # one expert's record
    # What the routers asked for and how it was served
    hits: int
    misses: int
    hit_rate: Optional[float]
    bytes_read: int
    evictions: int
    fetch_latency_p50_ms: Optional[float]
    fetch_latency_p99_ms: Optional[float]
    fetch_latency_histogram_us: Dict[str, List[int]]  # {"edges": [...], "counts": [...]}
    load_balance: Optional[float]
    per_layer: Dict[int, LayerStats]
    expert_use: Dict[int, List[int]]  # layer -> routes per expert
    # Prediction
    prefetch: str  # "on", or "off (why)"
    prefetched_bytes: int
    prefetch_hits: int
    wasted_bytes: int
    predictor_recall: Optional[float]
    # Host time the forward pass spent blocked on expert reads (stall)
    read_wait_s: float = 0.0
    # Host time of the predictor's calls in the forward pass (a predictor on
    # the device also runs kernels inside the router's sync: not counted)
    predictor_s: float = 0.0
    # Bytes read at load from the last runs' hottest experts (warm start)
    preloaded_bytes: int = 0
    # Prefetch hits whose reads were still landing when needed (also misses)
    prefetch_late: int = 0

    def __getitem__(self, key):
        # Scripts written against the dict this used to be keep working.
        return getattr(self, key)

    def to_dict(self, expert_use: bool = True) -> dict:
        """Plain JSON-ready values (layer keys as strings)."""
        d = dataclasses.asdict(self)
        d["per_layer"] = {str(l): v for l, v in d["per_layer"].items()}
        if expert_use:
            d["expert_use"] = {str(l): v for l, v in d["expert_use"].items()}
        else:
            d.pop("expert_use")
        return d

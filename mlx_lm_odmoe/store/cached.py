"""A byte-budgeted expert cache over a reader."""

import ctypes
import itertools
import sys
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional

import mlx.core as mx
import numpy as np

from ..layout import ExpertLayout
from ..telemetry import Telemetry
from .base import ExpertStore, Pool
from .policy import CachePolicy, LRUPolicy
from .readers import ExpertReader
from .records import mx_dtype, records_to_arrays


def _return_large_frees_to_the_os():
    """Expert records are megabytes each, read and freed all the time. glibc
    raises its mmap threshold after the first such free, so later ones come
    from the heap, whose pages stay with the process once freed: peak RSS
    then drifts above budget + resident weights. Pinning the threshold
    (1 MB) keeps large buffers mmapped, returned on free. (macOS's malloc
    does this by itself.)"""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


class _LayerSlots:
    """One layer's pool and which expert sits in which slot."""

    def __init__(self, layout: ExpertLayout, slots: int):
        self.pool: Pool = {
            t.name: mx.zeros((slots,) + t.shape, dtype=mx_dtype(t.dtype)) for t in layout.tensors
        }
        mx.eval(self.pool)
        self.expert_slot = np.full(layout.num_experts, -1, dtype=np.int64)
        self.slot_expert = np.full(slots, -1, dtype=np.int64)
        self.free = list(range(slots - 1, -1, -1))


class CachedStore(ExpertStore):
    """Keeps up to ``slots_per_layer`` experts of each MoE layer resident.

    Misses are read by a thread pool of positional reads and copied into a
    victim slot chosen by ``policy`` (LRU if none is given; the runtime uses
    LFU with decay). When a layer has a slot
    for every expert, expert ``e`` always sits in slot ``e`` and, once all are
    resident, the block takes the no-sync fast path.
    """

    def __init__(
        self,
        reader: ExpertReader,
        slots_per_layer: int,
        policy: Optional[CachePolicy] = None,
        threads: int = 4,
        telemetry: Optional[Telemetry] = None,
        max_staged: int = 64,
        eval_bytes: int = 4 << 20,
    ):
        self.reader = reader
        self.layout = reader.layout
        if self.layout.record_nbytes >= 1 << 20:
            _return_large_frees_to_the_os()
        self.slots = min(int(slots_per_layer), self.layout.num_experts)
        if self.slots < 1:
            raise ValueError("an expert cache needs at least one slot per layer")
        self.identity = self.slots == self.layout.num_experts
        self.policy = policy or LRUPolicy()
        self.telemetry = telemetry or Telemetry(self.layout.moe_layers, self.layout.num_experts)
        self._layers: Dict[int, _LayerSlots] = {}
        self._complete = set()
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="odmoe-read")
        # Prefetched records wait here, outside the pools, until their layer
        # asks for them: speculation never evicts a resident expert.
        self._staged: "OrderedDict[tuple, object]" = OrderedDict()
        self.max_staged = max_staged
        self.eval_bytes = eval_bytes
        self.copy_bytes = 8 << 20
        self.inline_read_s = 200e-6
        self._read_ema = 0.0

    # -- interface ---------------------------------------------------------
    def capacity(self, layer):
        return self.slots

    def resident_pool(self, layer):
        return self._layers[layer].pool if layer in self._complete else None

    def fetch(self, layer, experts):
        st = self._layer(layer)
        slots = st.expert_slot[experts]
        missing = experts[slots < 0]
        for e in experts[slots >= 0]:
            self.policy.touch(layer, int(e))
        latencies, ready, read = (), 0, 0
        if len(missing):
            latencies, ready, read = self._load(layer, st, missing, protected=experts)
            slots = st.expert_slot[experts]
        self._expire_staged(layer)
        # A prefetched expert whose read had finished counts as a hit: its
        # bytes were in memory when the layer needed them.
        self.telemetry.record_fetch(
            layer,
            len(experts) - len(missing) + ready,
            len(missing) - ready,
            read * self.layout.record_nbytes,
            latencies,
        )
        return st.pool, slots

    def prefetch(self, layer, experts):
        st = self._layer(layer)
        for e in experts:
            e = int(e)
            key = (layer, e)
            if st.expert_slot[e] >= 0 or key in self._staged:
                continue
            while len(self._staged) >= self.max_staged:
                self._drop_oldest_staged()
            self._staged[key] = self._pool.submit(self._timed_read, layer, e)
            self.telemetry.record_prefetch(self.layout.record_nbytes)

    def _expire_staged(self, layer):
        """Guesses for this pass of ``layer`` that it did not use are waste."""
        for key in [k for k in self._staged if k[0] == layer]:
            self._staged.pop(key).cancel()
            self.telemetry.record_wasted(self.layout.record_nbytes)

    def _drop_oldest_staged(self):
        _, fut = self._staged.popitem(last=False)
        fut.cancel()
        self.telemetry.record_wasted(self.layout.record_nbytes)

    def warm(self, layers=None, progress=None):
        """Read every expert of ``layers`` (all MoE layers by default)."""
        for l in layers or self.layout.moe_layers:
            want = np.arange(min(self.slots, self.layout.num_experts))
            st = self._layer(l)
            missing = want[st.expert_slot[want] < 0]
            if len(missing):
                lat, _, _ = self._load(l, st, missing, protected=want)
                mx.eval(st.pool)
                # Preloading is not demand: count the bytes, not misses.
                self.telemetry.record_fetch(l, 0, 0, len(missing) * self.layout.record_nbytes, lat)
            if progress is not None:
                progress.update(1)

    def resident_nbytes(self):
        return sum(a.nbytes for st in self._layers.values() for a in st.pool.values())

    def close(self):
        for fut in self._staged.values():
            fut.cancel()
        self._staged.clear()
        self._pool.shutdown(wait=True)
        self.reader.close()

    # -- internals ---------------------------------------------------------
    def _layer(self, layer) -> _LayerSlots:
        st = self._layers.get(layer)
        if st is None:
            st = self._layers[layer] = _LayerSlots(self.layout, self.slots)
        return st

    def _timed_read(self, layer, expert):
        t0 = time.perf_counter()
        buf = self.reader.read(layer, expert)
        return buf, time.perf_counter() - t0

    def _claim_slot(self, layer, st: _LayerSlots, expert: int, protected) -> int:
        if self.identity:
            return expert
        if st.free:
            slot = st.free.pop()
        else:
            victim = self.policy.victim(layer, protected)
            self.policy.remove(layer, victim)
            slot = int(st.expert_slot[victim])
            st.expert_slot[victim] = -1
            self.telemetry.record_evictions(1)
        st.expert_slot[expert] = slot
        st.slot_expert[slot] = expert
        self.policy.insert(layer, expert)
        return slot

    def _reads(self, layer, experts, window):
        """(expert, buffer, seconds) for each of ``experts``, in order.

        Reads that come from memory (page cache) in well under a thread
        hand-off's cost all run on this thread. Slower ones go to the pool,
        at most ``window`` ahead, while this thread reads the first.
        """
        if not experts:
            return
        if self._read_ema < self.inline_read_s:
            for e in experts:
                yield (e, *self._timed_read(layer, e))
            return
        ahead = deque(
            (e, self._pool.submit(self._timed_read, layer, e)) for e in experts[1 : 1 + window]
        )
        rest = iter(experts[1 + window :])
        yield (experts[0], *self._timed_read(layer, experts[0]))
        while ahead:
            e, fut = ahead.popleft()
            nxt = next(rest, None)
            if nxt is not None:
                ahead.append((nxt, self._pool.submit(self._timed_read, layer, nxt)))
            yield (e, *fut.result())

    def _install(self, layer, st: _LayerSlots, batch, protected):
        """Copy read records into their slots, in place (the pool is donated
        to the update). Records bound for consecutive slots go in one slice
        update; between runs the pool is evaluated, because a second pending
        update of the same array copied the whole pool (measured: warm() of
        60 5.4 MB experts at 160 MB/s instead of 760; a scatter was as slow)
        unless the pool is small enough that the copy is cheaper than the
        sync. The last update stays lazy and runs with the layer's compute."""
        slots = [self._claim_slot(layer, st, e, protected) for e, _ in batch]
        order = sorted(range(len(batch)), key=slots.__getitem__)
        runs, run = [], [order[0]]
        for i in order[1:]:
            if slots[i] == slots[run[-1]] + 1:
                run.append(i)
            else:
                runs.append(run)
                run = [i]
        runs.append(run)
        # A small pool's copy costs less than a host sync (tiny models).
        sync = self.slots * self.layout.record_nbytes > self.copy_bytes
        for j, run in enumerate(runs):
            if j and sync:
                mx.eval(st.pool)
            first = slots[run[0]]
            records = np.stack([batch[i][1] for i in run])
            for name, a in records_to_arrays(records, self.layout).items():
                st.pool[name][first : first + len(run)] = a
        if self.identity:
            for e, _ in batch:
                st.expert_slot[e] = st.slot_expert[e] = e

    def _load(self, layer, st: _LayerSlots, missing: np.ndarray, protected):
        """Read ``missing`` into slots; return (latencies, prefetched reads
        already done, reads issued now).

        Records are copied into the pool in batches of up to ``eval_bytes``,
        with at most a batch (or a read per thread) more in flight, which
        bounds the memory a long prompt's misses take on top of the budget.
        The last batch's copy stays lazy and runs with the layer's own
        compute, in the same sync.
        """
        staged, fresh, ready = [], [], 0
        for e in (int(e) for e in missing):
            fut = self._staged.pop((layer, e), None)
            if fut is None:
                fresh.append(e)
            else:
                staged.append((e, fut))
                ready += fut.done()
        if staged:
            self.telemetry.record_prefetch_hits(len(staged))
        per_batch = max(1, self.eval_bytes // self.layout.record_nbytes)
        records = itertools.chain(
            ((e, *fut.result()) for e, fut in staged),
            self._reads(layer, fresh, window=max(per_batch, self.threads)),
        )
        protected = [int(e) for e in protected]
        latencies, batch = [], []
        for i, (e, buf, dt) in enumerate(records):
            latencies.append(dt)
            self._read_ema += 0.1 * (dt - self._read_ema)
            batch.append((e, buf))
            if len(batch) == per_batch or i == len(missing) - 1:
                self._install(layer, st, batch, protected)
                if i < len(missing) - 1:
                    mx.eval(st.pool)  # bound the records waiting to be copied
                batch = []
        late = len(staged) - ready
        if self.identity and (st.expert_slot >= 0).all():
            self._complete.add(layer)
        return latencies, ready, len(missing) - ready - late

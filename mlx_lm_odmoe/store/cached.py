"""A byte-budgeted expert cache over a reader."""

import threading
import time
from concurrent import futures
from concurrent.futures import Future
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..layout import ExpertLayout
from ..telemetry import Telemetry
from .base import ExpertStore, Pool
from .policy import CachePolicy, LRUPolicy
from .read_queue import DEMAND, GUESS, ReadQueue
from .readers import ExpertReader, record_spans
from .records import aligned_zeros, mx_dtype, records_to_arrays, writable_rows


class _LayerSlots:
    """One layer's pool and which expert sits in which slot.

    ``cached`` slots hold resident experts (or are free); ``staging`` slots
    receive prefetched reads. A prefetched expert that its layer then asks
    for changes places with the victim it evicts: its staging slot becomes
    a cached one and the victim's slot a staging one, so no bytes move.
    """

    def __init__(self, layout: ExpertLayout, cached: int, staging: int):
        n = cached + staging
        self.pool: Pool = {
            t.name: aligned_zeros((n,) + t.shape, mx_dtype(t.dtype)) for t in layout.tensors
        }
        self.rows = writable_rows(self.pool, layout)
        self.expert_slot = np.full(layout.num_experts, -1, dtype=np.int64)
        self.slot_expert = np.full(n, -1, dtype=np.int64)
        self.free = list(range(cached - 1, -1, -1))
        self.spare = list(range(n - 1, cached - 1, -1))
        self.staged: Dict[int, Tuple[int, Future]] = {}  # expert -> (slot, read)
        self.loading: Dict[int, Future] = {}  # resident experts still being preloaded
        self.guessed = set()  # read into the cache on a guess, not used yet
        self.retiring: List[Tuple[int, Future]] = []  # unused guesses still being read


class Fetch:
    """What :meth:`CachedStore.begin_fetch` hands the block: the pool, each
    expert's slot, and the reads still landing (``pending``: positions in
    ``experts``). ``wait(i)`` blocks until position ``i``'s bytes are in its
    slot; ``wait_all()`` until every one is."""

    def __init__(self, store, layer, st, experts, slots, pending, stats):
        self.store, self.layer, self._st = store, layer, st
        self.experts, self.slots, self.pool = experts, slots, st.pool
        self.pending: Dict[int, Future] = pending
        self._stats = stats  # [hits, misses, bytes read, latencies]

    def ready(self, i: int) -> bool:
        fut = self.pending.get(i)
        return fut is None or fut.done()

    def wait(self, i: int) -> None:
        fut = self.pending.pop(i, None)
        if fut is None:
            return
        t0 = time.perf_counter()
        try:
            dt, buf = fut.result()
        except BaseException:
            self.store._forget(self.layer, self._st, int(self.experts[i]))
            for j in list(self.pending):  # let the other reads land, then stop
                self.wait_quietly(j)
            raise
        finally:
            self.store.telemetry.record_stall(time.perf_counter() - t0)
        if buf is not None:  # no writable pool memory: copy on this thread
            self.store._install_copy(self._st, int(self.slots[i]), buf)
        if dt is not None:
            self._stats[3].append(dt)
        if not self.pending:
            self._finish()

    def wait_any(self) -> int:
        """Wait for the first pending read to land; its position."""
        done = [i for i, fut in self.pending.items() if fut.done()]
        if not done:
            t0 = time.perf_counter()
            futures.wait(list(self.pending.values()), return_when=futures.FIRST_COMPLETED)
            self.store.telemetry.record_stall(time.perf_counter() - t0)
            done = [i for i, fut in self.pending.items() if fut.done()]
        self.wait(done[0])
        return done[0]

    def wait_quietly(self, i: int):
        """Wait for position ``i``'s read without raising: bytes that landed
        are in their slot (copied in where the pool is not writable), a
        failed read's slot holds nothing."""
        fut = self.pending.pop(i, None)
        if fut is None:
            return
        try:
            _, buf = fut.result()
            if buf is not None:
                self.store._install_copy(self._st, int(self.slots[i]), buf)
        except BaseException:
            self.store._forget(self.layer, self._st, int(self.experts[i]))

    def wait_all(self) -> None:
        for i in list(self.pending):
            self.wait(i)
        if not self.pending and self._stats is not None:
            self._finish()

    def _finish(self):
        if self._stats is None:
            return
        hits, misses, nbytes, latencies = self._stats
        self._stats = None
        self.store.telemetry.record_fetch(self.layer, hits, misses, nbytes, latencies)
        self.store._maybe_complete(self.layer, self._st)


class CachedStore(ExpertStore):
    """Keeps up to ``slots_per_layer`` experts of each MoE layer resident.

    Misses are read straight into a victim slot of the layer's pool (chosen
    by ``policy``; LRU if none is given, the runtime uses LFU with decay) by
    ``threads`` read threads, all of a layer's misses at once, so the disk
    sees them together and the block can start computing on the experts
    that are already there. The forward pass's reads go before any guess
    (``read_queue.py``); large records are read in pieces so that misses
    land one by one. Prefetched experts land in the layer's
    ``staging`` slots and never evict a resident expert. When a layer has a
    slot for every expert, expert ``e`` always sits in slot ``e`` and, once
    all are resident, the block takes the no-sync fast path.
    """

    def __init__(
        self,
        reader: ExpertReader,
        slots_per_layer: int,
        policy: Optional[CachePolicy] = None,
        threads: int = 4,
        telemetry: Optional[Telemetry] = None,
        staging: int = 0,
    ):
        self.reader = reader
        self.layout = reader.layout
        self.slots = min(int(slots_per_layer), self.layout.num_experts)
        if self.slots < 1:
            raise ValueError("an expert cache needs at least one slot per layer")
        self.identity = self.slots == self.layout.num_experts
        self.staging = 0 if self.identity else max(0, int(staging))
        self.policy = policy or LRUPolicy()
        self.telemetry = telemetry or Telemetry(self.layout.moe_layers, self.layout.num_experts)
        self._layers: Dict[int, _LayerSlots] = {}
        self._complete = set()
        self.threads = threads
        self._queue = ReadQueue(threads)
        # Records at least twice this size are read in pieces (see _start_read).
        self.split_bytes = 4 << 20
        # Guesses in smaller pieces: a demanded read that arrives while a
        # guess is on the disk waits only for the pieces already started.
        self.guess_split_bytes = 2 << 20
        # Reads that come from memory (page cache) faster than a thread
        # hand-off run on the calling thread.
        self.inline_read_s = 200e-6
        # Computing a token's experts one call per landing read pays only
        # where a read takes longer than a call (on the page cache it costs
        # more than it hides).
        self.stream_min_read_s = 1e-3
        self._read_ema = 0.0
        self.prefetch_width = 4  # guesses read into the cache per layer and token
        self.prior_counts: Dict[int, np.ndarray] = {}  # earlier runs' routes (warm start)

    # -- interface ---------------------------------------------------------
    def capacity(self, layer):
        return self.slots

    def resident_pool(self, layer):
        return self._layers[layer].pool if layer in self._complete else None

    def fetch(self, layer, experts, keep=()):
        f = self.begin_fetch(layer, experts, keep)
        f.wait_all()
        return f.pool, f.slots

    def streams_reads(self) -> bool:
        """Whether the block should compute each expert as its read lands."""
        return self._read_ema >= self.stream_min_read_s

    def resident_mask(self, layer, experts) -> np.ndarray:
        return self._layer(layer).expert_slot[np.asarray(experts)] >= 0

    def begin_fetch(self, layer, experts, keep=()) -> Fetch:
        """Give every one of the (unique) ``experts`` a slot and start reading
        the missing ones, evicting neither them nor ``keep``; the returned
        :class:`Fetch` says when each lands."""
        st = self._layer(layer)
        experts = np.asarray(experts)
        protected = [int(e) for e in experts]
        pending, fresh, ready, late, guessed_hits = {}, [], 0, 0, 0
        missing, landing = [], []
        wanted = list(protected)
        self._withdraw_guesses(layer, st, set(wanted))
        protected += [int(e) for e in keep]
        for i, e in enumerate(wanted):
            if st.expert_slot[e] >= 0:
                self.policy.touch(layer, e)
                loading = st.loading.pop(e, None)
                if loading is not None:  # preloaded: a hit, perhaps still landing
                    pending[i] = loading
                    landing.append(loading)
                if e in st.guessed:
                    st.guessed.discard(e)
                    guessed_hits += 1
            else:
                missing.append((i, e))
        for i, e in missing:
            staged = st.staged.pop(e, None)
            if staged is not None:
                slot, fut = staged
                self._adopt(layer, st, e, slot, protected)
                pending[i] = fut  # done or not: a failed read must still raise
                landing.append(fut)
                if fut.done():
                    ready += 1
                else:
                    late += 1
            else:
                fresh.append((i, e, self._claim_slot(layer, st, e, protected)))
        self._expire_staged(st)
        if landing:
            self._queue.promote([p for fut in landing for p in fut.pieces])
        if ready + late + guessed_hits:
            self.telemetry.record_prefetch_hits(ready + late + guessed_hits, late)
        nbytes = len(fresh) * self.layout.record_nbytes
        stats = [len(experts) - len(fresh) - late, len(fresh) + late, nbytes, []]
        slots = st.expert_slot[experts]
        inline = self._read_ema < self.inline_read_s
        for i, e, slot in fresh:
            if inline:
                fut = Future()
                try:
                    fut.set_result(self._read_slot(layer, st, e, slot))
                except BaseException as exc:
                    fut.set_exception(exc)
            else:
                fut = self._start_read(layer, st, e, slot, DEMAND)
            pending[i] = fut
        f = Fetch(self, layer, st, experts, slots, pending, stats)
        if not pending:
            f._finish()
        return f

    def prefetch(self, layer, experts):
        """Read guesses for ``layer`` ahead: into its staging slots when it
        has some, else into the cache itself, each over the policy's victim
        (never an expert still landing), at most ``top_k`` per call."""
        st = self._layer(layer)
        self._reclaim(st)
        into_cache = self.staging == 0 and not self.identity
        budget = self.prefetch_width
        experts = [int(e) for e in experts]
        for e in experts:
            if st.expert_slot[e] >= 0 or e in st.staged:
                continue
            if into_cache:
                if budget == 0:
                    break
                # Never over a guess of this call or an expert still landing.
                try:
                    slot = self._claim_slot(layer, st, e, list(st.loading) + experts)
                except RuntimeError:
                    break  # every slot holds a guess or a read in flight
                budget -= 1
                st.loading[e] = self._start_read(layer, st, e, slot, GUESS)
                st.guessed.add(e)
            else:
                if not st.spare:
                    break  # staging is full: the rest are not read at all
                slot = st.spare.pop()
                st.staged[e] = (slot, self._start_read(layer, st, e, slot, GUESS))
            self.telemetry.record_prefetch(self.layout.record_nbytes)

    def pass_order(self, layer, experts) -> np.ndarray:
        """The order a pass that cannot hold all of ``experts`` at once
        should bring them in: coldest first, by this run's routes plus
        earlier runs' counts (warm start), so the hottest stay resident."""
        use = self.telemetry.lifetime_use_of(layer)[experts].astype(np.float64)
        prior = self.prior_counts.get(layer)
        if prior is not None:
            use = use + prior[experts]
        return np.asarray(experts)[np.argsort(use, kind="stable")]

    def preload(self, experts_per_layer) -> int:
        """Start reading ``{layer: experts}`` into the cache in the
        background (warm start); a layer asking for one before it has
        landed waits for it. Returns how many reads were started."""
        n = 0
        for layer, experts in experts_per_layer.items():
            if layer not in self.layout.locations:
                continue
            st = self._layer(layer)
            protected = [int(e) for e in experts][: self.slots]
            for e in protected:
                if st.expert_slot[e] >= 0 or not (st.free or self.identity):
                    continue
                slot = self._claim_slot(layer, st, e, protected)
                st.loading[e] = self._start_read(layer, st, e, slot, GUESS)
                n += 1
        self.telemetry.record_preload(n * self.layout.record_nbytes)
        return n

    def set_staging(self, staging: int):
        """Give every layer ``staging`` staging slots (memory on top of the
        budget); layers already in memory start again empty."""
        if self.identity or staging == self.staging:
            return
        for layer, st in self._layers.items():
            for e in np.flatnonzero(st.expert_slot >= 0):
                self.policy.remove(layer, int(e))
            for _, fut in (
                list(st.staged.values()) + st.retiring + [(None, f) for f in st.loading.values()]
            ):
                self._queue.withdraw(fut.pieces)
                try:
                    fut.result()
                except BaseException:
                    pass
        self._layers.clear()
        self.staging = int(staging)

    def warm(self, layers=None, progress=None):
        """Read every expert of ``layers`` (all MoE layers by default)."""
        for l in layers or self.layout.moe_layers:
            want = np.arange(min(self.slots, self.layout.num_experts))
            st = self._layer(l)
            missing = want[st.expert_slot[want] < 0]
            if len(missing):
                inline, self.inline_read_s = self.inline_read_s, -1.0  # all to the threads
                try:
                    f = self.begin_fetch(l, missing)
                finally:
                    self.inline_read_s = inline
                f._stats[:3] = [0, 0, len(missing) * self.layout.record_nbytes]
                f.wait_all()  # preloading is not demand: bytes, not misses
            if progress is not None:
                progress.update(1)

    def resident_nbytes(self):
        return sum(a.nbytes for st in self._layers.values() for a in st.pool.values())

    def close(self):
        for st in self._layers.values():
            for _, fut in st.staged.values():
                self._queue.withdraw(fut.pieces)
            st.staged.clear()
        self._queue.shutdown(wait=True)
        self.reader.close()

    # -- internals ---------------------------------------------------------
    def _layer(self, layer) -> _LayerSlots:
        st = self._layers.get(layer)
        if st is None:
            st = self._layers[layer] = _LayerSlots(self.layout, self.slots, self.staging)
        return st

    def _start_read(self, layer, st: _LayerSlots, expert: int, slot: int, priority) -> Future:
        """Start reading ``expert`` into ``slot``; the future gives what
        :meth:`_read_slot` returns. A large record that lands in place is
        read in pieces, one per read thread, queued back to back: a layer's
        misses then land one after another (the block computes each as it
        lands) while the disk still sees several reads at once. Read whole
        and together, they would all land at the end."""
        nbytes = self.layout.record_nbytes
        parts = min(self._queue.threads, nbytes // self.split_bytes)
        if priority == GUESS and parts >= 2:
            parts = max(parts, nbytes // self.guess_split_bytes)
        if parts < 2 or st.rows is None or not self.reader.reads_spans:
            fut = self._queue.submit(priority, self._read_slot, layer, st, expert, slot)
            fut.pieces = [fut]
            return fut
        spans = record_spans(nbytes, parts)
        dests = [rows[slot] for rows in st.rows]
        done = Future()
        done.set_running_or_notify_cancel()  # its slot is busy until every piece is in
        lock, left, errors, began = threading.Lock(), [len(spans)], [], []

        def piece(a, b):
            began.append(time.perf_counter())
            self.reader.read_span_into(layer, expert, dests, a, b)

        def landed(fut):
            with lock:
                left[0] -= 1
                if fut.cancelled():  # withdrawn (see _withdraw_guesses)
                    errors.append(futures.CancelledError())
                elif fut.exception() is not None:
                    errors.append(fut.exception())
                if left[0]:
                    return
            try:
                if errors:
                    raise errors[0]
                self.reader.check_into(layer, expert, dests)
            except BaseException as exc:
                done.set_exception(exc)
                return
            dt = time.perf_counter() - min(began)
            self._read_ema += 0.1 * (dt - self._read_ema)
            done.set_result((dt, None))

        done.pieces = [self._queue.submit(priority, piece, a, b) for a, b in spans]
        for fut in done.pieces:
            fut.add_done_callback(landed)
        return done

    def _read_slot(self, layer, st: _LayerSlots, expert: int, slot: int):
        """Read ``expert`` into ``slot``; returns (seconds, None) or, where
        the pool's memory is not writable, (seconds, record) to copy in."""
        t0 = time.perf_counter()
        if st.rows is None:
            buf = self.reader.read(layer, expert)
        else:
            buf = None
            self.reader.read_into(layer, expert, [rows[slot] for rows in st.rows])
        dt = time.perf_counter() - t0
        self._read_ema += 0.1 * (dt - self._read_ema)
        return dt, buf

    def _install_copy(self, st: _LayerSlots, slot: int, buf: np.ndarray):
        for name, a in records_to_arrays(buf.reshape(1, -1), self.layout).items():
            st.pool[name][slot : slot + 1] = a
        mx.eval(st.pool)

    def _victim_slot(self, layer, st: _LayerSlots, protected) -> int:
        if st.free:
            return st.free.pop()
        # Pass over experts still being read (taking one means waiting for
        # its read before this one can start) while any other will do.
        landing = [e for e, fut in st.loading.items() if not fut.done()]
        try:
            victim = self.policy.victim(layer, list(protected) + landing)
        except RuntimeError:
            victim = self.policy.victim(layer, protected)
        loading = st.loading.pop(victim, None)
        if loading is not None:  # its preload must land before the slot is reused
            try:
                loading.result()
            except BaseException:
                pass
        self.policy.remove(layer, victim)
        if victim in st.guessed:  # read on a guess and never used
            st.guessed.discard(victim)
            self.telemetry.record_wasted(self.layout.record_nbytes)
        slot = int(st.expert_slot[victim])
        st.expert_slot[victim] = -1
        st.slot_expert[slot] = -1
        self.telemetry.record_evictions(1)
        return slot

    def _claim_slot(self, layer, st: _LayerSlots, expert: int, protected) -> int:
        slot = expert if self.identity else self._victim_slot(layer, st, protected)
        st.expert_slot[expert] = slot
        st.slot_expert[slot] = expert
        self.policy.insert(layer, expert)
        return slot

    def _adopt(self, layer, st: _LayerSlots, expert: int, slot: int, protected):
        """A staged expert becomes resident where it was read; the slot it
        displaces (free or a victim's) becomes a staging slot."""
        st.spare.append(self._victim_slot(layer, st, protected))
        st.expert_slot[expert] = slot
        st.slot_expert[slot] = expert
        self.policy.insert(layer, expert)

    def _forget(self, layer, st: _LayerSlots, expert: int):
        """A read failed: the slot holds nothing usable."""
        st.loading.pop(expert, None)
        st.guessed.discard(expert)
        slot = int(st.expert_slot[expert])
        if slot < 0:
            return
        st.expert_slot[expert] = -1
        st.slot_expert[slot] = -1
        self.policy.remove(layer, expert)
        if not self.identity:
            st.free.append(slot)

    def _withdraw_guesses(self, layer, st: _LayerSlots, wanted):
        """Guesses read into the cache for this layer that its pass does not
        want and whose reads have not started are taken back: their slots
        are free again and the disk never carries them."""
        for e in [e for e in st.guessed if e in st.loading and e not in wanted]:
            if self._queue.withdraw(st.loading[e].pieces):
                self._forget(layer, st, e)
                self.telemetry.record_withdrawn(self.layout.record_nbytes)

    def _expire_staged(self, st: _LayerSlots):
        """Guesses for this pass of the layer that it did not use are waste
        (unless taken back before their reads started); their slots return
        to staging once their reads have finished."""
        for e, (slot, fut) in list(st.staged.items()):
            del st.staged[e]
            if self._queue.withdraw(fut.pieces):
                st.spare.append(slot)
                self.telemetry.record_withdrawn(self.layout.record_nbytes)
                continue
            st.retiring.append((slot, fut))
            self.telemetry.record_wasted(self.layout.record_nbytes)
        self._reclaim(st)

    @staticmethod
    def _reclaim(st: _LayerSlots):
        keep = []
        for slot, fut in st.retiring:
            (st.spare.append(slot) if fut.done() else keep.append((slot, fut)))
        st.retiring = keep

    def _maybe_complete(self, layer, st: _LayerSlots):
        if self.identity and (st.expert_slot >= 0).all():
            self._complete.add(layer)

"""A layer's forward pass over more experts than its cache holds.

A long prompt at a small budget routes to more distinct experts in one
layer than the layer has slots. Its routes run expert-major: each expert is
read at most once per pass and computed on all of its routes at once.

``plan`` orders the pass. Where the store ranks experts by use, the hottest
resident ones (up to half the slots) are *kept*: they stay for the whole
pass and for the decoding after it. The other resident ones run before any
read can evict them, so no resident expert is read twice; the rest are read
coldest first, so the hottest are the ones resident when the pass ends.

``stream`` runs a plan on a store that reads in the background: a read
starts whenever a slot is free, and compute takes whatever has landed (or
is resident and not yet run) as soon as it is there. The disk is never idle
while there is room and work left, and compute waits only when nothing at
all is ready. Each route is still computed from its expert's full weights,
and every row of the gather kernels depends on its own weights and inputs
alone, so the order of the calls does not change a bit of the output.
"""

from typing import Callable, List, Tuple

import mlx.core as mx
import numpy as np

# compute(pool, experts, slots) -> (routes, outputs), outputs started.
Compute = Callable[[dict, np.ndarray, np.ndarray], Tuple[np.ndarray, object]]


def plan(store, layer, experts: np.ndarray, cap: int):
    """``(keep, here, todo)``: resident experts kept through the pass, the
    other resident ones (run first) and the ones to read, in that order.
    Without a ranking store every expert is simply to be fetched."""
    rank = getattr(store, "pass_order", None)
    none = experts[:0]
    if rank is None:
        return none, none, experts
    ranked = rank(layer, experts)  # coldest first
    resident = store.resident_mask(layer, ranked)
    keep = np.sort(ranked[resident][::-1][: cap // 2])
    here = ranked[resident & ~np.isin(ranked, keep)]
    return keep, here, ranked[~resident]


def chunks(keep, here, todo, cap) -> List[np.ndarray]:
    """The plan as consecutive chunks that each fit beside the kept
    experts (for stores that fetch synchronously); the kept ones last."""
    room = cap - len(keep)
    out = [np.sort(part[i : i + room]) for part in (here, todo) for i in range(0, len(part), room)]
    return out + ([keep] if len(keep) else [])


class _Stream:
    """The state of one streamed pass (see ``stream``)."""

    def __init__(self, store, layer, keep, here, todo, cap, compute: Compute):
        self.store, self.layer, self.cap, self.compute = store, layer, cap, compute
        self.keep = [int(e) for e in keep]
        self.kept = frozenset(self.keep)
        self.here = [int(e) for e in here]
        self.todo = [int(e) for e in todo]
        # Experts that must not be evicted: kept, not yet run, or landing.
        self.held = set(self.keep) | set(self.here)
        self.landing = []  # (expert, Fetch) in the order the reads were queued
        self.landed = []
        # Compute a batch of at most half the free room, so the other half
        # is read meanwhile when compute is the slower of the two.
        self.step = max(1, (cap - len(self.keep)) // 2)
        self.outs, self.done = [], []

    def start_reads(self):
        while self.todo and len(self.held) < self.cap:
            e = self.todo.pop(0)
            f = self.store.begin_fetch(self.layer, np.array([e]), keep=sorted(self.held))
            self.held.add(e)
            self.landing.append((e, f))

    def collect_landed(self):
        still = []
        for e, f in self.landing:
            (self.landed if f.ready(0) else still).append((e, f))
        self.landing = still

    def next_batch(self):
        """``(pool, experts, slots)`` to compute next, waiting for a read
        only when nothing else is ready."""
        self.collect_landed()
        if self.landed:
            batch, self.landed = self.landed[: self.step], self.landed[self.step :]
            return self.arrived(batch)
        if self.landing and not self.here and self.keep:
            batch, self.keep = self.keep[:1], self.keep[1:]  # while the read lands
        elif self.landing and not self.here:
            batch, self.landing = self.landing[:1], self.landing[1:]
            return self.arrived(batch)  # waits: the pass's read wait
        elif self.here:
            batch, self.here = self.here[: self.step], self.here[self.step :]
        else:
            batch, self.keep = self.keep, []
        experts = np.array(sorted(batch))
        f = self.store.begin_fetch(self.layer, experts, keep=sorted(self.held))
        f.wait_all()  # resident: a preload may still be landing
        return f.pool, experts, f.slots

    @staticmethod
    def arrived(batch):
        for _, f in batch:
            f.wait_all()
        pool = batch[0][1].pool
        return pool, np.array([e for e, _ in batch]), np.array([f.slots[0] for _, f in batch])

    def run(self, pool, experts, slots):
        routes, y = self.compute(pool, experts, slots)
        mx.eval(y)  # its slots are free again only once it is computed
        self.held.difference_update(set(experts.tolist()) - self.kept)
        self.outs.append(y)
        self.done.append(routes)

    def finish_quietly(self):
        """After a failure: let every read in flight land before the error
        leaves (a later pass counts their slots as holding whole experts)."""
        for _, f in self.landing + self.landed:
            for i in list(f.pending):
                f.wait_quietly(i)


def stream(store, layer, keep, here, todo, cap, compute: Compute):
    """Run a plan on a background-reading store; ``(outputs, routes)`` of
    every compute call, in the order they ran."""
    s = _Stream(store, layer, keep, here, todo, cap, compute)
    try:
        while s.todo or s.landing or s.landed or s.here or s.keep:
            s.start_reads()  # into every free slot; they land while the batch computes
            s.run(*s.next_batch())
    except BaseException:
        s.finish_quietly()
        raise
    return s.outs, s.done

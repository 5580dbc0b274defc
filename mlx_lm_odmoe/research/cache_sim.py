"""Trace-driven simulation of the per-layer expert cache, with prefetch.

The cache is :class:`CachedStore`'s: each MoE layer has ``slots`` slots, a
request brings all of one pass's experts in (they are protected from
eviction meanwhile), and a :class:`CachePolicy` picks victims. Replaying a
trace token by token (a decode) counts hits, misses, evictions and bytes.

With prefetch, a predictor's top-``width`` experts for layer t, made at
layer t - ``lead``, that are not resident are read into a small per-layer
*staging area* (FIFO, ``staging`` slots carved out of the layer's budget,
so the total memory is the same; layers nothing predicts keep all their
slots). Staging never evicts the working set. A request served from staging
is a prefetch hit (no demand read; the expert moves into the cache proper);
a staged expert dropped unused is a wasted prefetch.

The CLI, ``mlx_lm_odmoe.simulate``, is in policy_search.py.
"""

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from ..store.policy import CachePolicy, LRUPolicy
from .traces import Trace


@dataclass
class Counts:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    wasted: int = 0

    @property
    def hit_rate(self) -> float:
        return (self.hits + self.prefetch_hits) / max(self.requests, 1)

    @property
    def wasted_per_miss(self) -> float:
        return self.wasted / max(self.misses, 1)

    def as_dict(self, record_nbytes: int = 0) -> dict:
        d = asdict(self)
        d.update(
            hit_rate=self.hit_rate,
            wasted_per_miss=self.wasted_per_miss,
            miss_bytes=self.misses * record_nbytes,
            wasted_bytes=self.wasted * record_nbytes,
            bytes_read=(self.misses + self.prefetches) * record_nbytes,
        )
        return d


class SimCache:
    """Every MoE layer's resident set, as :class:`CachedStore` manages it."""

    def __init__(
        self, slots: Dict[int, int], policy: CachePolicy, staging: Optional[Dict[int, int]] = None
    ):
        self.slots, self.policy = dict(slots), policy
        self.staging_slots = dict(staging or {})
        self.resident: Dict[int, set] = {l: set() for l in slots}
        self.staged: Dict[int, OrderedDict] = {l: OrderedDict() for l in slots}
        self.counts = Counts()

    def fetch(self, layer: int, experts) -> None:
        """One pass's (unique) experts at ``layer``; mirrors CachedStore.fetch."""
        c, res, staged = self.counts, self.resident[layer], self.staged[layer]
        experts = [int(e) for e in experts]
        c.requests += len(experts)
        missing = [e for e in experts if e not in res]
        for e in experts:
            if e in res:
                c.hits += 1
                self.policy.touch(layer, e)
        for e in missing:
            if e in staged:
                del staged[e]
                c.prefetch_hits += 1
            else:
                c.misses += 1
            self._claim(layer, e, experts)

    def _claim(self, layer, expert, protected):
        res = self.resident[layer]
        if len(res) >= self.slots[layer]:
            victim = self.policy.victim(layer, protected)
            self.policy.remove(layer, victim)
            res.discard(victim)
            self.counts.evictions += 1
        res.add(expert)
        self.policy.insert(layer, expert)

    def prefetch(self, layer: int, experts) -> None:
        """Stage ``experts`` (best first) that are neither resident nor staged."""
        cap = self.staging_slots.get(layer, 0)
        staged = self.staged[layer]
        for e in experts:
            e = int(e)
            if cap == 0 or e < 0 or e in self.resident[layer] or e in staged:
                continue
            if len(staged) >= cap:
                staged.popitem(last=False)
                self.counts.wasted += 1
            staged[e] = None
            self.counts.prefetches += 1

    def finish(self) -> Counts:
        """Counts, with experts still staged and never used as wasted."""
        self.counts.wasted += sum(len(s) for s in self.staged.values())
        for s in self.staged.values():
            s.clear()
        return self.counts


def uniform_slots(
    moe_layers: List[int], num_experts: int, residency: float, top_k: int
) -> Dict[int, int]:
    """``residency`` x E slots in every layer (at least top-k)."""
    n = max(top_k, int(round(residency * num_experts)))
    return {l: n for l in moe_layers}


def hit_curves(
    trace: Trace, policy_factory: Callable[[], CachePolicy] = LRUPolicy
) -> Dict[int, list]:
    """Per layer, hits at every slot count from top-k to E (index = slots)."""
    k, E = trace.top_k, trace.num_experts
    curves = {}
    for i, l in enumerate(trace.moe_layers):
        one = Trace(
            trace.hidden[i : i + 1],
            trace.topk[i : i + 1],
            trace.tokens,
            trace.seq,
            trace.generated,
            [l],
            E,
        )
        curves[l] = [0] * k + [run(one, {l: n}, policy_factory()).hits for n in range(k, E + 1)]
    return curves


def allocate_slots(curves: Dict[int, list], total: int, top_k: int) -> Dict[int, int]:
    """Split ``total`` slots over the layers where they buy the most hits
    (greedy on the marginal hits of :func:`hit_curves`)."""
    slots = {l: top_k for l in curves}
    for _ in range(max(0, total - top_k * len(curves))):
        open_ = [l for l in curves if slots[l] + 1 < len(curves[l])]
        if not open_:
            break
        best = max(open_, key=lambda l: curves[l][slots[l] + 1] - curves[l][slots[l]])
        slots[best] += 1
    return slots


def predictions(
    predictor, trace: Trace, lead: int, width: int, min_prob: float = 0.0
) -> np.ndarray:
    """[Lm, T, width]: at row j, each position's top-``width`` experts for
    MoE layer j as predicted at layer j - ``lead`` (-1 where there is none).

    For predictors whose scores are logits (``calibrated``, the shadow
    model), experts whose softmax probability is under ``min_prob`` are
    left out: a guess that is likely wrong costs a read and a staging slot.
    """
    from .evaluate import replay

    out = np.full(trace.topk.shape[:2] + (width,), -1, dtype=np.int64)
    threshold = min_prob if getattr(predictor, "calibrated", False) else 0.0

    def sink(src, tgt, idx, scores):
        if tgt - src != lead:
            return
        top = np.argsort(-scores, axis=-1, kind="stable")[:, :width]
        if threshold > 0:
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            top = np.where(np.take_along_axis(p, top, -1) >= threshold, top, -1)
        out[tgt, idx] = top

    replay(predictor, trace, np.ones(len(trace.tokens), bool), sink)
    return out


def run(
    trace: Trace,
    slots: Dict[int, int],
    policy: CachePolicy,
    staged: Optional[np.ndarray] = None,
    staging: int = 0,
    lead: int = 1,
) -> Counts:
    """Replay ``trace`` token by token (one request per layer per token).

    ``staged`` (from :func:`predictions` with the same ``lead``) turns on
    prefetch into ``staging`` slots per layer, taken from ``slots``.
    """
    layers = trace.moe_layers
    if staged is not None:
        # Only layers that get predictions (lead or more MoE layers deep) stage.
        stage = {l: staging if i >= lead else 0 for i, l in enumerate(layers)}
        cache = SimCache({l: s - stage[l] for l, s in slots.items()}, policy, stage)
    else:
        cache = SimCache(slots, policy)
    if hasattr(policy, "bind"):
        policy.bind(trace)
    for t in range(len(trace.tokens)):
        if hasattr(policy, "at"):
            policy.at(t)
        for i, l in enumerate(layers):
            cache.fetch(l, np.unique(trace.topk[i, t]))
            # Once layer i has routed, its predictions for layer i + lead go out.
            if staged is not None and i + lead < len(layers):
                cache.prefetch(layers[i + lead], staged[i + lead, t])
    return cache.finish()


class BeladyPolicy(CachePolicy):
    """The offline optimum: evict the expert needed furthest in the future.
    An upper bound for any real policy; it reads the whole trace ahead."""

    def bind(self, trace: Trace):
        T = len(trace.tokens)
        self._next, self.resident, self.now = {}, {}, 0
        for i, l in enumerate(trace.moe_layers):
            nxt = np.full((T + 1, trace.num_experts), T + 1, dtype=np.int64)
            for t in range(T - 1, -1, -1):
                nxt[t] = nxt[t + 1]
                nxt[t, trace.topk[i, t]] = t
            self._next[l], self.resident[l] = nxt, set()

    def at(self, t):
        self.now = t

    def insert(self, layer, expert):
        self.resident[layer].add(expert)

    def touch(self, layer, expert):
        pass

    def remove(self, layer, expert):
        self.resident[layer].discard(expert)

    def victim(self, layer, protected):
        protected = set(protected)
        nxt = self._next[layer][self.now + 1]
        return max((e for e in self.resident[layer] if e not in protected), key=lambda e: nxt[e])

"""Online adaptation of the shadow model's scores, from routes it sees anyway.

A prediction for MoE layer t made at an earlier layer is checked, for free,
when layer t routes: the block hands the predictor layer t's true top-k
(``guesses``/``host_guesses``/``observe``/``host_observe``). Each such
arrival is a labelled example of the text being served. Per (source layer,
distance) this keeps

    scores = gate * correction + rest + bias [+ sum of pair[c] over the
                                               experts c layer L chose]

where ``correction`` is the learned head's output, ``rest`` the lookahead
and previous-token terms, ``bias`` [E] starts at zero and ``gate`` at one,
and takes one SGD step of the training loss (listwise cross-entropy against
the true top-k) on ``bias`` and ``gate`` per arrival:

* ``bias`` tracks which experts this request's text uses, what the trained
  head's own bias learned only for the training text;
* ``gate`` switches the correction off where it ranks worse than the free
  lookahead on this text: each arrival also scores both rankings' top-k,
  and the gate is 1 while the shadow's decayed recall (rate
  ``switch_rate``) is at least the lookahead's, else 0. (The loss gradient
  is a poor judge of that: a correction that sharpens a flat sigmoid prior
  lowers the cross-entropy while it ranks worse. With ``switch_rate`` 0
  the gate is learned by SGD at ``gate_lr`` instead.)
* ``pair`` [E, E] (unless ``pair_lr`` is 0) learns this text's co-occurrence
  of layer L's experts with layer t's, on top of the trained one.

Both decay towards their start and are reset per request. The arithmetic is
a softmax over E per row and target: a few microseconds in numpy, and lazy
(no host sync) in MLX.
"""

from typing import Dict, List

import mlx.core as mx
import numpy as np

DEFAULTS = {
    "bias_lr": 0.3,
    "gate_lr": 0.02,
    "pair_lr": 0.3,
    "switch_rate": 0.05,
    "decay": 0.002,
    "bias_clip": 4.0,
    "gate_max": 1.5,
}


class OnlineCorrection:
    """Per-(source, distance) ``bias`` and ``gate``, on numpy or MLX arrays.

    :meth:`terms` gives the current values for a step, :meth:`remember` keeps
    the step's scores and correction, and :meth:`learn` (with a layer's true
    ids) updates from every prediction waiting for that layer. Each source
    layer's values sit in one array per kind ([distance, 1], [distance, E]),
    so a step's terms are views and an update touches one row in place.
    """

    def __init__(self, num_experts: int, distance: int, xp=np, **settings):
        self.num_experts, self.distance, self.xp = num_experts, distance, xp
        s = {**DEFAULTS, **settings}
        self.bias_lr, self.gate_lr, self.decay = s["bias_lr"], s["gate_lr"], s["decay"]
        self.pair_lr, self.switch_rate = s["pair_lr"], s["switch_rate"]
        self.bias_clip, self.gate_max = s["bias_clip"], s["gate_max"]
        self.reset()

    def reset(self):
        self._gate: Dict[int, object] = {}  # source -> [distance, 1]
        self._bias: Dict[int, object] = {}  # source -> [distance, E]
        self._pair: Dict[int, object] = {}  # source -> [distance, E (at L), E (at t)]
        self._recall: Dict[int, object] = {}  # source -> [distance, 2]: shadow, lookahead
        self._pending: Dict[int, List[tuple]] = {}
        self._deferred: List[tuple] = []  # decode rows' arrivals, learnt in one batch
        self._deferred_keys = set()  # their (source, distance index)
        self._deferred_sources = set()
        self._rows: Dict[int, int] = {}  # numpy: source -> its row in _stack
        kinds = ("gate", "bias", "recall") + (("pair",) if self.pair_lr else ())
        self._stack = {kind: self._fresh(kind, 0) for kind in kinds} if self.xp is np else {}

    def terms(self, source: int, targets: List[int], cur=None):
        """(gate [m, 1], bias [m, E]) for ``source``'s step to its first m
        later layers ``targets``; with pairs learned, the bias is per row of
        ``cur`` (the experts ``source`` chose, [N, k]): [N, m, E]."""
        if source in self._deferred_sources:
            self._flush()
        gate, bias = self._state(source)
        m = len(targets)
        if not self.pair_lr or cur is None:
            return gate[:m], bias[:m]
        pair = self.xp.take(self._pair[source][:m], cur, axis=1).sum(axis=2)  # [m, N, E]
        return gate[:m], bias[:m] + pair.transpose(1, 0, 2)

    def _state(self, source: int):
        if source not in self._gate:
            if self.xp is np:
                self._add_row(source)
            else:
                E = self.num_experts
                self._gate[source] = mx.ones((self.distance, 1), dtype=mx.float32)
                self._bias[source] = mx.zeros((self.distance, E), dtype=mx.float32)
                self._recall[source] = mx.zeros((self.distance, 2), dtype=mx.float32)
                if self.pair_lr:
                    self._pair[source] = mx.zeros((self.distance, E, E), dtype=mx.float32)
        return self._gate[source], self._bias[source]

    def _add_row(self, source: int):
        """numpy: each source's values are one row of an array per kind
        (the dicts hold views), so a batch of arrivals from several sources
        updates each kind in one operation."""
        row = self._rows[source] = len(self._rows)
        if row == len(self._stack["gate"]):  # full: double
            self._stack = {
                kind: np.concatenate([a, self._fresh(kind, max(4, len(a)))])
                for kind, a in self._stack.items()
            }
            for src in self._rows:
                self._bind(src)
        else:
            self._bind(source)

    def _bind(self, source):
        row = self._rows[source]
        for kind, views in (("gate", self._gate), ("bias", self._bias), ("recall", self._recall)):
            views[source] = self._stack[kind][row]
        if self.pair_lr:
            self._pair[source] = self._stack["pair"][row]

    def _fresh(self, kind: str, n: int) -> np.ndarray:
        d, E = self.distance, self.num_experts
        shape = {"gate": (1,), "bias": (E,), "recall": (2,), "pair": (E, E)}[kind]
        fill = np.ones if kind == "gate" else np.zeros
        return fill((n, d) + shape, dtype=np.float32)

    def remember(self, source, targets, scores, correction, cur=None, lookahead=None):
        """Keep ``scores``, ``correction`` and ``lookahead`` (the prior's
        term, [N, m, E]) until each target's true ids arrive, and ``cur``
        (the source's own ids) for pairs."""
        for j, t in enumerate(targets):
            look = None if lookahead is None else lookahead[:, j]
            self._pending.setdefault(t, []).append(
                (source, j, scores[:, j], correction[:, j], cur, look)
            )

    def remember_row(self, source, targets, scores, correction, cur, lookahead):
        """:meth:`remember` for one decode row, given as [m, E] arrays."""
        for j, t in enumerate(targets):
            self._pending.setdefault(t, []).append(
                (source, j, scores[j : j + 1], correction[j : j + 1], cur, lookahead[j : j + 1])
            )

    def learn(self, layer: int, truth) -> None:
        """One step on every prediction made for ``layer``, whose true top-k
        ([N, k]) is ``truth``."""
        waiting = self._pending.pop(layer, None)
        if not waiting:
            return
        xp = self.xp
        truth = truth.reshape(-1, truth.shape[-1])
        if xp is np and truth.shape[0] == 1 and self.switch_rate and all(map(_one_row, waiting)):
            return self._defer(waiting, truth)
        self._flush()
        target = _hot(xp, truth, self.num_experts) / truth.shape[-1]
        for source, j, scores, corr, cur, look in waiting:
            if scores.shape[0] != truth.shape[0]:
                continue  # rows of another pass (a new prompt): nothing to learn
            gate, bias = self._state(source)
            # The bias and pairs learn for the scores with the gate open.
            full = scores if look is None else look + corr
            g = _softmax(xp, full) - target  # d loss / d scores, per row
            mean_g = g[0] if g.shape[0] == 1 else g.mean(axis=0)  # decode: skip a reduction
            b = bias[j] * (1 - self.decay) - self.bias_lr * mean_g
            if self.switch_rate and look is not None:
                k = truth.shape[-1]
                gate[j] = self._switch(self._recall[source], j, full, look, target, k)
            else:
                g = _softmax(xp, scores) - target
                a = gate[j] + self.decay * (1.0 - gate[j])
                a = a - self.gate_lr * (g * corr).sum(axis=-1).mean(axis=0, keepdims=True)
                gate[j] = xp.clip(a, 0.0, self.gate_max)
            bias[j] = xp.clip(b, -self.bias_clip, self.bias_clip)
            if self.pair_lr and cur is not None:
                self._learn_pair(self._pair[source], j, cur, g)

    def _defer(self, waiting, truth):
        """Decode rows: a source's values are next read at its next step
        (:meth:`terms`), a token later, so a token's arrivals from every
        layer are learnt together there, as one batch of vectors."""
        for w in waiting:
            key = (w[0], w[1])
            if key in self._deferred_keys:  # a second arrival for the same values
                self._flush()
            self._deferred.append((w, truth[0]))
            self._deferred_keys.add(key)
            self._deferred_sources.add(key[0])

    def _flush(self):
        """:meth:`learn` for the deferred decode rows (one per source and
        distance), in numpy, on every row at once."""
        if not self._deferred:
            return
        batch, self._deferred = self._deferred, []
        self._deferred_keys, self._deferred_sources = set(), set()
        for (source, *_), _ in batch:
            if source not in self._rows:
                self._state(source)
        n, E, k = len(batch), self.num_experts, batch[0][1].shape[-1]
        at = (
            np.array([self._rows[w[0]] for w, _ in batch]),
            np.array([w[1] for w, _ in batch]),
        )
        rows = np.arange(2 * n)[:, None]
        look = np.concatenate([w[5] for w, _ in batch])
        full = look + np.concatenate([w[3] for w, _ in batch])
        target = np.zeros((n, E), dtype=np.float32)
        target[rows[:n], np.array([t for _, t in batch])] = 1.0 / k
        e = np.exp(full - full.max(axis=-1, keepdims=True))
        g = e / e.sum(axis=-1, keepdims=True) - target
        r, keep, S = self.switch_rate, 1 - self.decay, self._stack
        b = S["bias"][at] * keep - self.bias_lr * g
        S["bias"][at] = np.clip(b, -self.bias_clip, self.bias_clip, out=b)
        # Decayed top-k recall of the shadow's ranking and the lookahead's,
        # both from one partition; the gate stays open while the shadow's
        # is at least the lookahead's.
        top = np.argpartition(-np.concatenate([full, look]), k - 1, axis=-1)[:, :k]
        hits = target[rows % n, top].sum(-1).reshape(2, n).T
        rec = S["recall"][at] * (1 - r) + r * hits
        S["recall"][at] = rec
        S["gate"][at] = rec[:, :1] >= rec[:, 1:]
        if self.pair_lr:
            self._learn_pairs(batch, at, g, keep)

    def _learn_pairs(self, batch, at, g, keep):
        """pair[c] -= lr * g for each row's own experts c (distinct per row)."""
        curs = [w[4] for w, _ in batch]
        if any(c is None for c in curs):  # only rows that know their experts
            has = np.array([c is not None for c in curs])
            if not has.any():
                return
            at, g, curs = (at[0][has], at[1][has]), g[has], [c for c in curs if c is not None]
        cur = np.concatenate(curs)
        P = self._stack["pair"]
        P[at] *= keep
        P[at[0][:, None], at[1][:, None], cur] -= (self.pair_lr / cur.shape[-1]) * g[:, None, :]

    def _switch(self, recall, j, full, look, target, k):
        """1 while the full scores' decayed top-k recall is at least the
        lookahead's (ties keep the trained model), else 0; shape [1]."""
        xp, r = self.xp, self.switch_rate
        if xp is mx:
            hits = mx.stack([_recall(mx, full, target, k), _recall(mx, look, target, k)])
            recall[j] = (1 - r) * recall[j] + r * hits
            return (recall[j][:1] >= recall[j][1:]).astype(mx.float32)
        rec = recall[j]  # numpy: two scalars, updated in place
        rec *= 1 - r
        rec[0] += r * _recall(np, full, target, k)
        rec[1] += r * _recall(np, look, target, k)
        return np.float32(rec[0] >= rec[1])

    def _learn_pair(self, pair, j, cur, g):
        """pair[j][c] -= lr * g for each row's own experts c (distinct per row)."""
        step = -self.pair_lr * g[:, None, :] / cur.shape[-1]  # [N, 1, E]
        if self.xp is mx:
            pair[j] = (
                (pair[j] * (1 - self.decay))
                .at[cur]
                .add(mx.broadcast_to(step, cur.shape + step.shape[-1:]))
            )
        else:
            pair[j] *= 1 - self.decay
            if cur.shape[0] == 1:  # decode: one row, distinct ids, no repeated index
                pair[j][cur[0]] += step[0]
            else:
                np.add.at(pair[j], cur, np.broadcast_to(step, cur.shape + step.shape[-1:]))


def _one_row(waiting) -> bool:
    """A decode prediction: one row, with its lookahead term."""
    _, _, scores, _, _, look = waiting
    return scores.shape[0] == 1 and look is not None


def _recall(xp, scores, target, k):
    """Mean |top-k(scores) ∩ truth| / k over the rows; ``target`` is the
    truth's multi-hot over k, so the top-k's share of it is the recall."""
    top = xp.argpartition(-scores, k - 1, axis=-1)[:, :k]
    if xp is mx:
        return mx.take_along_axis(target, top, axis=-1).sum() / scores.shape[0]
    if scores.shape[0] == 1:  # decode: plain indexing is several times cheaper
        return float(target[0, top[0]].sum())
    return float(target[np.arange(len(top))[:, None], top].sum()) / len(top)


def _softmax(xp, s):
    if xp is mx:
        return mx.softmax(s, axis=-1)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _hot(xp, ids, num_experts: int):
    """[N, E] float32 with ones at each row's ids."""
    if xp is mx:
        return (
            (ids.astype(mx.int32)[..., None] == mx.arange(num_experts))
            .any(axis=-2)
            .astype(mx.float32)
        )
    hot = np.zeros((ids.shape[0], num_experts), dtype=np.float32)
    hot[np.arange(ids.shape[0])[:, None], ids] = 1.0
    return hot

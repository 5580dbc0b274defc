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

    def terms(self, source: int, targets: List[int], cur=None):
        """(gate [m, 1], bias [m, E]) for ``source``'s step to its first m
        later layers ``targets``; with pairs learned, the bias is per row of
        ``cur`` (the experts ``source`` chose, [N, k]): [N, m, E]."""
        gate, bias = self._state(source)
        m = len(targets)
        if not self.pair_lr or cur is None:
            return gate[:m], bias[:m]
        pair = self.xp.take(self._pair[source][:m], cur, axis=1).sum(axis=2)  # [m, N, E]
        return gate[:m], bias[:m] + pair.transpose(1, 0, 2)

    def _state(self, source: int):
        if source not in self._gate:
            xp = self.xp
            self._gate[source] = xp.ones((self.distance, 1), dtype=xp.float32)
            self._bias[source] = xp.zeros((self.distance, self.num_experts), dtype=xp.float32)
            self._recall[source] = xp.zeros((self.distance, 2), dtype=xp.float32)
            if self.pair_lr:
                E = self.num_experts
                self._pair[source] = xp.zeros((self.distance, E, E), dtype=xp.float32)
        return self._gate[source], self._bias[source]

    def remember(self, source, targets, scores, correction, cur=None, lookahead=None):
        """Keep ``scores``, ``correction`` and ``lookahead`` (the prior's
        term, [N, m, E]) until each target's true ids arrive, and ``cur``
        (the source's own ids) for pairs."""
        for j, t in enumerate(targets):
            look = None if lookahead is None else lookahead[:, j]
            self._pending.setdefault(t, []).append(
                (source, j, scores[:, j], correction[:, j], cur, look)
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
            return self._learn_row(waiting, truth)
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

    def _learn_row(self, waiting, truth):
        """:meth:`learn` for one decode row in numpy, on vectors."""
        k = truth.shape[-1]
        target = np.zeros(self.num_experts, dtype=np.float32)
        target[truth[0]] = 1.0 / k
        r, keep = self.switch_rate, 1 - self.decay
        for source, j, scores, corr, cur, look in waiting:
            gate, bias = self._state(source)
            full = look[0] + corr[0]
            e = np.exp(full - full.max())
            g = e / e.sum() - target
            b = bias[j] * keep - self.bias_lr * g
            rec = self._recall[source][j]  # shadow's and lookahead's decayed recall
            rec *= 1 - r
            rec[0] += r * float(target[np.argpartition(-full, k - 1)[:k]].sum())
            rec[1] += r * float(target[np.argpartition(-look[0], k - 1)[:k]].sum())
            gate[j] = np.float32(rec[0] >= rec[1])
            np.clip(b, -self.bias_clip, self.bias_clip, out=bias[j])
            if self.pair_lr and cur is not None:
                pair = self._pair[source][j]
                pair *= keep
                pair[cur[0]] -= (self.pair_lr / cur.shape[-1]) * g

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

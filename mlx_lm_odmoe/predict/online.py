"""Online adaptation of the shadow model's scores, from routes it sees anyway.

A prediction for MoE layer t made at an earlier layer is checked, for free,
when layer t routes: the block hands the predictor layer t's true top-k
(``guesses``/``host_guesses``/``observe``/``host_observe``). Each such
arrival is a labelled example of the text being served. Per (source layer,
distance) this keeps

    scores = gate * correction + rest + bias

where ``correction`` is the learned head's output, ``rest`` the lookahead
and previous-token terms, ``bias`` [E] starts at zero and ``gate`` at one,
and takes one SGD step of the training loss (listwise cross-entropy against
the true top-k) on ``bias`` and ``gate`` per arrival:

* ``bias`` tracks which experts this request's text uses, what the trained
  head's own bias learned only for the training text;
* ``gate`` shrinks the correction where it hurts on this text, so the
  scores fall back towards the free lookahead instead of staying worse.

Both decay towards their start and are reset per request. The arithmetic is
a softmax over E per row and target: a few microseconds in numpy, and lazy
(no host sync) in MLX.
"""

from typing import Dict, List, Tuple

import mlx.core as mx
import numpy as np

DEFAULTS = {"bias_lr": 0.3, "gate_lr": 0.02, "decay": 0.002, "bias_clip": 4.0, "gate_max": 1.5}


class OnlineCorrection:
    """Per-(source, distance) ``bias`` and ``gate``, on numpy or MLX arrays.

    :meth:`terms` gives the current values for a step, :meth:`remember` keeps
    the step's scores and correction, and :meth:`learn` (with a layer's true
    ids) updates from every prediction waiting for that layer.
    """

    def __init__(self, num_experts: int, xp=np, **settings):
        self.num_experts, self.xp = num_experts, xp
        s = {**DEFAULTS, **settings}
        self.bias_lr, self.gate_lr, self.decay = s["bias_lr"], s["gate_lr"], s["decay"]
        self.bias_clip, self.gate_max = s["bias_clip"], s["gate_max"]
        self.reset()

    def reset(self):
        self._bias: Dict[Tuple[int, int], object] = {}
        self._gate: Dict[Tuple[int, int], object] = {}
        self._pending: Dict[int, List[tuple]] = {}

    def terms(self, source: int, targets: List[int]):
        """(gate [m, 1], bias [m, E]) for ``source``'s step to ``targets``."""
        xp = self.xp
        one, zero = xp.ones((1,), dtype=xp.float32), xp.zeros((self.num_experts,), dtype=xp.float32)
        gate = xp.stack([self._gate.get((source, t), one) for t in targets])
        return gate, xp.stack([self._bias.get((source, t), zero) for t in targets])

    def remember(self, source: int, targets: List[int], scores, correction):
        """Keep ``scores`` and ``correction`` ([N, m, E]) until each target's
        true ids arrive."""
        for j, t in enumerate(targets):
            self._pending.setdefault(t, []).append((source, scores[:, j], correction[:, j]))

    def learn(self, layer: int, truth) -> None:
        """One step on every prediction made for ``layer``, whose true top-k
        ([N, k]) is ``truth``."""
        waiting = self._pending.pop(layer, None)
        if not waiting:
            return
        xp, E = self.xp, self.num_experts
        truth = truth.reshape(-1, truth.shape[-1])
        target = _hot(xp, truth, E) / truth.shape[-1]
        for source, scores, corr in waiting:
            if scores.shape[0] != truth.shape[0]:
                continue  # rows of another pass (a new prompt): nothing to learn
            g = _softmax(xp, scores) - target  # d loss / d scores, per row
            key = (source, layer)
            bias = self._bias.get(key, 0.0) * (1 - self.decay) - self.bias_lr * g.mean(axis=0)
            gate = self._gate.get(key, 1.0)
            step = (g * corr).sum(axis=-1).mean(axis=0, keepdims=True)
            gate = gate + self.decay * (1.0 - gate) - self.gate_lr * step
            self._bias[key] = xp.clip(bias, -self.bias_clip, self.bias_clip)
            self._gate[key] = xp.clip(gate, 0.0, self.gate_max)


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

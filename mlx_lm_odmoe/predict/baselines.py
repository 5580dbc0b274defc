"""The free baselines: the later layers' own routers, the previous token's
experts, and each layer's most used experts."""

from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from .base import ExpertPredictor, later_layers
from .routers import router_scores


def multi_hot(ids: mx.array, num_experts: int) -> mx.array:
    """[N, E] float32 with 1 at each row's ``ids`` ([N, k]); -1 ids are ignored."""
    ids = ids.astype(mx.int32)
    hot = (ids[..., None] == mx.arange(num_experts)).astype(mx.float32)
    return hot.max(axis=-2) if ids.shape[-1] else mx.zeros(ids.shape[:-1] + (num_experts,))


class RouterLookahead(ExpertPredictor):
    """Layer t's router applied to layer L's block input (t = L+1..L+d).

    Free: the router weights are the model's own. It works as far as the
    residual stream changes little between layers.
    """

    name = "router-lookahead"

    def __init__(self, model, moe_layers: List[int], distance: int = 4):
        self.model, self.moe_layers, self.distance = model, list(moe_layers), distance

    def predict(self, layer, hidden, topk):
        return {
            t: router_scores(self.model, t, hidden)
            for t in later_layers(self.moe_layers, layer, self.distance)
        }


class PreviousTokenState:
    """The experts the previous token used at every MoE layer.

    Rows of a call are the batch's sequences when the row count matches the
    previous call's (batched decode: row i continues row i); otherwise
    (prefill) every row gets the last row of the previous pass, the newest
    thing known before this pass.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def reset(self):
        self._last: Dict[int, mx.array] = {}

    def ids(self, layer: int, n: int, k: int) -> mx.array:
        """[n, k] the previous token's experts at ``layer`` (-1: none yet)."""
        last = self._last.get(layer)
        if last is None:
            return mx.full((n, k), -1, dtype=mx.int32)
        if last.shape[0] != n:
            last = mx.broadcast_to(last[-1:], (n, last.shape[-1]))
        return last

    def features(self, layer: int, n: int, k: int = 1) -> mx.array:
        """[n, E] multi-hot of the previous token's experts at ``layer``."""
        return multi_hot(self.ids(layer, n, k), self.num_experts)

    def update(self, layer: int, topk: mx.array) -> None:
        self._last[layer] = topk.reshape(-1, topk.shape[-1])  # multi_hot casts: no copy here


class PreviousToken(ExpertPredictor):
    """Layer t gets the experts the previous token used at layer t."""

    name = "previous-token"

    def __init__(self, moe_layers: List[int], num_experts: int, distance: int = 4):
        self.moe_layers, self.distance = list(moe_layers), distance
        self.state = PreviousTokenState(num_experts)

    def predict(self, layer, hidden, topk):
        n = hidden.shape[0]
        out = {
            t: self.state.features(t, n)
            for t in later_layers(self.moe_layers, layer, self.distance)
        }
        self.state.update(layer, topk)
        return out

    def reset(self):
        self.state.reset()


class MostFrequent(ExpertPredictor):
    """Layer t gets its experts ranked by how often they were used."""

    name = "most-frequent"

    def __init__(self, moe_layers: List[int], counts: np.ndarray, distance: int = 4):
        self.moe_layers, self.distance = list(moe_layers), distance
        self.counts = mx.array(counts.astype(np.float32))  # [Lm, E]

    @classmethod
    def fit(cls, trace, distance: int = 4, mask: Optional[np.ndarray] = None) -> "MostFrequent":
        topk = trace.topk if mask is None else trace.topk[:, mask]
        counts = np.stack([np.bincount(t.reshape(-1), minlength=trace.num_experts) for t in topk])
        return cls(trace.moe_layers, counts, distance)

    def predict(self, layer, hidden, topk):
        n = hidden.shape[0]
        return {
            t: mx.broadcast_to(self.counts[self.moe_layers.index(t)], (n, self.counts.shape[-1]))
            for t in later_layers(self.moe_layers, layer, self.distance)
        }

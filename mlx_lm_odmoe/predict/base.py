"""The predictor interface the block and the store use."""

from typing import Dict, List

import mlx.core as mx
import numpy as np


class ExpertPredictor:
    """Scores the experts of later MoE layers from one layer's block input.

    The block calls :meth:`predict` at every MoE layer ``layer`` with
    ``hidden`` (``[N, D]``, the MoE block's input for the N newest tokens)
    and ``topk`` (``[N, k]``, the experts its router chose). It returns
    ``{later_layer: scores}`` with ``scores`` of shape ``[N, E]`` (higher is
    more likely) for up to ``distance`` later MoE layers. Results may be
    lazy; the block evaluates them together with the router's ids, so
    prediction adds no host round trip. A predictor may keep state across
    calls (say, the previous token's experts) and must reset it in
    :meth:`reset`.
    """

    name = "predictor"
    distance = 1
    calibrated = False  # scores are logits of a softmax over the experts
    # True: the block calls host_guesses/host_observe with numpy arrays
    # right after the router's sync, instead of guesses/observe in the graph
    # (cheaper for predictors small enough that kernel launches dominate).
    on_host = False

    def predict(self, layer: int, hidden: mx.array, topk: mx.array) -> Dict[int, mx.array]:
        raise NotImplementedError

    def guesses(
        self, layer: int, hidden: mx.array, topk: mx.array, distance: int, min_prob: float = 0.0
    ) -> Dict[int, mx.array]:
        """What to read ahead: ``{later layer: [N, k] int32 ids}`` for up to
        ``distance`` layers, each row's top-k scores; a calibrated predictor
        drops guesses with probability below ``min_prob`` (id -1)."""
        scores = self.predict(layer, hidden, topk)
        k = topk.shape[-1]
        p = min_prob if self.calibrated else 0.0
        return {t: select_guesses(scores[t], k, p) for t in sorted(scores)[:distance]}

    def observe(self, layer: int, topk: mx.array) -> None:
        """Layer ``layer`` chose ``topk`` ([N, k]) and no prediction is
        wanted from it; a stateful predictor records what it needs."""

    def host_guesses(
        self, layer: int, hidden: np.ndarray, topk: np.ndarray, distance: int, min_prob: float = 0.0
    ) -> Dict[int, np.ndarray]:
        """:meth:`guesses` on host arrays, for predictors with ``on_host``."""
        raise NotImplementedError

    def host_observe(self, layer: int, topk: np.ndarray) -> None:
        """:meth:`observe` on host arrays, for predictors with ``on_host``."""

    def reset(self) -> None:
        pass


def later_layers(moe_layers: List[int], layer: int, distance: int) -> List[int]:
    """The ``distance`` MoE layers after ``layer``."""
    i = moe_layers.index(layer)
    return moe_layers[i + 1 : i + 1 + distance]


def select_guesses(scores: mx.array, k: int, min_prob: float = 0.0) -> mx.array:
    """Each row's top-k ids of ``scores`` [N, E]; -1 where softmax < min_prob."""
    ids = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)
    if min_prob > 0:
        # A guess that is likely wrong costs a read and a staging slot.
        p = mx.take_along_axis(mx.softmax(scores, axis=-1), ids, axis=-1)
        ids = mx.where(p >= min_prob, ids, -1)
    return ids

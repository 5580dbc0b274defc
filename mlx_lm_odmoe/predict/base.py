"""The predictor interface the block and the store use."""

from typing import Dict, List

import mlx.core as mx


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

    def predict(self, layer: int, hidden: mx.array, topk: mx.array) -> Dict[int, mx.array]:
        raise NotImplementedError

    def reset(self) -> None:
        pass


def later_layers(moe_layers: List[int], layer: int, distance: int) -> List[int]:
    """The ``distance`` MoE layers after ``layer``."""
    i = moe_layers.index(layer)
    return moe_layers[i + 1 : i + 1 + distance]

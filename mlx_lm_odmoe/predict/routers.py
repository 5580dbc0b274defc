"""A model's own routers as score functions, for any hidden state.

qwen2_moe ranks experts by ``softmax(gate(x))``; DeepSeek-V3 / Kimi K2 by
``sigmoid(x @ W.T) + e_score_correction_bias`` (grouped top-k when
``n_group > 1``). :func:`router_scores` returns scores whose top-k is the
router's own choice; :func:`router_prior` the same ranking as a smooth
feature (no group mask, log-softmax for softmax routers).
"""

import mlx.core as mx


def gate_of(model, layer: int):
    return model.model.layers[layer].mlp.gate


def _is_sigmoid_gate(gate) -> bool:
    return "e_score_correction_bias" in gate


def router_prior(model, layer: int, x: mx.array) -> mx.array:
    """[N, E] smooth ranking scores of ``layer``'s router on ``x``."""
    gate = gate_of(model, layer)
    if _is_sigmoid_gate(gate):
        z = x.astype(gate.weight.dtype) @ gate.weight.T
        return mx.sigmoid(z.astype(mx.float32)) + gate.e_score_correction_bias
    logits = gate(x.astype(_dtype_of(gate)))
    return logits.astype(mx.float32) - mx.logsumexp(
        logits.astype(mx.float32), axis=-1, keepdims=True
    )


def router_scores(model, layer: int, x: mx.array) -> mx.array:
    """[N, E] scores whose top-k is exactly what ``layer``'s router picks."""
    gate = gate_of(model, layer)
    if not _is_sigmoid_gate(gate):
        return mx.softmax(gate(x.astype(_dtype_of(gate))), axis=-1, precise=True)
    scores = router_prior(model, layer, x)
    if gate.n_group > 1:  # mlx-lm's group_expert_select: drop the weakest groups
        g = mx.unflatten(scores, axis=-1, shape=(gate.n_group, -1))
        group_scores = mx.topk(g, 2, axis=-1).sum(axis=-1, keepdims=True)
        k = gate.n_group - gate.topk_group
        drop = mx.argpartition(group_scores, kth=k - 1, axis=-2)[..., :k, :]
        scores = mx.flatten(mx.put_along_axis(g, drop, mx.array(0.0), axis=-2), -2, -1)
    return scores


def _dtype_of(gate):
    # QuantizedLinear keeps float scales; plain Linear its weight dtype.
    return gate.scales.dtype if "scales" in gate else gate.weight.dtype

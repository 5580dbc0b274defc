"""Load-balancing auxiliary loss for Mixture-of-Experts routers.

Only depends on ``mlx`` so it can be reused by training scripts without
pulling in the rest of the package.
"""

import mlx.core as mx


def load_balancing_loss(router_probs, expert_indices, num_experts, normalize=True):
    """Switch-Transformer style load-balancing loss.

    Computes ``num_experts * sum_i f_i * P_i`` where ``f_i`` is the fraction
    of routed slots (token x top-k choice) that selected expert ``i`` and
    ``P_i`` is the mean router probability assigned to expert ``i`` over all
    tokens. The value is 1.0 for a perfectly uniform router and grows up to
    ``num_experts`` when every token is sent to the same expert. Gradients
    flow only through ``P_i``; ``f_i`` is a count and is treated as constant.

    Args:
        router_probs: array of shape ``(..., num_experts)`` with per-token
            router scores. For softmax routers (e.g. ``qwen2_moe``) pass the
            softmax probabilities. For sigmoid routers (e.g. ``deepseek_v3``
            / ``kimi_k2``) pass the raw sigmoid scores; with
            ``normalize=True`` (the default) they are divided by their sum
            over experts so each token's scores form a distribution.
        expert_indices: integer array of shape ``(..., top_k)`` with the
            experts selected for each token (same leading shape as
            ``router_probs``).
        num_experts: total number of routed experts.
        normalize: renormalise ``router_probs`` over the expert axis before
            averaging. This is a no-op for softmax probabilities.

    Returns:
        A scalar ``mx.array`` (float32).
    """
    probs = router_probs.astype(mx.float32)
    probs = probs.reshape(-1, num_experts)
    if normalize:
        probs = probs / (probs.sum(axis=-1, keepdims=True) + 1e-9)

    inds = mx.stop_gradient(expert_indices).reshape(-1)
    counts = mx.zeros((num_experts,), dtype=mx.float32).at[inds].add(1.0)
    f = counts / max(inds.size, 1)
    p = probs.mean(axis=0)
    return num_experts * mx.sum(mx.stop_gradient(f) * p)

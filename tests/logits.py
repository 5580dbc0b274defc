"""Run a model over a prompt and a few greedy decode steps, keeping logits."""

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache


def prompt_tokens(length: int, seed: int = 0, vocab: int = 300):
    return np.random.default_rng(seed).integers(0, vocab, length).tolist()


def prefill_and_decode(model, prompt, steps: int = 4):
    """Logits of the prompt (prefill), then of ``steps`` greedy decode steps
    through mlx-lm's KV cache."""
    cache = make_prompt_cache(model)
    outs = [model(mx.array([prompt]), cache=cache)]
    mx.eval(outs[-1])
    for _ in range(steps):
        nxt = mx.argmax(outs[-1][:, -1], axis=-1)
        outs.append(model(nxt[None], cache=cache))
        mx.eval(outs[-1])
    return outs


def max_abs_diff(a, b) -> float:
    return max(float(mx.abs(x - y).max()) for x, y in zip(a, b))

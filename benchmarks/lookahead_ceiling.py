"""How much could a predictor that fires at layer L know about layer L+1's routes?

    python benchmarks/lookahead_ceiling.py --model models/tiny-kimi TEXT [TEXT ...]

The block prefetches one MoE layer ahead: guesses for layer L+1 are made
when layer L's router runs. The free baseline (router lookahead) applies
L+1's router to L's MoE input. This script scores, on each text, the recall
of L+1's true top-k at width k for L+1's router applied to:

- ``lookahead``: layer L's MoE input (what the baseline sees);
- ``+ shared expert``: L's residual stream plus its shared expert's output
  (known early: it computes while the routed experts are fetched);
- ``+ whole MoE output``: L+1's own input, i.e. everything layer L computes
  (only L+1's attention is missing);
- ``L+1's attention on the estimate``: layer L+1's attention run on L's
  residual stream (plus the shared expert's output where there is one),
  then its router: what a guess costs that waits for one attention layer
  instead of the routed experts.

On tiny-kimi the whole MoE output gains 3-4 points over the lookahead and
the attention 9-11: most of what the lookahead misses at distance 1 is the
next layer's attention, not this layer's experts.
"""

import argparse
import copy
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import mlx_lm_odmoe
from mlx_lm_odmoe.predict.routers import router_scores


class _Wrapper(nn.Module):
    """A module around ``inner`` that still answers for ``inner``'s parts
    (the router and shared expert of a wrapped MoE block)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __getattr__(self, key):
        try:
            return super().__getattr__(key)
        except AttributeError:
            if "inner" not in self:  # still being built
                raise
            return getattr(self["inner"], key)


class _Recorder(_Wrapper):
    """Calls ``inner`` and keeps its input and output."""

    def __init__(self, inner):
        super().__init__(inner)
        self.seen = None

    def __call__(self, x, *args):
        y = self.inner(x, *args)
        self.seen = (x, y)
        return y


def _recall(scores: mx.array, truth: mx.array, k: int) -> float:
    top = np.argpartition(-np.array(scores), k - 1, axis=-1)[..., :k].reshape(-1, k)
    true = np.array(truth).reshape(-1, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top, true)]))


def ceiling(model, ids: mx.array) -> dict:
    """Mean recall at distance 1 over the MoE layer pairs, per estimate."""
    layers = model.model.layers
    moe = [i for i, l in enumerate(layers) if "switch_mlp" in l.mlp]
    saved = {}
    for i in moe:
        lay = layers[i]
        saved[i] = (lay.input_layernorm, lay.mlp)
        lay.input_layernorm, lay.mlp = _Recorder(lay.input_layernorm), _Recorder(lay.mlp)
    try:
        mx.eval(model(ids))
        seen = {i: (layers[i].input_layernorm.seen, layers[i].mlp.seen) for i in moe}
    finally:
        for i, (norm, mlp) in saved.items():
            layers[i].input_layernorm, layers[i].mlp = norm, mlp
    k = model.expert_runtime.top_k
    out = {
        "lookahead": [],
        "+ shared expert": [],
        "+ whole MoE output": [],
        "L+1's attention on the estimate": [],
    }
    for a, b in zip(moe, moe[1:]):
        (m_in, moe_out), x_next = seen[a][1], seen[b][0][0]
        # The router's own pick: the top-k of its scores on L+1's MoE input.
        want = router_scores(model, b, seen[b][1][0])
        truth = mx.argpartition(-want, k - 1, axis=-1)[..., :k]
        norm = layers[b].post_attention_layernorm
        out["lookahead"].append(_recall(router_scores(model, b, m_in), truth, k))
        if "shared_experts" in layers[a].mlp:
            shared = x_next - moe_out + layers[a].mlp.shared_experts(m_in)
            out["+ shared expert"].append(_recall(router_scores(model, b, norm(shared)), truth, k))
        out["+ whole MoE output"].append(_recall(router_scores(model, b, norm(x_next)), truth, k))
        # Layer L+1's own attention run on an estimate of its input (L's
        # residual stream, plus the shared expert where there is one): a
        # guess that waits for one attention layer instead of the routed
        # experts. (Here every position uses the estimate; in decode the
        # earlier tokens' keys and values would be the true ones.)
        guess = x_next - moe_out
        if "shared_experts" in layers[a].mlp:
            guess = shared
        nxt, n = layers[b], guess.shape[1]
        causal = mx.tril(mx.ones((n, n), dtype=mx.bool_))
        att = guess + nxt.self_attn(nxt.input_layernorm(guess), causal, None)
        out["L+1's attention on the estimate"].append(
            _recall(router_scores(model, b, norm(att)), truth, k)
        )
    return {name: float(np.mean(v)) for name, v in out.items() if v}


class _SpeculativeAttention(nn.Module):
    """Layer b's attention, which first runs once more on ``pending``, an
    estimate of b's input, against a copy of the cache (the real call then
    writes the true keys and values where the copy wrote), then routes it."""

    def __init__(self, model, b, attn, norm_in, norm_post, pending):
        super().__init__()
        self.attn = attn
        self._ctx = (model, b, norm_in, norm_post, pending)
        self.scores = None

    def __call__(self, x, mask=None, cache=None):
        model, b, norm_in, norm_post, pending = self._ctx
        guess = pending.pop(b, None)
        if guess is not None:
            spec = self.attn(norm_in(guess), mask, copy.copy(cache))
            self.scores = router_scores(model, b, norm_post(guess + spec))
        return self.attn(x, mask, cache)


class _Estimate(_Wrapper):
    """Layer a's MoE block, which also leaves, for the next MoE layer b, an
    estimate of b's input (a's residual stream plus its shared expert) and
    the lookahead's scores, while decoding."""

    def __init__(self, model, mlp, residual, b, pending, looks, decoding):
        super().__init__(mlp)
        self._ctx = (model, residual, b, pending, looks, decoding)

    def __call__(self, m_in):
        y = self.inner(m_in)
        model, residual, b, pending, looks, decoding = self._ctx
        if decoding[0]:
            h = residual.seen[0]
            mlp = self.inner
            guess = h + mlp.shared_experts(m_in) if "shared_experts" in mlp else h
            pending[b] = guess
            looks[b] = router_scores(model, b, m_in)
        return y


def decode_recall(model, ids: mx.array, tokens: int) -> dict:
    """Recall at distance 1 while decoding ``tokens`` greedily after the
    prompt ``ids``: the lookahead, and layer L+1's attention run for the new
    token (earlier tokens' keys and values exact) on L's residual stream
    plus its shared expert."""
    from mlx_lm.models.cache import make_prompt_cache

    layers = model.model.layers
    moe = [i for i, l in enumerate(layers) if "switch_mlp" in l.mlp]
    k = model.expert_runtime.top_k
    pending, looks, decoding = {}, {}, [False]
    original = {
        i: (layers[i].post_attention_layernorm, layers[i].mlp, layers[i].self_attn) for i in moe
    }
    for j, i in enumerate(moe):
        lay = layers[i]
        lay.post_attention_layernorm = residual = _Recorder(lay.post_attention_layernorm)
        if j + 1 < len(moe):
            lay.mlp = _Estimate(model, lay.mlp, residual, moe[j + 1], pending, looks, decoding)
        lay.mlp = _Recorder(lay.mlp)
        if j:
            lay.self_attn = _SpeculativeAttention(
                model, i, lay.self_attn, lay.input_layernorm, residual.inner, pending
            )
    hits = {"lookahead": [], "L+1's attention on the estimate": []}

    def top(scores):
        return set(np.argpartition(-np.array(scores[0, -1]), k - 1)[:k].tolist())

    try:
        cache = make_prompt_cache(model)
        logits = model(ids, cache=cache)
        decoding[0] = True
        for _ in range(tokens):
            logits = model(mx.argmax(logits[:, -1], axis=-1)[None], cache=cache)
            for i in moe[1:]:
                truth = top(router_scores(model, i, layers[i].mlp.seen[0]))
                hits["lookahead"].append(len(top(looks[i]) & truth) / k)
                scores = layers[i].self_attn.scores
                hits["L+1's attention on the estimate"].append(len(top(scores) & truth) / k)
    finally:
        for i, (norm, mlp, attn) in original.items():
            layers[i].post_attention_layernorm, layers[i].mlp, layers[i].self_attn = norm, mlp, attn
    return {name: float(np.mean(v)) for name, v in hits.items()}


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="odmoe model folder")
    p.add_argument("texts", nargs="+", help="text files to score on")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per text. Default: 1024")
    p.add_argument(
        "--decode",
        type=int,
        default=0,
        help="also decode this many tokens greedily after each text's first 200 and score "
        "the lookahead and the next layer's attention on the real cache",
    )
    args = p.parse_args(argv)
    model, tok = mlx_lm_odmoe.load(args.model, expert_cache="100%")
    names = [
        "lookahead",
        "+ shared expert",
        "+ whole MoE output",
        "L+1's attention on the estimate",
    ]
    print("| text | " + " | ".join(names) + " |")
    print("|---|---|---|---|---|")
    for path in args.texts:
        text = Path(path).read_text(errors="replace")
        ids = mx.array([tok.encode(text)[: args.tokens]])
        r = ceiling(model, ids)
        cells = [f"{100 * r[n]:.1f}" if n in r else "" for n in names]
        print(f"| {Path(path).name} | " + " | ".join(cells) + " |", flush=True)
    if args.decode:
        print(f"\nDecoding {args.decode} tokens after each text's first 200:\n")
        print("| text | lookahead | L+1's attention on the estimate |")
        print("|---|---|---|")
        for path in args.texts:
            text = Path(path).read_text(errors="replace")
            r = decode_recall(model, mx.array([tok.encode(text)[:200]]), args.decode)
            cells = [f"{100 * r[n]:.1f}" for n in ("lookahead", "L+1's attention on the estimate")]
            print(f"| {Path(path).name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

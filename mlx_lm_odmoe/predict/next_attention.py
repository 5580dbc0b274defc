"""Guesses for the next MoE layer from that layer's own attention, run ahead.

The router lookahead applies layer L+1's router to layer L's MoE input. What
it misses at distance 1 is mostly layer L+1's attention, not layer L's
experts (benchmarks/lookahead_ceiling.py: on tiny-kimi the whole MoE output
of L gains 3-4 points of recall, L+1's attention 9-11). So while decoding,
at layer L this predictor runs layer L+1's input norm, attention and
post-attention norm on L's residual stream (the MoE output is not known yet),
for the new token only, against L+1's KV cache *read, never written*, and
routes that with L+1's router. Farther layers get the lookahead.

The guess is evaluated in layer L's router sync, with the router: no extra
host round trip. It costs one more attention per MoE layer and token (and a
copy of that layer's keys and values, which the read-only view concatenates
with the new token's). Where a layer's cache is of a kind the view does not
know (quantized, rotating, batched), or the decoder layer is not the plain
pre-norm kind, that layer's guess is the lookahead's.
"""

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..switches import module_at
from .base import later_layers
from .baselines import RouterLookahead
from .routers import router_scores

_PLAIN = ("input_layernorm", "self_attn", "post_attention_layernorm")
# Norms that sit around the attention's output instead of in front of the
# MLP (Gemma's sandwich): the post-attention norm's input is then no
# residual stream.
_SANDWICH = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


class _Peek:
    """What a plain KVCache would answer one attention call with after
    taking the new keys and values, without taking them."""

    def __init__(self, cache: KVCache):
        self._cache = cache
        self.offset = cache.offset

    def update_and_fetch(self, keys, values):
        c = self._cache
        if c.keys is None or c.offset == 0:
            return keys, values
        old_k, old_v = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
        return mx.concatenate([old_k, keys], axis=2), mx.concatenate([old_v, values], axis=2)


class _ResidualWatch:
    """Mixin for the norm in front of a MoE block: it keeps its input, the
    residual stream after attention, of a one-token pass, for the guess of
    the next layer. Its output is the norm's own."""

    def __call__(self, x):
        watch = self.__dict__.get("_odmoe_watch")
        if watch is not None and x.ndim == 3 and x.shape[1] == 1:
            runtime, layer = watch
            runtime.residual = (layer, x)
        return super().__call__(x)


def watch_residual(norm, runtime, layer: int):
    """Make ``norm`` (mlx-lm's own) keep its input in ``runtime.residual``,
    in place: its class becomes a subclass, its parameters stay as they are."""
    cls = type(norm)
    if not issubclass(cls, _ResidualWatch):
        norm.__class__ = type(f"Watched{cls.__name__}", (_ResidualWatch, cls), {})
    object.__setattr__(norm, "_odmoe_watch", (runtime, layer))


def _unwatched(norm, x):
    """The norm's output without keeping its input (a guess is no residual)."""
    if isinstance(norm, _ResidualWatch):
        return super(_ResidualWatch, norm).__call__(x)
    return norm(x)


def plain_decoder_layer(layer) -> bool:
    return all(n in layer for n in _PLAIN) and not any(n in layer for n in _SANDWICH)


class NextAttention(RouterLookahead):
    """Layer L+1's router on L+1's attention run ahead on L's residual
    stream; farther layers by the lookahead."""

    name = "next-attention"
    reads_pass_caches = True  # the model records each pass's caches for it

    def __init__(self, model, moe_layers, runtime, layers_path: str, distance: int = 1):
        super().__init__(model, moe_layers, distance)
        self.runtime = runtime
        decoder = module_at(model, layers_path)
        self.layers = {i: decoder[i] for i in self.moe_layers}
        self.ahead = {i for i in self.moe_layers[1:] if plain_decoder_layer(decoder[i])}
        for i in self.moe_layers[:-1]:
            if plain_decoder_layer(decoder[i]):
                watch_residual(decoder[i].post_attention_layernorm, runtime, i)

    def predict(self, layer, hidden, topk):
        later = later_layers(self.moe_layers, layer, self.distance)
        out = {t: router_scores(self.model, t, hidden) for t in later[1:]}
        if later:
            est = self._attended(layer, later[0])
            out[later[0]] = router_scores(self.model, later[0], hidden if est is None else est)
        return out

    def _attended(self, layer: int, nxt: int) -> Optional[mx.array]:
        """[N, D] layer ``nxt``'s MoE input for the newest token if layer
        ``layer``'s routed experts added nothing, or None where it cannot
        be known."""
        residual = self.runtime.residual
        if nxt not in self.ahead or residual is None or residual[0] != layer:
            return None
        found, cache = self.runtime.pass_cache(self.layers[nxt])
        if not found or not (cache is None or type(cache) is KVCache):
            return None
        h = residual[1]
        dec = self.layers[nxt]
        view = None if cache is None else _Peek(cache)
        # One new token on a plain cache: stock passes no mask either.
        att = h + dec.self_attn(dec.input_layernorm(h), None, view)
        return _unwatched(dec.post_attention_layernorm, att)[:, -1]

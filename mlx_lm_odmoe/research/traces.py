"""Routing traces: every MoE layer's block input and top-k, token-aligned.

A trace (``.npz``) holds, for T tokens and the model's Lm MoE layers:

    hidden      float16 [Lm, T, D]  the MoE block input (post-attention norm)
    topk        int16   [Lm, T, k]  the experts the router chose
    tokens      int32   [T]         the token fed at each position
    seq         int32   [T]         sequence id (a sequence is contiguous)
    generated   bool    [T]         sampled by the model (else held-out text)
    moe_layers  int32   [Lm]
    num_experts int32   []
    source      str             the model folder traced

Held-out text is run teacher-forced, in batched chunks. Generated text is
the model's own sampled continuation of a held-out prompt; the prompt's
positions are kept in the same sequence (``generated`` False), so a
sequence reads like one decode: prompt, then the model's tokens.
"""

from dataclasses import dataclass
from typing import Dict, List

import mlx.core as mx
import numpy as np

from ..block import moe_layers_of


@dataclass
class Trace:
    hidden: np.ndarray
    topk: np.ndarray
    tokens: np.ndarray
    seq: np.ndarray
    generated: np.ndarray
    moe_layers: List[int]
    num_experts: int
    source: str = ""

    @property
    def top_k(self) -> int:
        return self.topk.shape[-1]

    def save(self, path) -> None:
        np.savez(
            path,
            hidden=self.hidden,
            topk=self.topk,
            tokens=self.tokens,
            seq=self.seq,
            generated=self.generated,
            moe_layers=np.array(self.moe_layers, dtype=np.int32),
            num_experts=np.int32(self.num_experts),
            source=np.array(self.source),
        )

    @classmethod
    def load(cls, path) -> "Trace":
        with np.load(path) as f:
            return cls(
                hidden=f["hidden"],
                topk=f["topk"].astype(np.int64),
                tokens=f["tokens"],
                seq=f["seq"],
                generated=f["generated"],
                moe_layers=[int(l) for l in f["moe_layers"]],
                num_experts=int(f["num_experts"]),
                source=str(f["source"]) if "source" in f else "",
            )

    def select(self, mask: np.ndarray) -> "Trace":
        """The tokens where ``mask`` holds (whole sequences keep their order)."""
        return Trace(
            self.hidden[:, mask],
            self.topk[:, mask],
            self.tokens[mask],
            self.seq[mask],
            self.generated[mask],
            self.moe_layers,
            self.num_experts,
            self.source,
        )

    def sequences(self):
        """(start, stop) of every sequence, in order."""
        cuts = np.flatnonzero(np.diff(self.seq)) + 1
        bounds = np.concatenate([[0], cuts, [len(self.seq)]])
        return list(zip(bounds[:-1], bounds[1:]))


def concat(traces: List[Trace]) -> Trace:
    """One trace of several (say, one per text kind), sequences renumbered.
    Its :func:`eval_mask` is the union of each trace's own when every trace
    has a multiple of ``every`` sequences of each kind (collect's defaults)."""
    first = traces[0]
    for t in traces[1:]:
        if t.moe_layers != first.moe_layers or t.num_experts != first.num_experts:
            raise ValueError("traces of different models cannot be mixed")
    offsets = np.cumsum([0] + [int(t.seq.max()) + 1 if len(t.seq) else 0 for t in traces])
    return Trace(
        hidden=np.concatenate([t.hidden for t in traces], 1),
        topk=np.concatenate([t.topk for t in traces], 1),
        tokens=np.concatenate([t.tokens for t in traces]),
        seq=np.concatenate([t.seq + o for t, o in zip(traces, offsets)]).astype(np.int32),
        generated=np.concatenate([t.generated for t in traces]),
        moe_layers=list(first.moe_layers),
        num_experts=first.num_experts,
        source=first.source,
    )


def eval_mask(trace: Trace, every: int = 4) -> np.ndarray:
    """Tokens of the held-out-for-evaluation sequences: every ``every``-th
    sequence of each kind (teacher-forced, generated), so training and
    evaluation never share a sequence."""
    ids = np.unique(trace.seq)
    has_gen = np.array([trace.generated[trace.seq == s].any() for s in ids])
    held = set()
    for kind in (False, True):
        of_kind = ids[has_gen == kind]
        held.update(of_kind[every - 1 :: every].tolist())
    return np.isin(trace.seq, list(held))


def previous_topk(trace: Trace) -> np.ndarray:
    """[Lm, T, k] the previous token's experts at each layer; -1 at the first
    token of a sequence."""
    prev = np.full_like(trace.topk, -1)
    prev[:, 1:] = trace.topk[:, :-1]
    starts = np.flatnonzero(np.diff(trace.seq)) + 1
    prev[:, starts] = -1
    prev[:, 0] = -1
    return prev


class Recorder:
    """An expert-runtime observer keeping the last forward pass's inputs and
    router ids per MoE layer (lazy until :meth:`take`)."""

    def __init__(self, model):
        self.runtime = model.expert_runtime
        self._seen: Dict[int, tuple] = {}

    def __call__(self, layer, x, indices):
        self._seen[layer] = (x, indices)

    def __enter__(self):
        self.runtime.observers.append(self)
        return self

    def __exit__(self, *exc):
        self.runtime.observers.remove(self)

    def take(self, layers: List[int]):
        """([Lm, B, L, D] float16, [Lm, B, L, k] int16) of the last pass."""
        seen = [self._seen[l] for l in layers]
        mx.eval([a for pair in seen for a in pair])
        hidden = np.stack([np.array(x.astype(mx.float16)) for x, _ in seen])
        topk = np.stack([np.array(i).astype(np.int16) for _, i in seen])
        self._seen.clear()
        return hidden, topk


def run_teacher_forced(model, chunks: np.ndarray, batch: int = 8, progress=None):
    """Trace pieces for held-out ``chunks`` [n, L]: one forward per batch."""
    layers = moe_layers_of(model)
    pieces = []
    with Recorder(model) as rec:
        for i in range(0, len(chunks), batch):
            toks = chunks[i : i + batch]
            mx.eval(model(mx.array(toks)))
            h, t = rec.take(layers)
            pieces += [
                (h[:, b], t[:, b], toks[b], np.zeros(toks.shape[1], bool)) for b in range(len(toks))
            ]
            if progress is not None:
                progress.update(toks.size)
    return pieces


def run_generation(model, prompts: np.ndarray, max_tokens: int, temp: float = 0.8, progress=None):
    """Trace pieces for sampled continuations of ``prompts`` [B, P] (one batch).

    Every sampled token is fed back, so each of the ``max_tokens`` generated
    positions has its block inputs recorded.
    """
    from mlx_lm.models.cache import make_prompt_cache

    layers = moe_layers_of(model)
    cache = make_prompt_cache(model)
    hs, ts, toks = [], [], [prompts]
    with Recorder(model) as rec:
        logits = model(mx.array(prompts), cache=cache)
        h, t = rec.take(layers)
        hs.append(h), ts.append(t)
        for _ in range(max_tokens):
            y = (
                mx.random.categorical(logits[:, -1] / temp)
                if temp > 0
                else logits[:, -1].argmax(-1)
            )
            y = y[:, None].astype(mx.int32)
            logits = model(y, cache=cache)
            h, t = rec.take(layers)
            hs.append(h), ts.append(t), toks.append(np.array(y))
            if progress is not None:
                progress.update(len(prompts))
    h, t, toks = np.concatenate(hs, 2), np.concatenate(ts, 2), np.concatenate(toks, 1)
    gen = np.arange(toks.shape[1]) >= prompts.shape[1]
    return [(h[:, b], t[:, b], toks[b], gen) for b in range(len(prompts))]


def assemble(pieces, moe_layers: List[int], num_experts: int) -> Trace:
    """One trace from per-sequence pieces (hidden, topk, tokens, generated)."""
    return Trace(
        hidden=np.concatenate([p[0] for p in pieces], 1),
        topk=np.concatenate([p[1] for p in pieces], 1),
        tokens=np.concatenate([p[2] for p in pieces]).astype(np.int32),
        seq=np.concatenate([np.full(len(p[2]), i, np.int32) for i, p in enumerate(pieces)]),
        generated=np.concatenate([p[3] for p in pieces]),
        moe_layers=list(moe_layers),
        num_experts=num_experts,
    )


def collect(
    model,
    heldout: np.ndarray,
    chunks: int = 32,
    chunk_len: int = 256,
    generate: int = 16,
    prompt_len: int = 64,
    max_tokens: int = 192,
    temp: float = 0.8,
    batch: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> Trace:
    """Teacher-forced ``chunks`` of held-out text plus ``generate`` sampled
    continuations. Prompts come from the held-out text after the chunks, so
    the two kinds never overlap."""
    from tqdm import tqdm

    mx.random.seed(seed)
    # Spread the pieces over the whole held-out set (it is many files).
    stride = len(heldout) // max(chunks + generate, 1)
    if stride < max(chunk_len, prompt_len):
        need = (chunks + generate) * max(chunk_len, prompt_len)
        raise ValueError(f"need {need} held-out tokens, have {len(heldout)}")
    starts = np.arange(chunks + generate) * stride
    tf = np.stack([heldout[s : s + chunk_len] for s in starts[:chunks]]).astype(np.int32)
    pr = np.stack([heldout[s : s + prompt_len] for s in starts[chunks:]]).astype(np.int32)
    total = tf.size + generate * max_tokens
    bar = tqdm(total=total, unit="tok", disable=not progress, desc="tracing")
    pieces = run_teacher_forced(model, tf, batch, bar)
    for i in range(0, generate, batch):
        pieces += run_generation(model, pr[i : i + batch], max_tokens, temp, bar)
    bar.close()
    layers = moe_layers_of(model)
    rt = model.expert_runtime
    return assemble(pieces, layers, rt.store.layout.num_experts)

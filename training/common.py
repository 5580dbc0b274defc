"""Shared helpers for the tiny MoE training and evaluation scripts."""

import json
import math
import os
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import deepseek_v3, qwen2_moe

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


# ---------------------------------------------------------------------------
# Router recording
#
# The MoE blocks of mlx-lm do not expose their routing decisions. Instead of
# copying the blocks, the router sub-modules are switched to thin subclasses
# that call the original implementation and append what they saw to a plain
# Python list (kept outside the module tree, so it never becomes a
# parameter). Parameter names are unchanged, so checkpoints stay stock.
# ---------------------------------------------------------------------------

ROUTER_LOG = []


class _RecordingSoftmax:
    """Mixin for a qwen2_moe router (``nn.Linear`` or, once shipped
    quantized, ``nn.QuantizedLinear``) that records its logits."""

    def __call__(self, x):
        logits = super().__call__(x)
        ROUTER_LOG.append(("softmax", self, x, logits, None))
        return logits


class RecordingSoftmaxGate(_RecordingSoftmax, nn.Linear):
    pass


class RecordingQuantizedSoftmaxGate(_RecordingSoftmax, nn.QuantizedLinear):
    pass


class RecordingSigmoidGate(deepseek_v3.MoEGate):
    """deepseek_v3 / kimi_k2 router that records its input and choices."""

    def __call__(self, x):
        inds, scores = super().__call__(x)
        ROUTER_LOG.append(("sigmoid", self, x, None, inds))
        return inds, scores


def moe_blocks(model):
    """Return ``[(layer_index, moe_block)]`` for every routed layer."""
    out = []
    for i, layer in enumerate(model.layers):
        mlp = layer.mlp
        if isinstance(mlp, (qwen2_moe.Qwen2MoeSparseMoeBlock, deepseek_v3.DeepseekV3MoE)):
            out.append((i, mlp))
    return out


def install_router_recorders(model):
    """Switch each MoE block's router to its recording subclass in place."""
    for _, block in moe_blocks(model):
        gate = block.gate
        if isinstance(block, qwen2_moe.Qwen2MoeSparseMoeBlock):
            quantized = isinstance(gate, nn.QuantizedLinear)
            gate.__class__ = RecordingQuantizedSoftmaxGate if quantized else RecordingSoftmaxGate
        else:
            gate.__class__ = RecordingSigmoidGate
    return model


def router_outputs(top_k):
    """Turn ``ROUTER_LOG`` into ``[(probs, inds)]`` per routed layer.

    ``probs`` are softmax probabilities for qwen2_moe and raw sigmoid scores
    for deepseek_v3 (``load_balancing_loss`` normalises those itself).
    ``inds`` are the experts the block actually used.
    """
    res = []
    for kind, gate, x, logits, inds in ROUTER_LOG:
        if kind == "softmax":
            probs = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
            inds = mx.argpartition(-probs, kth=top_k - 1, axis=-1)[..., :top_k]
        else:
            probs = mx.sigmoid((x @ gate.weight.T).astype(mx.float32))
        res.append((probs, mx.stop_gradient(inds)))
    return res


def num_routed_experts(args):
    return getattr(args, "num_experts", None) or args.n_routed_experts


# ---------------------------------------------------------------------------
# Data and evaluation
# ---------------------------------------------------------------------------


def load_tokens(data_dir, split):
    return np.load(os.path.join(data_dir, f"{split}.npy"), mmap_mode="r")


def eval_windows(tokens, context, max_windows=None):
    """Non-overlapping windows of ``context + 1`` tokens, evenly spaced."""
    n = (len(tokens) - 1) // context
    starts = np.arange(n) * context
    if max_windows is not None and n > max_windows:
        pick = np.linspace(0, n - 1, max_windows).round().astype(np.int64)
        starts = starts[pick]
    return np.stack([np.asarray(tokens[s : s + context + 1]) for s in starts]).astype(np.int32)


def unigram_baseline(train_tokens, eval_targets, vocab_size):
    """Cross-entropy (nats/token) of an add-one smoothed train-set unigram."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    return float(-logp[np.asarray(eval_targets).reshape(-1)].mean())


def heldout_loss(model, windows, batch_size=8):
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ROUTER_LOG.clear()
        w = mx.array(windows[i : i + batch_size])
        logits = model(w[:, :-1]).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, w[:, 1:], reduction="sum")
        total += ce.item()
        count += w[:, 1:].size
    ROUTER_LOG.clear()
    return total / count


def save_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def perplexity(loss):
    return math.exp(loss)

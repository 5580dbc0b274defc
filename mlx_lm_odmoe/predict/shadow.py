"""The shadow model: a small learned predictor of the next layers' experts.

For a token at MoE layer L with block input x (RMS-normed, [D]) it scores
the experts of each later MoE layer t = L+j, j = 1..d:

    h        = silu(P_L x + Q_L cur + c_L)        shared by all distances, [r]
    logits_j = H_Lj h + b_Lj                      the learned correction, [E]
             + a_Lj * router_t(x)                 layer t's router on x
             + p_Lj * prev_t                      the previous token's experts at t

``router_t(x)`` is the router lookahead (log-softmax for softmax routers,
sigmoid + correction bias for DeepSeek-V3 ones): free, since the router
weights are the model's, and it carries most of the signal at distance 1.
``prev_t`` (k-hot) adds the token-to-token stickiness of routing, and
``cur`` (k-hot, the experts layer L itself picked) what the router's top-k
made of x, a step the linear router prior cannot express. The heads
start at zero and ``a`` at one, so the untrained model ranks exactly like
the lookahead and training only has to learn how the residual stream drifts
between L and t. Training penalizes the correction's size (``correction_l2``
in train_shadow), so where the inputs carry nothing it has learned the
scores stay those of the lookahead; text unlike the training text is then
met with the lookahead's ranking rather than a confident wrong one.

Online (``"online"`` in shadow.json, see online.py), each (L, j) also keeps
a bias and a gate on the correction, updated from the true routes of layer
t as they arrive, and reset per request.

Size, at Kimi K2 scale (D = 7168, E = 384, 60 MoE layers, d = 4, r = 64):
59 source layers x (D r + E r + r) = 28.5 M for the projections, plus 230
(layer, distance) heads x (r E + E) = 5.7 M, plus 2 scalars per head:
34.3 M parameters, 137 MB in float32 (69 MB in bfloat16), against a 500 MB
limit; r = 128 doubles it to 274 MB. Per token it costs d extra router
matmuls (the model's weights) and D r + d r E multiply-adds per layer.
"""

import json
from pathlib import Path
from typing import List

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .base import ExpertPredictor, later_layers, select_guesses
from .baselines import PreviousTokenState, multi_hot
from .online import OnlineCorrection
from .routers import router_prior

WEIGHTS_NAME = "shadow.safetensors"
CONFIG_NAME = "shadow.json"


def parameter_count(
    hidden_size: int, num_experts: int, num_moe_layers: int, distance: int, rank: int
) -> int:
    """Parameters of a shadow model of this shape."""
    total = 0
    for i in range(num_moe_layers):
        n = min(distance, num_moe_layers - 1 - i)
        if n:
            total += (
                (hidden_size + num_experts + 1) * rank
                + n * (rank * num_experts + num_experts)
                + 2 * n
            )
    return total


class ShadowLayer(nn.Module):
    """The predictor from one source layer to its ``n`` later layers."""

    def __init__(self, hidden_size: int, num_experts: int, n: int, rank: int):
        super().__init__()
        self.n, self.num_experts = n, num_experts
        self.proj = nn.Linear(hidden_size, rank)
        self.experts = nn.Linear(num_experts, rank, bias=False)
        self.head = nn.Linear(rank, n * num_experts)
        self.head.weight = mx.zeros_like(self.head.weight)
        self.head.bias = mx.zeros_like(self.head.bias)
        self.prior_scale = mx.ones((n,))
        self.prev_scale = mx.zeros((n,))

    def __call__(self, x, cur, prior, prev):
        """x [N, D]; cur [N, E]; prior, prev [N, m, E] -> logits [N, m, E]
        for the first m <= n later layers (online prefetch needs only the
        nearest, so the head is cut to what is asked)."""
        out = self.correction(x, cur, prior.shape[1])
        m = prior.shape[1]
        return out + self.prior_scale[:m, None] * prior + self.prev_scale[:m, None] * prev

    def correction(self, x, cur, m: int):
        """The learned head's part of the logits, [N, m, E]."""
        E = self.num_experts
        h = nn.silu(self.proj(x) + self.experts(cur))
        return mx.addmm(self.head.bias[: m * E], h, self.head.weight[: m * E].T).reshape(-1, m, E)


class ShadowNet(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        layers = config["moe_layers"]
        n = [len(later_layers(layers, l, config["distance"])) for l in layers]
        self.sources = [l for l, k in zip(layers, n) if k]
        self.layers = [
            ShadowLayer(config["hidden_size"], config["num_experts"], k, config["rank"])
            for k in n
            if k
        ]

    def layer_for(self, source: int) -> ShadowLayer:
        return self.layers[self.sources.index(source)]


class ShadowModel(ExpertPredictor):
    """:class:`ShadowNet` as an online predictor over a loaded model.

    Per source layer, the later routers are fused into one matrix (when
    that copy is small, as for the tiny models) and the whole step is one
    compiled function, so a prediction is a handful of kernels.
    """

    name = "shadow"
    calibrated = True  # scores are logits of a softmax over the experts
    fuse_limit_bytes = 64 << 20
    host_limit_macs = 1 << 20  # per target: smaller steps run in numpy

    def __init__(self, model, net: ShadowNet, online=None):
        """``online``: settings of the online correction (online.py); None
        takes shadow.json's ``"online"`` (absent: none), False turns it off."""
        self.model, self.net = model, net
        settings = net.config.get("online") if online is None else online
        self.online = dict(settings) if settings else None
        E = net.config["num_experts"]
        d = net.config["distance"]
        self._adapt = {
            xp: OnlineCorrection(E, d, xp, **self.online) for xp in (mx, np) if self.online
        }
        self.moe_layers: List[int] = list(net.config["moe_layers"])
        self.distance = net.config["distance"]
        self.state = PreviousTokenState(net.config["num_experts"])
        self._steps = {}
        E, D = net.config["num_experts"], net.config["hidden_size"]
        fused = (
            sum(len(later_layers(self.moe_layers, l, self.distance)) for l in net.sources)
            * E
            * D
            * 4
        )
        self._fuse = fused <= self.fuse_limit_bytes
        self._host_last, self._host_plans = {}, {}
        self.on_host = self._fuse and D * (net.config["rank"] + E) <= self.host_limit_macs

    def predict(self, layer, hidden, topk):
        return self._run(layer, hidden, topk, self.distance, None)

    def guesses(self, layer, hidden, topk, distance, min_prob=0.0):
        """As the base class, but scoring only the ``distance`` nearest
        layers and choosing the guesses inside the same compiled step."""
        return self._run(layer, hidden, topk, min(distance, self.distance), min_prob)

    def _run(self, layer, hidden, topk, distance, select):
        targets = later_layers(self.moe_layers, layer, distance)
        topk = topk.reshape(hidden.shape[0], -1)
        adapt = self._adapt.get(mx)
        if adapt:
            adapt.learn(layer, topk)
        out = {}
        if targets:
            n, k = topk.shape
            prev = [self.state.ids(t, n, k) for t in targets]
            prev = (
                prev[0][:, None] if len(prev) == 1 else mx.stack(prev, axis=1)
            )  # a view, not a copy
            x = hidden if hidden.dtype == mx.float32 else hidden.astype(mx.float32)
            step = self._step(layer, tuple(targets), select)
            if adapt:
                res, scores, corr, look = step(x, topk, prev, *adapt.terms(layer, targets, topk))
                adapt.remember(layer, targets, scores, corr, topk, look)
            else:
                res = step(x, topk, prev)
            out = {t: res[:, j] for j, t in enumerate(targets)}
        self.state.update(layer, topk)
        return out

    def _step(self, layer, targets, select):
        key = (layer, targets, select)
        if key not in self._steps:
            self._steps[key] = self._build_step(layer, list(targets), select)
        return self._steps[key]

    def _build_step(self, layer, targets, select=None):
        """fn(x [N, D], own ids [N, k], previous ids [N, n, k]) -> logits
        [N, n, E], or with ``select`` (a min probability) guesses [N, n, k].
        With online correction, fn(x, own, previous, gate [n, 1], bias
        [n, E]) -> (that, logits, correction, lookahead term [N, n, E])."""
        net_layer, E = self.net.layer_for(layer), self.net.config["num_experts"]
        m = len(targets)

        def finish(logits, k):
            return logits if select is None else select_guesses(logits, k, select)

        def combine(corr, prior, prev, k, gate=None, bias=None):
            # In the host step's order of additions: both guess alike.
            if gate is None:
                return finish(corr + prior + prev, k)
            # The gate scales everything but the lookahead: at 0 the
            # scores rank exactly as the lookahead does.
            resid = corr + bias + prev
            out = prior + gate * resid
            return finish(out, k), out, resid, prior

        if not self._fuse:

            def step(x, cur, prev, *online):
                prior = mx.stack([router_prior(self.model, t, x) for t in targets], axis=1)
                corr = net_layer.correction(x, multi_hot(cur, E), m)
                return combine(
                    corr,
                    net_layer.prior_scale[:m, None] * prior,
                    net_layer.prev_scale[:m, None] * multi_hot(prev, E),
                    cur.shape[-1],
                    *online,
                )

            return step
        f = self._folded(layer, targets)
        wx, proj_b, emb, head_w, head_b, a, p = (
            f[n] for n in ("wx", "proj_b", "emb", "head_w", "head_b", "a", "p")
        )
        bias, sigmoid, m, r = f["bias"], f["sigmoid"], f["m"], f["r"]

        @mx.compile
        def fast(x, cur, prev, *online):
            z = x @ wx
            h = nn.silu(z[:, :r] + proj_b + emb[cur].sum(axis=-2))
            z = z[:, r:].reshape(x.shape[0], m, E)
            if sigmoid:
                prior = mx.sigmoid(z) + bias
            elif select is None:
                prior = z - mx.logsumexp(z, axis=-1, keepdims=True)
            else:
                # The log-softmax's normalizer is a per-row constant: neither
                # the top-k nor the softmax of the guesses can see it.
                prior = z
            corr = mx.addmm(head_b, h, head_w).reshape(x.shape[0], m, E)
            return combine(corr, a * prior, p * multi_hot(prev, E), cur.shape[-1], *online)

        return fast

    def observe(self, layer, topk):
        if mx in self._adapt:
            self._adapt[mx].learn(layer, topk.reshape(-1, topk.shape[-1]))
        self.state.update(layer, topk)

    def _folded(self, layer, targets) -> dict:
        """The step's weights, folded once (inference only): one matrix
        serves the low-rank projection and every target's router, and the
        own-experts term becomes a gather of k rows (router picks are
        distinct) instead of a multi-hot product."""
        net_layer, E = self.net.layer_for(layer), self.net.config["num_experts"]
        weight, bias, sigmoid = fused_routers(self.model, targets)
        m, r = len(targets), net_layer.proj.weight.shape[0]
        f = dict(
            wx=mx.concatenate([net_layer.proj.weight.T, weight], axis=1),
            proj_b=net_layer.proj.bias,
            emb=net_layer.experts.weight.T,
            head_w=net_layer.head.weight[: m * E].T,
            head_b=net_layer.head.bias[: m * E],
            a=net_layer.prior_scale[:m, None],
            p=net_layer.prev_scale[:m, None],
            bias=bias,
        )
        mx.eval(f)
        return {**f, "sigmoid": sigmoid, "m": m, "r": r, "E": E}

    # -- on the host ---------------------------------------------------------
    # At small sizes a kernel launch costs more than the arithmetic: the
    # tiny models' step is ~25k multiply-adds, tens of microseconds as ten
    # kernels, a few in numpy. The block then evaluates only the layer's
    # input with the router and calls these after the sync.

    def host_guesses(
        self, layer, hidden: np.ndarray, topk: np.ndarray, distance: int, min_prob: float = 0.0
    ):
        plan = self._host_plans.get((layer, distance))
        if plan is None:
            targets = tuple(later_layers(self.moe_layers, layer, min(distance, self.distance)))
            step = _HostStep(self._folded(layer, list(targets))) if targets else None
            plan = self._host_plans[(layer, distance)] = (targets, step)
        targets, step = plan
        topk = topk.reshape(hidden.shape[0], -1)
        adapt = self._adapt.get(np)
        if adapt:
            adapt.learn(layer, topk)
        out = None
        if targets and adapt and len(topk) == 1:
            out = self._host_row(layer, targets, step, hidden, topk, min_prob, adapt)
        if targets and out is None:
            n, k = topk.shape
            prev = [self._host_prev(t, n, k) for t in targets]
            prev = prev[0][:, None] if len(prev) == 1 else np.stack(prev, axis=1)
            x = hidden if hidden.dtype == np.float32 else hidden.astype(np.float32)
            online = adapt.terms(layer, targets, topk) if adapt else None
            ids, scores, corr, look = step(x, topk, prev, min_prob, online)
            if adapt:
                adapt.remember(layer, targets, scores, corr, topk, look)
            out = {t: ids[:, j] for j, t in enumerate(targets)}
        self._host_last[layer] = topk
        return out or {}

    def _host_row(self, layer, targets, step, hidden, topk, min_prob, adapt):
        """host_guesses for one decode row with online correction (the
        usual case), through the fewest array operations; None where a
        target has no previous token yet (the general step handles that)."""
        last = [self._host_last.get(t) for t in targets]
        if any(p is None or len(p) != 1 for p in last):
            return None
        prev = last[0] if len(last) == 1 else np.concatenate(last)
        x = hidden[0] if hidden.dtype == np.float32 else hidden[0].astype(np.float32)
        online = adapt.terms(layer, targets, topk)
        ids, scores, corr, look = step._row(x, topk[0], prev, min_prob, online)  # [m, ...]
        adapt.remember_row(layer, targets, scores, corr, topk, look)
        return {t: ids[j : j + 1] for j, t in enumerate(targets)}

    def host_observe(self, layer, topk: np.ndarray):
        topk = topk.reshape(-1, topk.shape[-1])
        if np in self._adapt:
            self._adapt[np].learn(layer, topk)
        self._host_last[layer] = topk

    def _host_prev(self, layer, n, k):
        last = self._host_last.get(layer)
        if last is None:
            return np.full((n, k), -1, dtype=np.int64)
        return last if last.shape[0] == n else np.broadcast_to(last[-1:], (n, last.shape[-1]))

    def reset(self):
        self.state.reset()
        self._host_last = {}
        for adapt in self._adapt.values():
            adapt.reset()

    def nbytes(self) -> int:
        from mlx.utils import tree_flatten

        return sum(v.nbytes for _, v in tree_flatten(self.net.parameters()))


class _HostStep:
    """The online step of one source layer, in numpy: each row's top-k
    guesses (ids below ``min_prob`` become -1), the logits and the learned
    correction in them; ``online`` is the (gate, bias) of online.py."""

    def __init__(self, folded: dict):
        self.__dict__.update(
            {k: np.array(v) if isinstance(v, mx.array) else v for k, v in folded.items()}
        )

    def __call__(self, x, cur, prev, min_prob, online=None):
        if x.shape[0] == 1 and online is not None and (prev >= 0).all():
            return tuple(a[None] for a in self._row(x[0], cur[0], prev[0], min_prob, online))
        n, m, E, r = x.shape[0], self.m, self.E, self.r
        k = cur.shape[-1]
        rows, js = self._grid(n, m, k)
        z = x @ self.wx
        h = z[:, :r] + self.proj_b + self.emb[cur].sum(axis=-2)
        h *= 1.0 / (1.0 + np.exp(-h))  # silu
        z = z[:, r:].reshape(n, m, E)
        # A softmax router's log-softmax prior is z minus a per-row constant,
        # which neither the top-k nor the probabilities can see.
        prior = 1.0 / (1.0 + np.exp(-z)) + self.bias if self.sigmoid else z
        corr = (h @ self.head_w + self.head_b).reshape(n, m, E)
        look = self.a * prior
        if online is None:
            out = resid = corr + look
        else:
            gate, bias = online
            resid = corr + bias
        if (prev >= 0).all():  # router picks are distinct: no repeated index
            resid[rows, js, prev] += self.p
        else:
            i, j, c = np.nonzero(prev >= 0)
            resid[i, j, prev[i, j, c]] += self.p[j, 0]
        if online is not None:  # as the MLX step: the gate leaves the lookahead alone
            out = look + gate * resid
        ids = np.argpartition(-out, k - 1, axis=-1)[..., :k]
        if min_prob > 0:  # softmax(out)[ids] >= min_prob, without normalizing every expert
            e = np.exp(out - out.max(axis=-1, keepdims=True))
            keep = e[rows, js, ids] >= min_prob * e.sum(axis=-1, keepdims=True)
            ids = np.where(keep, ids, -1)
        return ids, out, resid, look

    def _row(self, x, cur, prev, min_prob, online):
        """The same step for one decode row (the usual case) on [m, E]
        arrays: half the array operations, each on a single vector; the
        results are [m, ...] (no row axis)."""
        m, E, r = self.m, self.E, self.r
        k = cur.shape[-1]
        z = x @ self.wx
        h = z[:r] + self.proj_b + self.emb[cur].sum(axis=0)
        h *= 1.0 / (1.0 + np.exp(-h))  # silu
        z = z[r:].reshape(m, E)
        prior = 1.0 / (1.0 + np.exp(-z)) + self.bias if self.sigmoid else z
        look = self.a * prior
        gate, bias = online
        resid = (h @ self.head_w + self.head_b).reshape(m, E) + bias.reshape(m, E)
        js = self._js(m)
        resid[js, prev] += self.p  # router picks are distinct: no repeated index
        out = look + gate * resid
        ids = np.argpartition(-out, k - 1, axis=-1)[:, :k]
        if min_prob > 0:
            e = np.exp(out - out.max(axis=-1, keepdims=True))
            ids = np.where(e[js, ids] >= min_prob * e.sum(axis=-1, keepdims=True), ids, -1)
        return ids, out, resid, look

    def _js(self, m):
        js = self.__dict__.get("_js_grid")
        if js is None or js.shape[0] != m:
            js = self._js_grid = np.arange(m)[:, None]
        return js

    def _grid(self, n, m, k):
        """Index grids that address [n, m, k] picks of an [n, m, E] array."""
        key = (n, m, k)
        grids = self.__dict__.setdefault("_grids", {})
        if key not in grids:
            grids[key] = (np.arange(n)[:, None, None], np.arange(m)[None, :, None])
        return grids[key]


def fused_routers(model, targets):
    """([D, n*E] float32 router weights of ``targets``, [n, E] bias, sigmoid?)."""
    from .routers import gate_of

    ws, bs, sigmoid = [], [], False
    for t in targets:
        gate = gate_of(model, t)
        if "scales" in gate:
            w = mx.dequantize(
                gate.weight,
                gate.scales,
                gate.get("biases"),
                gate.group_size,
                gate.bits,
                mode=getattr(gate, "mode", "affine"),
            )
        else:
            w = gate.weight
        ws.append(w.astype(mx.float32))
        sigmoid = "e_score_correction_bias" in gate
        bs.append(gate.e_score_correction_bias if sigmoid else mx.zeros((w.shape[0],)))
    weight, bias = mx.concatenate(ws, axis=0).T, mx.stack(bs).astype(mx.float32)
    mx.eval(weight, bias)
    return weight, bias, sigmoid


def save_shadow(net: ShadowNet, folder, extra: dict = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net.save_weights(str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps({**net.config, **(extra or {})}, indent=1))
    return folder / WEIGHTS_NAME


def load_shadow(model, folder) -> ShadowModel:
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    net = ShadowNet(config)
    net.load_weights(str(folder / WEIGHTS_NAME))
    mx.eval(net.parameters())
    return ShadowModel(model, net)

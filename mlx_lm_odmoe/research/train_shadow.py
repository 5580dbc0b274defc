"""``mlx_lm_odmoe.train_shadow``: fit the shadow model on routing traces.

    mlx_lm_odmoe.train_shadow MODEL --traces code.npz man.npz legal.npz [--distance 4]

Trains on the training sequences of the traces (teacher-forced and
generated; the evaluation sequences of ``traces.eval_mask`` are never
seen), keeps the epoch with the best loss on a validation slice of the
training sequences, and writes ``shadow.safetensors`` + ``shadow.json``
next to the model, where ``mlx_lm_odmoe.predict.load_predictor`` finds them
(or into ``--out``). Several trace files (say, one per kind of text) are
trained on together: a shadow model trained on one kind of text does worse
than the free lookahead on another (issue 16), and the penalty on the size
of the learned correction (``--correction-l2``) keeps it close to the
lookahead wherever the training text does not support a correction. A shadow model already there is replaced only with
``--force``, and kept as ``shadow.json.bak`` / ``shadow.safetensors.bak``.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..predict.base import later_layers
from ..predict.baselines import multi_hot
from ..predict.online import DEFAULTS as ONLINE
from ..predict.routers import router_prior
from ..predict.shadow import CONFIG_NAME, WEIGHTS_NAME, ShadowNet, parameter_count, save_shadow
from .traces import Trace, concat, eval_mask, previous_topk

DEFAULT_L2 = 0.01


def layer_features(model, trace: Trace, distance: int, chunk: int = 4096):
    """Per source layer: (x [T, D], own ids [T, k], prior [T, n, E], prev ids,
    target ids [T, n, k])."""
    layers = trace.moe_layers
    prev = previous_topk(trace)
    feats = {}
    for i, l in enumerate(layers):
        targets = later_layers(layers, l, distance)
        if not targets:
            continue
        x = mx.array(trace.hidden[i]).astype(mx.float32)
        prior = []
        for s in range(0, x.shape[0], chunk):
            prior.append(
                mx.stack([router_prior(model, t, x[s : s + chunk]) for t in targets], axis=1)
            )
            mx.eval(prior[-1])
        rows = [layers.index(t) for t in targets]
        feats[l] = (
            x,
            mx.array(trace.topk[i]),
            mx.concatenate(prior),
            mx.array(np.stack([prev[r] for r in rows], 1)),
            mx.array(np.stack([trace.topk[r] for r in rows], 1)),
        )
    return feats


def layer_loss(layer, x, cur_ids, prior, prev_ids, tgt_ids, weight, num_experts, l2=0.0):
    """Listwise cross-entropy against the true top-k (uniform over it), plus
    ``l2`` times the mean square of the learned correction (centered per
    row: a constant shift changes no ranking)."""
    prev = multi_hot(prev_ids, num_experts)
    target = multi_hot(tgt_ids, num_experts)
    m = prior.shape[1]
    corr = layer.correction(x, multi_hot(cur_ids, num_experts), m)
    logits = corr + layer.prior_scale[:m, None] * prior + layer.prev_scale[:m, None] * prev
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    loss = -(target * logp).sum(-1).mean(-1) / tgt_ids.shape[-1]
    if l2:
        centered = corr - corr.mean(axis=-1, keepdims=True)
        loss = loss + l2 * mx.square(centered).mean(axis=(-2, -1))
    return (weight * loss).sum() / weight.sum()


def total_loss(net, feats, weight, idx, num_experts, l2=0.0):
    w = weight[idx]
    losses = [
        layer_loss(net.layer_for(l), *(a[idx] for a in f), w, num_experts, l2)
        for l, f in feats.items()
    ]
    return sum(losses) / len(losses)


def train(
    model,
    trace: Trace,
    distance: int = 4,
    rank: int = 64,
    epochs: int = 30,
    batch: int = 256,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    generated_weight: float = 1.0,
    correction_l2: float = 0.0,
    online=None,
    log=print,
):
    """Train a :class:`ShadowNet`; returns (net, info dict).

    ``generated_weight`` weighs the loss on generated tokens against
    held-out text: decoding is what prefetch serves, and a model routes its
    own text differently from held-out text. ``correction_l2`` penalizes
    the correction's size (the validation loss that picks the epoch is the
    plain cross-entropy). ``online``: settings of the online correction
    (predict/online.py) saved in the config, None for none."""
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    config = {
        "hidden_size": int(trace.hidden.shape[-1]),
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "moe_layers": list(trace.moe_layers),
        "distance": distance,
        "rank": rank,
    }
    if online is not None:
        config["online"] = dict(online)
    net = ShadowNet(config)
    train_mask = ~eval_mask(trace)
    feats = layer_features(model, trace, distance)
    weight = mx.array(np.where(trace.generated, generated_weight, 1.0).astype(np.float32))
    # Validation: every 8th training sequence, for picking the epoch.
    seq_ids = np.unique(trace.seq[train_mask])
    val_seqs = np.isin(trace.seq, seq_ids[7::8])
    fit_idx = np.flatnonzero(train_mask & ~val_seqs)
    val_idx = mx.array(np.flatnonzero(train_mask & val_seqs))

    steps = epochs * math.ceil(len(fit_idx) / batch)
    opt = optim.AdamW(
        learning_rate=optim.cosine_decay(lr, steps, lr * 0.05), weight_decay=weight_decay
    )
    loss_and_grad = nn.value_and_grad(
        net, lambda n, idx: total_loss(n, feats, weight, idx, trace.num_experts, correction_l2)
    )

    def step(idx):
        loss, grads = loss_and_grad(net, idx)
        opt.update(net, grads)
        return loss

    best = (float(total_loss(net, feats, weight, val_idx, trace.num_experts)), 0, net.parameters())
    log(f"epoch  0  val loss {best[0]:.4f} (router lookahead)")
    for epoch in range(1, epochs + 1):
        order = rng.permutation(fit_idx)
        losses = []
        for s in range(0, len(order) - batch + 1, batch):
            losses.append(step(mx.array(order[s : s + batch])))
            mx.eval(net.parameters(), opt.state)
        val = float(total_loss(net, feats, weight, val_idx, trace.num_experts))
        log(
            f"epoch {epoch:2d}  train loss {np.mean([float(l) for l in losses]):.4f}  val loss {val:.4f}"
        )
        if val < best[0]:
            best = (val, epoch, tree_map(lambda a: a, net.parameters()))
    net.update(best[2])
    mx.eval(net.parameters())
    info = {
        "best_epoch": best[1],
        "val_loss": best[0],
        "train_tokens": int(len(fit_idx)),
        "val_tokens": int(val_idx.size),
        "seed": seed,
        "epochs": epochs,
        "generated_weight": generated_weight,
        "correction_l2": correction_l2,
    }
    return net, info


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_lm_odmoe.train_shadow",
        description="Train the shadow expert predictor on traces from mlx_lm_odmoe.collect and save it next to the model.",
    )
    p.add_argument("model", help="model folder the traces came from")
    p.add_argument(
        "--traces",
        required=True,
        nargs="+",
        help="trace files (.npz) from mlx_lm_odmoe.collect, trained on together",
    )
    p.add_argument(
        "--distance", type=int, default=4, help="how many later MoE layers to predict (default 4)"
    )
    p.add_argument(
        "--rank", type=int, default=64, help="width of the shared projection (default 64)"
    )
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--batch", type=int, default=256, help="tokens per step (default 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument(
        "--seed", type=int, default=0, help="initialisation and shuffling seed (default 0)"
    )
    p.add_argument(
        "--generated-weight",
        type=float,
        default=1.0,
        help="loss weight of generated tokens relative to held-out text (default 1)",
    )
    p.add_argument(
        "--correction-l2",
        type=float,
        default=DEFAULT_L2,
        help=f"penalty on the learned correction's mean square (default {DEFAULT_L2})",
    )
    p.add_argument(
        "--online",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="adapt online from the routes seen while serving (default on; see predict/online.py)",
    )
    p.add_argument(
        "--out",
        help="folder for shadow.safetensors/shadow.json, created if need be "
        "(default: the model folder)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a shadow model already in the --out folder (kept as *.bak)",
    )
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..errors import OdmoeError
    from ..loading import resolve_model_path

    for path in args.traces:
        if not Path(path).is_file():
            parser.error(f"--traces {path}: no such file (write one with mlx_lm_odmoe.collect)")
    try:
        model_path = resolve_model_path(args.model)
        out = Path(args.out).expanduser() if args.out else model_path
        replaced = existing_shadow(parser, out, args.force)
        return run(args, model_path, out, replaced)
    except OdmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def existing_shadow(parser, out: Path, force: bool):
    """The shadow files ``out`` already holds. The shipped models come
    with a trained one: replacing it takes ``--force``."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: is a file, not a folder")
    found = [out / name for name in (CONFIG_NAME, WEIGHTS_NAME) if (out / name).exists()]
    if found and not force:
        parser.error(
            f"{out} already has a shadow model ({', '.join(p.name for p in found)}); pass --force "
            "to replace it (the old files are kept as *.bak) or choose another --out folder"
        )
    return found


def run(args, model_path: Path, out: Path, replaced):
    import mlx_lm_odmoe

    # Only the routers are used: a minimal expert cache reads no experts.
    model, _ = mlx_lm_odmoe.load(model_path, expert_cache="min")
    trace = concat([Trace.load(path) for path in args.traces])
    t0 = time.perf_counter()
    net, info = train(
        model,
        trace,
        args.distance,
        args.rank,
        args.epochs,
        args.batch,
        args.lr,
        seed=args.seed,
        generated_weight=args.generated_weight,
        correction_l2=args.correction_l2,
        online=ONLINE if args.online else None,
    )
    for old in replaced:  # only now that a new one is ready
        old.replace(old.with_name(old.name + ".bak"))
        print(f"kept the previous {old.name} as {old.name}.bak")
    info["traces"] = [Path(p).name for p in args.traces]
    path = save_shadow(net, out, {"training": info})
    nparams = sum(v.size for _, v in tree_flatten(net.parameters()))
    k2 = parameter_count(7168, 384, 60, args.distance, args.rank)
    print(
        f"{path}: {nparams} parameters ({path.stat().st_size / 1e6:.2f} MB), best epoch {info['best_epoch']}, "
        f"{time.perf_counter() - t0:.1f} s; at Kimi K2 scale {k2 / 1e6:.1f} M parameters "
        f"({k2 * 4 / 1e6:.0f} MB float32)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

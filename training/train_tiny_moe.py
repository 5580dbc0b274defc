"""Train a tiny Mixture-of-Experts language model on CPU with MLX.

The models are mlx-lm's own ``qwen2_moe`` and ``deepseek_v3`` classes; the
result is a stock mlx-lm checkpoint folder that ``mlx_lm.load`` opens
without any plugin.

Presets:
  tiny-qwen2-moe  qwen2_moe, 32 experts top-4 + gated shared expert,
                  softmax router, Switch-style load-balancing loss.
  tiny-kimi       kimi_k2 (deepseek_v3 class): MLA attention, first layer
                  dense, 64 experts top-4 + 1 shared expert, sigmoid
                  noaux_tc router with an e_score_correction_bias that is
                  updated with the DeepSeek-V3 aux-loss-free rule, plus a
                  small load-balancing loss.

Example:
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
  python training/train_tiny_moe.py --preset tiny-qwen2-moe --minutes 40 \\
      --seed 0 --data artifacts/data --out artifacts/tiny-qwen2-moe-mlx
"""

import argparse
import math
import os
import shutil
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import deepseek_v3, qwen2_moe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

VOCAB = 4096
EOT_ID = 0

PRESETS = {
    "tiny-qwen2-moe": {
        "module": "qwen2_moe",
        "config": {
            "model_type": "qwen2_moe",
            "architectures": ["Qwen2MoeForCausalLM"],
            "vocab_size": VOCAB,
            "hidden_size": 256,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "intermediate_size": 512,
            "moe_intermediate_size": 128,
            "shared_expert_intermediate_size": 256,
            "num_experts": 32,
            "num_experts_per_tok": 4,
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "output_router_logits": False,
            "router_aux_loss_coef": 0.01,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "max_position_embeddings": 4096,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": 6,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            "use_cache": True,
            "bos_token_id": EOT_ID,
            "eos_token_id": EOT_ID,
            "torch_dtype": "float32",
        },
        "aux_loss_coef": 0.01,
        "bias_update_rate": 0.0,
    },
    "tiny-kimi": {
        "module": "deepseek_v3",
        "config": {
            "model_type": "kimi_k2",
            "architectures": ["DeepseekV3ForCausalLM"],
            "vocab_size": VOCAB,
            "hidden_size": 256,
            "intermediate_size": 768,
            "moe_intermediate_size": 96,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "n_shared_experts": 1,
            "n_routed_experts": 64,
            "num_experts_per_tok": 4,
            "routed_scaling_factor": 2.5,
            "kv_lora_rank": 64,
            "q_lora_rank": 96,
            "qk_rope_head_dim": 16,
            "qk_nope_head_dim": 32,
            "v_head_dim": 32,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": True,
            "n_group": 1,
            "topk_group": 1,
            "moe_layer_freq": 1,
            "first_k_dense_replace": 1,
            "aux_loss_alpha": 0.001,
            "seq_aux": False,
            "rms_norm_eps": 1e-6,
            "rope_theta": 50000.0,
            "rope_scaling": None,
            "max_position_embeddings": 4096,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            "use_cache": True,
            "num_nextn_predict_layers": 0,
            "bos_token_id": EOT_ID,
            "eos_token_id": EOT_ID,
            "torch_dtype": "float32",
        },
        "aux_loss_coef": 0.001,
        "bias_update_rate": 5e-3,
    },
}


def build_model(preset):
    p = PRESETS[preset]
    module = {"qwen2_moe": qwen2_moe, "deepseek_v3": deepseek_v3}[p["module"]]
    args = module.ModelArgs.from_dict(p["config"])
    model = module.Model(args)
    # mlx-lm initialises the deepseek_v3 router weight to zeros (it is meant
    # to be loaded); give it the same uniform init as nn.Linear.
    for _, block in common.moe_blocks(model):
        if isinstance(block, deepseek_v3.DeepseekV3MoE):
            w = block.gate.weight
            scale = 1.0 / math.sqrt(w.shape[-1])
            block.gate.weight = mx.random.uniform(-scale, scale, w.shape)
            # Not a trained parameter: updated by the bias rule below.
            block.gate.freeze(recurse=False, keys=["e_score_correction_bias"])
    return model, args


def count_params(model, args):
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    n_expert = 0
    for _, block in common.moe_blocks(model):
        n_expert += sum(v.size for _, v in tree_flatten(block.switch_mlp.parameters()))
    e = common.num_routed_experts(args)
    k = args.num_experts_per_tok
    n_active = n_total - n_expert + n_expert * k // e
    return n_total, n_active


def lr_at(step, total, base_lr, warmup, min_ratio=0.1):
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def save_checkpoint(model, config, tok_dir, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    tmp = os.path.join(out_dir, "model.safetensors.tmp.safetensors")
    mx.save_safetensors(tmp, weights, metadata={"format": "mlx"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    common.save_json(os.path.join(out_dir, "config.json"), config)
    for fn in sorted(os.listdir(tok_dir)):
        shutil.copy(os.path.join(tok_dir, fn), os.path.join(out_dir, fn))


def main():
    ap = argparse.ArgumentParser(description="Train a tiny MoE LM with MLX.")
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="training wall-time budget; fixes the step count "
        "from the measured speed of the first steps",
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="total steps (sets the learning-rate schedule)"
    )
    ap.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many steps while keeping the schedule "
        "of --steps (replays a run that hit its time limit)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="artifacts/data")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument(
        "--eval-windows",
        type=int,
        default=32,
        help="held-out windows for periodic evals (final eval uses all)",
    )
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if (args.minutes is None) == (args.steps is None):
        ap.error("give exactly one of --minutes / --steps")

    preset = PRESETS[args.preset]
    config = dict(preset["config"])
    aux_coef = preset["aux_loss_coef"]
    bias_rate = preset["bias_update_rate"]

    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)

    train_tokens = common.load_tokens(args.data, "train")
    heldout_tokens = common.load_tokens(args.data, "heldout")
    tok_dir = os.path.join(args.data, "tokenizer")
    ctx, bs = args.context, args.batch_size

    model, margs = build_model(args.preset)
    common.install_router_recorders(model)
    n_total, n_active = count_params(model, margs)
    n_experts = common.num_routed_experts(margs)
    top_k = margs.num_experts_per_tok
    moe_layers = [i for i, _ in common.moe_blocks(model)]
    print(
        f"preset {args.preset}: {n_total / 1e6:.2f}M params, "
        f"{n_active / 1e6:.2f}M active/token, MoE layers {moe_layers}",
        flush=True,
    )

    optimizer = optim.AdamW(
        learning_rate=args.lr, betas=[0.9, 0.95], weight_decay=args.weight_decay
    )

    def loss_fn(model, x, y):
        common.ROUTER_LOG.clear()
        logits = model(x).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, y, reduction="mean")
        routed = common.router_outputs(top_k)
        common.ROUTER_LOG.clear()
        aux = mx.stack([common.load_balancing_loss(p, i, n_experts) for p, i in routed]).mean()
        loads = mx.stack(
            [mx.zeros((n_experts,), mx.float32).at[i.reshape(-1)].add(1.0) for _, i in routed]
        )
        return ce + aux_coef * aux, ce, aux, loads

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step_fn(x, y):
        (loss, ce, aux, loads), grads = loss_and_grad(model, x, y)
        grads, gnorm = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return ce, aux, loads, gnorm

    state = [model.state, optimizer.state]
    step = step_fn if args.no_compile else mx.compile(step_fn, inputs=state, outputs=state)

    periodic_windows = common.eval_windows(heldout_tokens, ctx, args.eval_windows)
    final_windows = common.eval_windows(heldout_tokens, ctx)
    unigram = common.unigram_baseline(train_tokens, final_windows[:, 1:], VOCAB)
    print(f"unigram baseline (held-out): {unigram:.4f} nats", flush=True)

    log = {
        "preset": args.preset,
        "seed": args.seed,
        "args": vars(args),
        "config": config,
        "params_total": n_total,
        "params_active_per_token": n_active,
        "aux_loss_coef": aux_coef,
        "bias_update_rate": bias_rate,
        "train_tokens_available": int(len(train_tokens)),
        "heldout_tokens": int(len(heldout_tokens)),
        "heldout_eval_tokens": int(final_windows[:, 1:].size),
        "unigram_baseline_loss": unigram,
        "history": [],
        "evals": [],
        "blas": os.environ.get("LD_PRELOAD", ""),
        "mlx_version": mx.__version__,
    }
    os.makedirs(args.out, exist_ok=True)

    total_steps = args.steps
    budget = None if args.minutes is None else args.minutes * 60.0
    probe_steps = 20
    t_start = time.time()
    t_train = 0.0  # time spent in optimisation steps only
    tokens_seen = 0
    it = 0
    ce_acc, aux_acc, n_acc = 0.0, 0.0, 0
    load_acc = np.zeros((len(moe_layers), n_experts))
    stopped_early = False

    def run_eval(windows):
        return common.heldout_loss(model, windows)

    while True:
        if total_steps is not None and it >= total_steps:
            break
        if args.stop_after is not None and it >= args.stop_after:
            stopped_early = True
            break
        if budget is not None and total_steps is not None and time.time() - t_start > 1.15 * budget:
            stopped_early = True
            print(f"time budget exceeded, stopping at step {it}", flush=True)
            break

        starts = rng.integers(0, len(train_tokens) - ctx - 1, size=bs)
        batch = np.stack([np.asarray(train_tokens[s : s + ctx + 1]) for s in starts]).astype(
            np.int32
        )
        x, y = mx.array(batch[:, :-1]), mx.array(batch[:, 1:])

        sched_total = total_steps if total_steps is not None else 10**9
        optimizer.learning_rate = mx.array(lr_at(it, sched_total, args.lr, args.warmup))
        t0 = time.time()
        ce, aux, loads, gnorm = step(x, y)
        mx.eval(ce, aux, loads, gnorm, model.state, optimizer.state)
        dt = time.time() - t0
        t_train += dt
        tokens_seen += bs * ctx
        it += 1

        loads_np = np.array(loads)
        if bias_rate > 0:
            # DeepSeek-V3 aux-loss-free balancing: raise the bias of
            # under-loaded experts, lower it for over-loaded ones.
            for row, (_, block) in zip(loads_np, common.moe_blocks(model)):
                delta = np.sign(row.mean() - row).astype(np.float32)
                block.gate.e_score_correction_bias = (
                    block.gate.e_score_correction_bias + bias_rate * mx.array(delta)
                )
            mx.eval(model.state)

        ce_acc += ce.item()
        aux_acc += aux.item()
        n_acc += 1
        load_acc += loads_np

        if budget is not None and total_steps is None and it == probe_steps:
            per_step = (time.time() - t_start) / it
            total_steps = max(probe_steps + 1, int(budget / per_step))
            print(
                f"measured {per_step:.2f}s/step; fixing total steps to {total_steps} "
                f"(reproduce with --steps {total_steps})",
                flush=True,
            )

        if it % 10 == 0 or it == 1:
            frac = load_acc / load_acc.sum(axis=1, keepdims=True)
            maxvio = float((frac.max(axis=1) * n_experts - 1).mean())
            elapsed = time.time() - t_start
            rec = {
                "step": it,
                "tokens": tokens_seen,
                "elapsed_s": round(elapsed, 1),
                "train_ce": ce_acc / n_acc,
                "aux": aux_acc / n_acc,
                "lr": float(optimizer.learning_rate.item()),
                "grad_norm": float(gnorm.item()),
                "tok_per_s": tokens_seen / t_train,
                "max_load_violation": maxvio,
            }
            log["history"].append(rec)
            print(
                f"step {it:5d}/{total_steps or '?'} ce {rec['train_ce']:.3f} aux {rec['aux']:.3f} "
                f"lr {rec['lr']:.2e} gn {rec['grad_norm']:.2f} maxvio {maxvio:.2f} "
                f"{rec['tok_per_s']:.0f} tok/s {elapsed / 60:.1f} min",
                flush=True,
            )
            ce_acc, aux_acc, n_acc = 0.0, 0.0, 0
            load_acc[:] = 0

        if it % args.eval_every == 0:
            hl = run_eval(periodic_windows)
            log["evals"].append(
                {
                    "step": it,
                    "tokens": tokens_seen,
                    "heldout_loss_subset": hl,
                    "elapsed_s": round(time.time() - t_start, 1),
                }
            )
            print(f"  eval step {it}: held-out loss (subset) {hl:.4f}", flush=True)
            save_checkpoint(model, config, tok_dir, args.out)

    wall = time.time() - t_start
    final = run_eval(final_windows)
    save_checkpoint(model, config, tok_dir, args.out)
    log.update(
        {
            "steps": it,
            "steps_planned": total_steps,
            "stopped_early": stopped_early,
            "tokens_seen": tokens_seen,
            "train_wall_time_s": wall,
            "train_step_time_s": t_train,
            "tokens_per_s": tokens_seen / t_train,
            "heldout_loss": final,
            "heldout_ppl": math.exp(final),
            "unigram_ppl": math.exp(unigram),
            "reproduce": f"--preset {args.preset} --steps {total_steps} --seed {args.seed}"
            + (f" --stop-after {it}" if stopped_early else ""),
        }
    )
    print(
        f"final: {it} steps, {tokens_seen} tokens, {wall / 60:.1f} min, "
        f"held-out loss {final:.4f} (unigram {unigram:.4f})",
        flush=True,
    )

    # Round trip through stock mlx-lm, as a user would load it.
    import mlx_lm

    m2, tok = mlx_lm.load(args.out)
    reloaded = common.heldout_loss(m2, final_windows[:8])
    sample = mlx_lm.generate(m2, tok, prompt="def ", max_tokens=40, verbose=False)
    log["reload_check_loss_first8"] = reloaded
    log["sample_def"] = "def " + sample
    print("sample:\n" + log["sample_def"], flush=True)
    common.save_json(os.path.join(args.out, "train_log.json"), log)


if __name__ == "__main__":
    main()

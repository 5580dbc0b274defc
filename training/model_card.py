"""Write a shipped model's README.md (model card) from the training log and
the held-out statistics of the trained and of the shipped checkpoint.

    python training/model_card.py --trained artifacts/tiny-qwen2-moe-mlx \
        --shipped-stats shipped-stats.json --out models/tiny-qwen2-moe

The card's expert-prediction section comes from the cross-domain report of
mlx_lm_odmoe.research.cross_domain (its JSON) and is written, or replaced in
an existing card, with

    python training/model_card.py --prediction cross-tiny-kimi.json --out models/tiny-kimi
"""

import argparse
import json
from pathlib import Path

from mlx_lm_odmoe.model_types import odmoe_type_for


def card(name, log, trained, shipped, quant):
    cfg = log["config"]
    arch = cfg["model_type"]
    lines = [
        f"# {name}",
        "",
        "A small Mixture-of-Experts language model trained from scratch by this project, so that "
        "expert caching and prediction can be measured on *learned* routing. It is the "
        + (
            "default model of the README."
            if "qwen" in name
            else "Kimi K2 / DeepSeek-V3 architecture fixture."
        ),
        "",
        "## Architecture",
        "",
        f"- mlx-lm `{arch}` (served here as `{odmoe_type_for(arch)}`), "
        f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads, "
        f"vocab {cfg['vocab_size']} (byte-level BPE)",
    ]
    if arch == "qwen2_moe":
        lines.append(
            f"- {cfg['num_experts']} routed experts, top-{cfg['num_experts_per_tok']}, expert width "
            f"{cfg['moe_intermediate_size']}, softmax routing, shared expert {cfg['shared_expert_intermediate_size']} with sigmoid gate"
        )
    else:
        lines.append(
            f"- MLA attention (kv_lora_rank {cfg['kv_lora_rank']}, q_lora_rank {cfg['q_lora_rank']}), "
            f"{cfg['n_routed_experts']} routed experts, top-{cfg['num_experts_per_tok']}, expert width "
            f"{cfg['moe_intermediate_size']}, sigmoid `noaux_tc` routing with `e_score_correction_bias` "
            f"(aux-loss-free bias updates), routed_scaling_factor {cfg['routed_scaling_factor']}, "
            f"{cfg['n_shared_experts']} shared expert, first {cfg['first_k_dense_replace']} layer dense"
        )
    lines += [
        f"- {log['params_total'] / 1e6:.2f}M parameters, {log['params_active_per_token'] / 1e6:.2f}M active per token",
        f"- shipped as MLX affine {quant['bits']}-bit, group {quant['group_size']}, float32 scales (fast on MLX's CPU backend), "
        "in the sharded expert layout (`experts/`)",
        "",
        "## Data and training",
        "",
        "- Text: the Python 3.11 standard library sources and the reST sources of the Python 3.11 docs "
        "(Debian `python3.11-doc`), both PSF-licensed; files mentioning the GPL were left out. "
        f"{log['train_tokens_available'] / 1e6:.2f}M training tokens; held-out split by file.",
        f"- Seed {log['seed']}, AdamW, batch {log['args']['batch_size']} x {log['args']['context']} tokens, "
        f"load-balancing aux loss (coef {log['aux_loss_coef']})"
        + (f", bias update rate {log['bias_update_rate']}" if log.get("bias_update_rate") else ""),
        f"- {log['steps']} steps, {log['tokens_seen'] / 1e6:.2f}M tokens seen, "
        f"{log['train_wall_time_s'] / 60:.1f} min on 2 CPU cores (MLX CPU backend, OpenBLAS preloaded, shared machine)",
        f"- Reproduce: `{log['reproduce']}` (see training/README.md)",
        "",
        "## Held-out results",
        "",
        "| | loss (nats/token) | perplexity |",
        "|---|---|---|",
        f"| unigram baseline (same tokenizer) | {trained['unigram_baseline_loss']:.4f} | {trained['unigram_ppl']:.1f} |",
        f"| trained, float32 | {trained['heldout_loss']:.4f} | {trained['heldout_ppl']:.1f} |",
        f"| shipped, {quant['bits']}-bit | {shipped['heldout_loss']:.4f} | {shipped['heldout_ppl']:.1f} |",
        "",
        "## Routing (held-out text, shipped weights)",
        "",
        "Load entropy is the entropy of each layer's expert-use distribution over its maximum (1.0 = even); "
        "overlap is |A∩B|/k of consecutive tokens' expert sets, next to the same for unrelated tokens "
        f"(random sets: {shipped['random_set_overlap']:.3f}).",
        "",
        "| layer | load entropy | busiest / even share | consecutive overlap | unrelated overlap |",
        "|---|---|---|---|---|",
    ]
    for l in shipped["layers"]:
        lines.append(
            f"| {l['layer']} | {l['load_entropy_norm']:.3f} | {l['max_share_x_uniform']:.2f} | "
            f"{l['consecutive_overlap']:.3f} | {l['unrelated_overlap']:.3f} |"
        )
    lines += ["", "License of the weights: PSF (as the training text)."]
    return "\n".join(lines) + "\n"


PREDICTION_HEADING = "## Expert prediction on text the shadow model was not trained on"


def prediction_section(report: dict, shadow_config: dict) -> str:
    """The shipped shadow model's recipe and the leave-one-kind-out recall."""
    kinds = list(report["kinds"])
    training = shadow_config.get("training", {})
    online = shadow_config.get("online")
    lines = [
        PREDICTION_HEADING,
        "",
        f"The shipped shadow model (`shadow.safetensors`) was trained on traces of {', '.join(kinds)} "
        "text (`training/text_kinds.py`: Python stdlib code the model never saw, coreutils man pages, "
        "license texts), teacher-forced and the model's own continuations, with a penalty on the "
        f"size of its learned correction (`correction_l2` {training.get('correction_l2', 0)})"
        + (
            ", and it adapts online to the text it serves (a bias and a gate per layer pair)."
            if online
            else "."
        ),
        "",
        "Cross-domain recall of the true top-k at width k (%, generated tokens): each row's shadow model "
        "was trained without that kind of text (the others' traces only) and scored on it; "
        "in domain is the same model on the evaluation sequences of its own kinds. "
        "From `benchmarks/results/predict-cross/`.",
        "",
        "| held out | predictor | d=1 | d=2 | d=3 | d=4 |",
        "|---|---|---|---|---|---|",
    ]
    for held_out, entry in report["kinds"].items():
        for where in ("out_of_domain", "in_domain"):
            block = entry[where].get("generated")
            if block is None:
                continue
            res = block["predictors"]
            names = [n for n in res if where == "out_of_domain" or n == "shadow"]
            for name in names:
                r = next(v for key, v in res[name].items() if key.startswith("recall@"))
                label = name if where == "out_of_domain" else f"{name}, in domain"
                cells = " | ".join(f"{100 * r[d]:.1f}" for d in sorted(r, key=int))
                lines.append(f"| {held_out} | {label} | {cells} |")
    return "\n".join(lines) + "\n"


def live_rows(live: dict) -> str:
    """Next-attention against the lookahead one layer ahead, from a
    mlx_lm_odmoe.research.live_recall report."""
    by = {(r["kind"], r["split"], r["predictor"]): r["recall"] for r in live["rows"]}
    lines = [
        "",
        "One layer ahead the block guesses with the next layer's own attention run ahead "
        "(`predict_with: auto`; no training, so every kind is held out for it). Recall of the "
        f"true top-k at width k (%), measured in the block while decoding at {live['budget']} of "
        "the experts (`mlx_lm_odmoe.research.live_recall`):",
        "",
        "| text | split | router-lookahead d=1 | next-attention d=1 |",
        "|---|---|---|---|",
    ]
    for kind, split, name in by:
        if name == "lookahead":
            na = by[(kind, split, "next-attention")]
            lines.append(
                f"| {kind} | {split} | {100 * by[(kind, split, name)]:.1f} | {100 * na:.1f} |"
            )
    return "\n".join(lines) + "\n"


def replace_section(card_text: str, section: str) -> str:
    """``card_text`` with its prediction section replaced (or added before
    the closing license line)."""
    marker = "License of the weights"
    if PREDICTION_HEADING in card_text:
        head, rest = card_text.split(PREDICTION_HEADING, 1)
        ends = [i for i in (rest.find("\n## "), rest.find(marker)) if i >= 0]
        tail = rest[min(ends) :].lstrip("\n") if ends else ""
        return head + section + "\n" + tail
    if marker in card_text:
        head, tail = card_text.split(marker, 1)
        return head + section + "\n" + marker + tail
    return card_text.rstrip("\n") + "\n\n" + section


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trained")
    p.add_argument("--shipped-stats")
    p.add_argument("--prediction", help="cross-domain report (JSON): write only that section")
    p.add_argument("--live", help="live_recall report (JSON): adds next-attention's recall")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.prediction:
        out = Path(a.out)
        report = json.loads(Path(a.prediction).read_text())
        shadow = json.loads((out / "shadow.json").read_text())
        card_path = out / "README.md"
        section = prediction_section(report, shadow)
        if a.live:
            section += live_rows(json.loads(Path(a.live).read_text()))
        card_path.write_text(replace_section(card_path.read_text(), section))
        print(f"wrote the prediction section of {card_path}")
        return
    if not (a.trained and a.shipped_stats):
        p.error("--trained and --shipped-stats are needed for a whole card")
    trained_dir, out = Path(a.trained), Path(a.out)
    log = json.loads((trained_dir / "train_log.json").read_text())
    trained = json.loads((trained_dir / "stats.json").read_text())
    shipped = json.loads(Path(a.shipped_stats).read_text())
    quant = json.loads((out / "config.json").read_text())["quantization"]
    (out / "README.md").write_text(card(out.name, log, trained, shipped, quant))
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()

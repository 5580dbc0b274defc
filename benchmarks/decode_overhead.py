"""Decode speed of odmoe vs stock mlx-lm, measured side by side in one run.

    python benchmarks/decode_overhead.py                 # synthetic 4-bit model
    python benchmarks/decode_overhead.py --model DIR     # a stock mlx-lm MoE folder

Builds (or takes) a stock mlx-lm checkpoint, converts it to the sharded
layout, then alternates stock and odmoe generation runs (A/B/A/B...) so
machine noise hits both alike, and reports median tokens/s and the ratio.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

MEDIUM_QWEN2_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "hidden_size": 768,
    "num_hidden_layers": 8,
    "intermediate_size": 2048,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 384,
    "shared_expert_intermediate_size": 1536,
    "norm_topk_prob": False,
    "rms_norm_eps": 1e-6,
    "vocab_size": 4096,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
}


def build_models(work: Path, model: str = None):
    from mlx_lm.convert import convert as stock_convert

    from mlx_lm_odmoe.conversion.convert import convert
    from mlx_lm_odmoe.tools.synthetic import write_hf_checkpoint

    if model is None:
        hf = write_hf_checkpoint(work / "hf", MEDIUM_QWEN2_MOE, seed=0)
        stock = work / "stock-q4"
        stock_convert(str(hf), str(stock), quantize=True, q_bits=4, q_group_size=64)
    else:
        stock = Path(model)
    od = work / "odmoe"
    convert(stock, od, progress=False)
    return stock, od


def decode_tps(model, tok, prompt: str, tokens: int) -> float:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    last = None
    no_eos = lambda t, l: l.at[..., list(tok.eos_token_ids)].add(-1e9)  # noqa: E731 (every run makes `tokens`)
    for last in mlx_lm.stream_generate(
        model, tok, prompt, max_tokens=tokens, sampler=make_sampler(0.0), logits_processors=[no_eos]
    ):
        pass
    return last.generation_tps


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="Stock mlx-lm MoE folder (default: a synthetic 4-bit Qwen2-MoE)")
    p.add_argument(
        "--budgets", default="100%", help="Comma-separated odmoe budgets. Default: 100%%"
    )
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table")
    args = p.parse_args(argv)

    import mlx_lm

    import mlx_lm_odmoe

    with tempfile.TemporaryDirectory() as tmp:
        stock_dir, od_dir = build_models(Path(tmp), args.model)
        contenders = {"stock": mlx_lm.load(str(stock_dir))}
        for b in args.budgets.split(","):
            contenders[f"odmoe@{b}"] = mlx_lm_odmoe.load(od_dir, expert_cache=b)
        prompt = "def fibonacci(n):\n    "
        for m, t in contenders.values():  # warm up
            decode_tps(m, t, prompt, 8)
        results = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, (m, t) in contenders.items():
                results[name].append(decode_tps(m, t, prompt, args.tokens))
        base = statistics.median(results["stock"])
        rows = []
        for name, tps in results.items():
            med = statistics.median(tps)
            row = {
                "model": name,
                "decode_tok_s": round(med, 2),
                "stock_time_ratio": round(base / med, 4),
            }
            if name != "stock":
                s = mlx_lm_odmoe.stats(contenders[name][0])
                row.update(hit_rate=s["hit_rate"], bytes_read=s["bytes_read"])
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(
        f"\nDecode, {args.tokens} tokens x {args.rounds} interleaved rounds (median); "
        "time ratio = stock tok/s / model tok/s (1.00 = as fast as stock)\n"
    )
    print("| model | decode tok/s | time vs stock | hit rate |")
    print("|---|---|---|---|")
    for r in rows:
        hr = r.get("hit_rate")
        print(
            f"| {r['model']} | {r['decode_tok_s']:.1f} | {r['stock_time_ratio']:.3f}x | "
            f"{'' if hr is None else f'{hr:.3f}'} |"
        )


if __name__ == "__main__":
    main()

"""``mlx_lm_odmoe.convert``: MoE checkpoints -> the sharded expert layout."""

import argparse
import sys


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_lm_odmoe.convert",
        description=(
            "Convert a Hugging Face (per-expert tensors), mlx-lm (stacked "
            "switch_mlp) or llama.cpp GGUF MoE checkpoint into a model folder "
            "whose routed experts are loaded on demand. Supported model types: "
            "qwen2_moe, deepseek_v3, kimi_k2, kimi_k25 (GGUF: qwen2moe, "
            "deepseek2). The output loads with stock mlx_lm.generate / "
            "mlx_lm.server / mlx_lm.load."
        ),
        epilog="Examples: mlx_lm_odmoe.convert --hf-path ./Qwen1.5-MoE-A2.7B --mlx-path ./qwen-odmoe -q ; "
               "mlx_lm_odmoe.convert --gguf ./Kimi-K2-Q4_K_M-00001-of-00013.gguf --mlx-path ./kimi -q",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-path", "--model", help="Source model folder.")
    source.add_argument("--gguf", help="Source llama.cpp GGUF file (qwen2moe or deepseek2); for a split "
                                       "model, any of its NAME-0000i-of-0000N.gguf parts.")
    p.add_argument("--mlx-path", default="mlx_model", help="Output folder (must not exist). Default: mlx_model")
    p.add_argument("-q", "--quantize", action="store_true", help="Quantize (MLX affine) the model, experts included.")
    p.add_argument("--q-group-size", type=int, default=64, choices=(32, 64, 128), help="Quantization group size. Default: 64")
    p.add_argument("--q-bits", type=int, default=4, choices=(4, 8), help="Bits per weight. Default: 4")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="Type of float weights (default: the source's torch_dtype). "
                        "Use float32 for MLX's CPU backend (Linux).")
    p.add_argument("--shard-size-gb", type=float, default=2.0, help="Largest expert shard in GB. Default: 2")
    p.add_argument("--force", action="store_true", help="Replace --mlx-path if it exists.")
    return p


def main(argv=None):
    parser = configure_parser()
    args = parser.parse_args(argv)
    if args.gguf and not args.gguf.endswith(".gguf"):
        parser.error(f"--gguf expects a .gguf file, got {args.gguf!r}")
    from .convert import convert

    try:
        out = convert(
            args.hf_path or args.gguf,
            args.mlx_path,
            quantize=args.quantize,
            q_group_size=args.q_group_size,
            q_bits=args.q_bits,
            dtype=args.dtype,
            shard_size_gb=args.shard_size_gb,
            force=args.force,
        )
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[INFO] Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

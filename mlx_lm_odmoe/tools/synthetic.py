"""Random-weight checkpoints with real architectures, for tests and benchmarks.

Shapes and names come from mlx-lm's own model classes; the checkpoint is
written the way Hugging Face transformers lays it out (one tensor per expert,
DeepSeek's fused ``kv_b_proj``) with the ``safetensors`` library, so the
converters and stock mlx-lm read it like any downloaded model.
"""

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..model_types import STOCK_TYPE_OF

TINY_QWEN2_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 128,
    "norm_topk_prob": False,
    "rms_norm_eps": 1e-6,
    "vocab_size": 384,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
    "torch_dtype": "float32",
}

TINY_KIMI = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "routed_scaling_factor": 2.827,
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
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 50000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "vocab_size": 384,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def _stock_parameters(config: dict, seed: int):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def hf_weights(config: dict, seed: int = 0) -> dict:
    """HF-named float32 numpy tensors for ``config`` (random, seeded)."""
    rng = np.random.default_rng(seed)
    params = _stock_parameters(config, seed)
    for k, v in params.items():
        if k.endswith("norm.weight"):
            params[k] = (1.0 + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
        elif k.endswith("mlp.gate.weight"):
            params[k] = rng.standard_normal(v.shape).astype(np.float32)  # sharp, varied routing
        elif k.endswith("e_score_correction_bias"):
            params[k] = (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
    return to_hf_names(params)


def to_hf_names(params: dict) -> dict:
    """mlx-lm parameter names and layouts -> Hugging Face's: stacked experts
    split per expert, MLA's embed_q/unembed_out fused back into kv_b_proj."""
    out = {}
    for k, v in params.items():
        if ".switch_mlp." in k:
            prefix, rest = k.split(".switch_mlp.")
            for e in range(v.shape[0]):
                out[f"{prefix}.experts.{e}.{rest}"] = np.ascontiguousarray(v[e])
        elif k.endswith("self_attn.embed_q.weight"):
            continue
        elif k.endswith("self_attn.unembed_out.weight"):
            base = k[: -len("unembed_out.weight")]
            wk = params[base + "embed_q.weight"].swapaxes(-1, -2)  # [H, nope, r]
            kv_b = np.concatenate([wk, v], axis=1)  # [H, nope + v, r]
            out[base + "kv_b_proj.weight"] = np.ascontiguousarray(kv_b.reshape(-1, kv_b.shape[-1]))
        else:
            out[k] = np.ascontiguousarray(v)
    return out


def export_hf(model_dir, out_dir) -> Path:
    """A Hugging Face float32 checkpoint of an odmoe model folder (quantized
    weights dequantized), with the stock model_type: the shipped trained
    models in the format converters start from."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    from .. import load

    model, _ = load(model_dir, expert_cache="100%")
    store = model.expert_runtime.store
    q = store.layout.quantization
    params = {k: np.array(v) for k, v in tree_flatten(dequantize_model(model).parameters())}
    for name, m in model.named_modules():  # MLA's per-head projections
        if type(m).__name__ == "QuantizedMultiLinear":
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            params = {k: v for k, v in params.items() if not k.startswith(name + ".")}
            params[f"{name}.weight"] = np.array(w)
    for l in store.layout.moe_layers:
        pool = store.resident_pool(l)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = pool[f"{proj}.weight"]
            if q:
                w = mx.dequantize(
                    w,
                    pool[f"{proj}.scales"],
                    pool.get(f"{proj}.biases"),
                    q["group_size"],
                    q["bits"],
                )
            params[f"model.layers.{l}.mlp.switch_mlp.{proj}.weight"] = np.array(
                w.astype(mx.float32)
            )
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["model_type"] = STOCK_TYPE_OF[config["model_type"]]
    for k in ("odmoe", "quantization", "quantization_config"):
        config.pop(k, None)
    out = write_hf_checkpoint(out_dir, config, weights=to_hf_names(params))
    for f in Path(model_dir).glob("tokenizer*"):  # the model's own tokenizer
        (out / f.name).write_bytes(f.read_bytes())
    return out


def write_tokenizer(out_dir: Path, vocab_size: int = 320):
    """A small byte-level BPE tokenizer that mlx-lm and transformers load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [
        json.dumps(TINY_QWEN2_MOE),
        json.dumps(TINY_KIMI),
        "def hello(world):\n    return world * 2\n",
    ] * 20
    tok.train_from_iterator(text, trainer)
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "bos_token": None,
                "pad_token": "<|endoftext|>",
                "model_max_length": 2048,
                "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
            }
        )
    )


def write_hf_checkpoint(
    out_dir,
    config: dict,
    seed: int = 0,
    shards: int = 1,
    dtype: str = "float32",
    weights: Optional[dict] = None,
) -> Path:
    """Write config.json, tokenizer and safetensors weights (``shards`` files
    with a ``model.safetensors.index.json`` when more than one). float32 and
    float16 go through the ``safetensors`` library; bfloat16, which numpy
    lacks, through MLX's safetensors writer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = weights if weights is not None else hf_weights(config, seed)
    keys = sorted(weights)
    parts = [keys[i::shards] for i in range(shards)]
    names = (
        ["model.safetensors"]
        if shards == 1
        else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    )
    for name, part in zip(names, parts):
        _save({k: weights[k] for k in part}, out / name, dtype)
    if shards > 1:
        weight_map = {k: name for name, part in zip(names, parts) for k in part}
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    cfg = dict(config, torch_dtype=dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    write_tokenizer(out)
    return out


def _save(tensors: dict, path: Path, dtype: str):
    if dtype == "bfloat16":
        import mlx.core as mx

        mx.save_safetensors(
            str(path),
            {k: mx.array(v).astype(mx.bfloat16) for k, v in tensors.items()},
            metadata={"format": "pt"},
        )
        return
    from safetensors.numpy import save_file

    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    save_file(
        {k: v.astype(np_dtype) for k, v in tensors.items()}, str(path), metadata={"format": "pt"}
    )


def write_stock_checkpoint(out_dir, config: dict, seed: int = 0, q_bits: Optional[int] = None):
    """A stock mlx-lm folder for ``config``: the model built by mlx-lm's own
    classes (random init, seeded), optionally quantized by mlx-lm's
    ``quantize_model`` (group size 32), saved by mlx-lm's own ``save_model``
    and ``save_config``, with a small tokenizer."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    if q_bits:
        model, config = quantize_model(model, config, 32, q_bits)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    save_config(dict(config), config_path=out / "config.json")
    write_tokenizer(out)
    return out

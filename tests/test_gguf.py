"""GGUF in: llama.cpp files -> the sharded expert layout.

Every GGUF here is a real file written by gguf-py's GGUFWriter in llama.cpp's
layout (conversion/gguf_export.py) and read back through GGUFReader. Float32
files must convert bit-identically to stock mlx-lm loading the Hugging Face
checkpoint. Half and quantized files are compared, also bit for bit, with stock
mlx-lm loading the weights such a file holds: each tensor passed through
gguf-py's own quantize/dequantize along the axis llama.cpp blocks it on. Both
sides then compute with the same float32 numbers, so no tolerance is needed.
"""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants
from logits import max_abs_diff, prefill_and_decode, prompt_tokens
from mlx_lm.utils import load_config, load_model

import mlx_lm_odmoe
from mlx_lm_odmoe.conversion.convert import convert
from mlx_lm_odmoe.conversion.convert import main as convert_main
from mlx_lm_odmoe.conversion.gguf_export import PlannedTensor, export_gguf, plan_gguf, write_gguf
from mlx_lm_odmoe.conversion.gguf_source import GGUFSource, build_tokenizer
from mlx_lm_odmoe.loading import odmoe_model_config
from mlx_lm_odmoe.tools.synthetic import TINY_KIMI, TINY_QWEN2_MOE, hf_weights, write_hf_checkpoint

Q = GGMLQuantizationType
CONFIGS = {"qwen2_moe": TINY_QWEN2_MOE, "kimi_k2": TINY_KIMI}
KINDS = list(CONFIGS)
TEXTS = [
    "def hello(world):\n    return world * 2\n",
    "<|endoftext|>x<|endoftext|>",
    "  two  spaces\t\ttabs\n\n",
    "it's 12345 don't",
    "héllo wörld 中文 🚀",
    "",
]


@pytest.fixture(scope="module")
def ggufs(models, tmp_path_factory):
    """ggufs(kind, outtype) -> a GGUF exported from models(kind, "hf")."""
    root, cache = tmp_path_factory.mktemp("gguf"), {}

    def get(kind, outtype):
        if (kind, outtype) not in cache:
            cache[kind, outtype] = export_gguf(
                models(kind, "hf"), root / f"{kind}-{outtype}.gguf", outtype
            )[0]
        return cache[kind, outtype]

    return get


@pytest.fixture(scope="module")
def stock(models):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = mlx_lm.load(str(models(kind, "hf")))
        return cache[kind]

    return get


def _logits_diff(stock_model, model, seed=0):
    prompt = prompt_tokens(24, seed=seed)
    return max_abs_diff(prefill_and_decode(stock_model, prompt), prefill_and_decode(model, prompt))


def _through(v: np.ndarray, qtype: Q) -> np.ndarray:
    return gguf_quants.dequantize(gguf_quants.quantize(v, qtype), qtype)


def gguf_weights(config: dict, weights: dict, qtype: Q) -> dict:
    """The float32 values a GGUF of ``qtype`` holds, in Hugging Face names.
    llama.cpp keeps 1-D tensors, norms and routers F32 and quantizes the rest
    in blocks along the GGUF row, which is the Hugging Face row for every
    tensor but DeepSeek's attn_k_b (kv_b_proj's key half, transposed)."""
    out = {}
    for k, v in weights.items():
        if v.ndim == 1 or k.endswith(
            ("norm.weight", "mlp.gate.weight", "shared_expert_gate.weight")
        ):
            out[k] = v
        elif k.endswith("kv_b_proj.weight"):
            nope = config["qk_nope_head_dim"]
            kv_b = v.reshape(config["num_attention_heads"], nope + config["v_head_dim"], -1)
            k_b = _through(np.ascontiguousarray(kv_b[:, :nope].swapaxes(1, 2)), qtype).swapaxes(
                1, 2
            )
            out[k] = np.concatenate([k_b, _through(kv_b[:, nope:], qtype)], axis=1).reshape(v.shape)
        else:
            out[k] = _through(v, qtype)
    return out


def _convert_cli(gguf_path, out):
    assert (
        convert_main(["--gguf", str(gguf_path), "--mlx-path", str(out), "--dtype", "float32"]) == 0
    )
    return out


# --- Round trips -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_float32_gguf_converts_bit_identical(ggufs, stock, tmp_path, kind):
    out = _convert_cli(ggufs(kind, "F32"), tmp_path / "od")
    model, tokenizer = mlx_lm_odmoe.load(out, expert_cache="50%")
    stock_model, stock_tokenizer = stock(kind)
    assert _logits_diff(stock_model, model) == 0.0
    for text in TEXTS:
        assert tokenizer.encode(text) == stock_tokenizer.encode(text), text
    kwargs = dict(prompt="def hello(", max_tokens=12)
    assert mlx_lm.generate(model, tokenizer, **kwargs) == mlx_lm.generate(
        stock_model, stock_tokenizer, **kwargs
    )
    assert tokenizer.chat_template == stock_tokenizer.chat_template
    assert json.loads((out / "config.json").read_text())["model_type"].endswith("_odmoe")


QUANTIZED = [("qwen2_moe", t) for t in ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")] + [
    ("kimi_k2", t) for t in ("F16", "Q8_0", "Q4_0")
]


@pytest.mark.parametrize("kind,outtype", QUANTIZED)
def test_half_and_quantized_ggufs_equal_their_dequantized_weights(ggufs, tmp_path, kind, outtype):
    gguf_path = ggufs(kind, outtype)
    types = {t.name: t.tensor_type for t in GGUFReader(gguf_path).tensors}
    assert (
        types["blk.1.ffn_gate_exps.weight"] == Q[outtype]
        and types["blk.1.attn_norm.weight"] == Q.F32
    )

    config = CONFIGS[kind]
    hf = hf_weights(config, seed=1)
    write_hf_checkpoint(tmp_path / "ref", config, weights=gguf_weights(config, hf, Q[outtype]))
    reference, _ = mlx_lm.load(str(tmp_path / "ref"))
    convert(gguf_path, tmp_path / "od", dtype="float32", progress=False)
    model, _ = mlx_lm_odmoe.load(tmp_path / "od", expert_cache="min")
    assert _logits_diff(reference, model) == 0.0


def test_mlx_quantized_conversion_of_a_gguf_equals_that_of_its_weights(ggufs, tmp_path):
    """-q on a Q8_0 GGUF is -q on the float weights it holds."""
    config = CONFIGS["kimi_k2"]
    weights = gguf_weights(config, hf_weights(config, seed=1), Q.Q8_0)
    ref = write_hf_checkpoint(tmp_path / "ref", config, weights=weights)
    convert(ref, tmp_path / "from_hf", quantize=True, dtype="float32", progress=False)
    convert(
        ggufs("kimi_k2", "Q8_0"),
        tmp_path / "from_gguf",
        quantize=True,
        dtype="float32",
        progress=False,
    )
    want, _ = mlx_lm_odmoe.load(tmp_path / "from_hf", expert_cache="min")
    got, _ = mlx_lm_odmoe.load(tmp_path / "from_gguf", expert_cache="min")
    assert _logits_diff(want, got) == 0.0


def test_dequantized_resident_weights_take_the_target_type_at_once(ggufs):
    """So a quantized file's resident tensors never sit in memory as float32."""
    path, name = ggufs("kimi_k2", "Q8_0"), "model.layers.1.self_attn.o_proj.weight"
    assert GGUFSource(path).config["torch_dtype"] == "float16"
    assert GGUFSource(path).resident_weights()[name].dtype == mx.float16
    weights = GGUFSource(path, "float32").resident_weights()
    assert weights[name].dtype == mx.float32
    assert (
        weights["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    )  # stored F32


@pytest.mark.parametrize("outtype", ["F16", "Q8_0"])
def test_default_dtype_is_float32_without_a_gpu_else_the_files(ggufs, tmp_path, outtype):
    """MLX's CPU backend cannot multiply float16 experts; where it is all
    there is, a GGUF converts to float32 unless told otherwise."""
    from mlx_lm_odmoe.backend import expert_float_dtype, has_gpu
    from mlx_lm_odmoe.layout import load_layout

    out = convert(ggufs("qwen2_moe", outtype), tmp_path / "od", progress=False)
    want = "float16" if has_gpu() else "float32"
    assert expert_float_dtype(load_layout(out / "experts")) == want
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == want
    model, tokenizer = mlx_lm_odmoe.load(out, expert_cache="min")
    assert len(mlx_lm.generate(model, tokenizer, prompt="def f(", max_tokens=4)) > 0


K_QWEN = dict(
    TINY_QWEN2_MOE,
    hidden_size=256,
    intermediate_size=256,
    moe_intermediate_size=256,
    shared_expert_intermediate_size=256,
    num_experts=4,
    num_hidden_layers=2,
)
K_TYPES = {
    "ffn_gate_exps.weight": Q.Q4_K,
    "ffn_up_exps.weight": Q.Q5_K,
    "ffn_down_exps.weight": Q.Q6_K,
}


def _random_blocks(shape, qtype, seed):
    """Valid ``qtype`` blocks: every byte below 0x18, so each f16 scale in a
    block is small and finite."""
    block, size = GGML_QUANT_SIZES[qtype]
    n_bytes = (*shape[:-1], shape[-1] // block * size)
    return lambda: np.random.default_rng(seed).integers(0, 0x18, n_bytes, dtype=np.uint8)


def test_k_quant_experts_are_sliced_before_dequantizing(tmp_path):
    """gguf-py cannot write K-quants, so the experts are random valid Q4_K /
    Q5_K / Q6_K blocks; reading one expert's slice must equal dequantizing the
    whole stacked tensor, and the model must equal stock on those weights."""
    hf = write_hf_checkpoint(tmp_path / "hf", K_QWEN, seed=3)
    plan = plan_gguf(hf, "F32")
    for i, t in enumerate(plan.tensors):
        suffix = t.name.split(".", 2)[-1]
        if suffix in K_TYPES:
            qtype = K_TYPES[suffix]
            plan.tensors[i] = PlannedTensor(
                t.name, t.shape, qtype, _random_blocks(t.shape, qtype, i), raw=True
            )
    gguf_path = write_gguf(plan, tmp_path / "k.gguf")[0]

    whole = {
        t.name: gguf_quants.dequantize(t.data, t.tensor_type)
        for t in GGUFReader(gguf_path).tensors
        if t.tensor_type in K_TYPES.values()
    }
    src = GGUFSource(gguf_path)
    weights = hf_weights(K_QWEN, seed=3)
    for layer in range(K_QWEN["num_hidden_layers"]):
        for e in range(K_QWEN["num_experts"]):
            got = src.expert(layer, e)
            for suffix, proj in (
                ("ffn_gate_exps.weight", "gate_proj"),
                ("ffn_up_exps.weight", "up_proj"),
                ("ffn_down_exps.weight", "down_proj"),
            ):
                want = whole[f"blk.{layer}.{suffix}"][e]
                assert np.array_equal(np.array(got[f"{proj}.weight"]), want)
                weights[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = want

    write_hf_checkpoint(tmp_path / "ref", K_QWEN, weights=weights)
    reference, _ = mlx_lm.load(str(tmp_path / "ref"))
    convert(gguf_path, tmp_path / "od", dtype="float32", progress=False)
    model, _ = mlx_lm_odmoe.load(tmp_path / "od", expert_cache="min")
    assert _logits_diff(reference, model, seed=5) == 0.0


def test_split_gguf_round_trips(models, stock, tmp_path):
    plan = plan_gguf(models("kimi_k2", "hf"), "F32")
    parts = write_gguf(plan, tmp_path / "kimi.gguf", split_max_tensors=len(plan.tensors) // 2 + 1)
    assert [p.name for p in parts] == ["kimi-00001-of-00002.gguf", "kimi-00002-of-00002.gguf"]
    assert "tokenizer.ggml.tokens" not in GGUFReader(parts[1]).fields
    convert(parts[1], tmp_path / "od", dtype="float32", progress=False)  # any part names the model
    model, _ = mlx_lm_odmoe.load(tmp_path / "od", expert_cache="50%")
    assert _logits_diff(stock("kimi_k2")[0], model) == 0.0
    parts[1].unlink()
    with pytest.raises(FileNotFoundError, match="kimi-00002-of-00002.gguf"):
        convert(parts[0], tmp_path / "od2", progress=False)
    assert not (tmp_path / "od2").exists()


# --- The file matches what llama.cpp writes and expects -----------------------------

# ggml ne (innermost first), as llama.cpp's llama-model.cpp creates the tensors.
LLAMA_CPP_SHAPES = {
    "qwen2_moe": {
        "token_embd.weight": ("n_embd", "n_vocab"),
        "blk.0.attn_q.weight": ("n_embd", "n_embd"),
        "blk.0.attn_k.bias": ("n_embd_gqa",),
        "blk.0.ffn_gate_inp.weight": ("n_embd", "n_expert"),
        "blk.0.ffn_gate_exps.weight": ("n_embd", "n_ff_exp", "n_expert"),
        "blk.0.ffn_down_exps.weight": ("n_ff_exp", "n_embd", "n_expert"),
        "blk.0.ffn_gate_inp_shexp.weight": ("n_embd", 1),
        "blk.0.ffn_down_shexp.weight": ("n_ff_shexp", "n_embd"),
    },
    "kimi_k2": {
        "blk.0.ffn_gate.weight": ("n_embd", "n_ff"),
        "blk.1.attn_q_a.weight": ("n_embd", "q_lora_rank"),
        "blk.1.attn_q_b.weight": ("q_lora_rank", "n_head_x_k"),
        "blk.1.attn_kv_a_mqa.weight": ("n_embd", "kv_lora_rank_rope"),
        "blk.1.attn_k_b.weight": ("nope", "kv_lora_rank", "n_head"),
        "blk.1.attn_v_b.weight": ("kv_lora_rank", "v_head", "n_head"),
        "blk.1.ffn_gate_inp.weight": ("n_embd", "n_expert"),
        "blk.1.exp_probs_b.bias": ("n_expert",),
        "blk.1.ffn_up_exps.weight": ("n_embd", "n_ff_exp", "n_expert"),
        "blk.1.ffn_gate_shexp.weight": ("n_embd", "n_ff_exp"),
    },
}
LLAMA_CPP_KEYS = {
    "qwen2_moe": [
        "block_count",
        "context_length",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.freq_base",
        "attention.layer_norm_rms_epsilon",
        "expert_count",
        "expert_used_count",
        "expert_feed_forward_length",
        "expert_shared_feed_forward_length",
    ],
    "kimi_k2": [
        "block_count",
        "leading_dense_block_count",
        "expert_count",
        "expert_used_count",
        "expert_shared_count",
        "expert_weights_scale",
        "expert_weights_norm",
        "expert_gating_func",
        "expert_group_count",
        "expert_group_used_count",
        "attention.q_lora_rank",
        "attention.kv_lora_rank",
        "attention.key_length",
        "attention.value_length",
        "attention.key_length_mla",
        "attention.value_length_mla",
        "rope.dimension_count",
        "vocab_size",
    ],
}


def _dims(config):
    c = config
    dims = {
        "n_embd": c["hidden_size"],
        "n_vocab": c["vocab_size"],
        "n_ff": c["intermediate_size"],
        "n_ff_exp": c["moe_intermediate_size"],
        "n_expert": c.get("num_experts") or c.get("n_routed_experts"),
        "n_embd_gqa": c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"],
        "n_ff_shexp": c.get("shared_expert_intermediate_size"),
        "n_head": c["num_attention_heads"],
    }
    if "kv_lora_rank" in c:
        dims.update(
            q_lora_rank=c["q_lora_rank"],
            kv_lora_rank=c["kv_lora_rank"],
            nope=c["qk_nope_head_dim"],
            v_head=c["v_head_dim"],
            kv_lora_rank_rope=c["kv_lora_rank"] + c["qk_rope_head_dim"],
            n_head_x_k=c["num_attention_heads"] * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"]),
        )
    return dims


@pytest.mark.parametrize("kind", KINDS)
def test_exported_file_has_llama_cpp_names_shapes_and_keys(ggufs, kind):
    reader = GGUFReader(ggufs(kind, "Q8_0"))
    arch = reader.fields["general.architecture"].contents()
    assert arch == {"qwen2_moe": "qwen2moe", "kimi_k2": "deepseek2"}[kind]
    tensors = {t.name: t for t in reader.tensors}
    dims = _dims(CONFIGS[kind])
    for name, ne in LLAMA_CPP_SHAPES[kind].items():
        assert tensors[name].shape.tolist() == [dims.get(d, d) for d in ne], name
    routers = [
        t
        for t in tensors.values()
        if "ffn_gate_inp" in t.name or t.name.endswith(("_norm.weight", ".bias"))
    ]
    assert routers and all(t.tensor_type == Q.F32 for t in routers)
    assert not any(
        "attn_kv_b" in name for name in tensors
    )  # split into k_b / v_b, as llama.cpp does
    for key in LLAMA_CPP_KEYS[kind]:
        assert f"{arch}.{key}" in reader.fields, key
    for key in (
        "general.file_type",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.eos_token_id",
    ):
        assert key in reader.fields, key
    assert reader.fields["general.file_type"].contents() == 7  # LLAMA_FTYPE_MOSTLY_Q8_0


YARN = {
    "type": "yarn",
    "factor": 8.0,
    "original_max_position_embeddings": 256,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}  # Kimi K2's form


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trips_through_metadata(tmp_path, kind):
    """Every setting the model reads comes back from the GGUF metadata; Kimi
    with yarn rope scaling, whose logits then equal stock's too."""
    config = dict(CONFIGS[kind], rope_scaling=YARN) if kind == "kimi_k2" else CONFIGS[kind]
    hf = write_hf_checkpoint(tmp_path / "hf", config, seed=7)
    gguf_path = export_gguf(hf, tmp_path / "m.gguf")[0]
    got = GGUFSource(gguf_path).config
    for key, value in config.items():
        if (
            value is not None and key != "attention_bias"
        ):  # llama.cpp has no attention bias for deepseek2
            assert got[key] == value, key
    if kind == "kimi_k2":
        # Models only: transformers 5 cannot build any tokenizer (stock included)
        # next to an unknown model_type with yarn rope scaling.
        out = convert(gguf_path, tmp_path / "od", dtype="float32", progress=False)
        model, _ = load_model(out, model_config=odmoe_model_config(out, load_config(out), "min"))
        assert _logits_diff(load_model(hf)[0], model) == 0.0


def test_exporter_refuses_types_gguf_py_cannot_write(models, tmp_path):
    with pytest.raises(ValueError, match="Q4_K"):
        export_gguf(models("qwen2_moe", "hf"), tmp_path / "x.gguf", "Q4_K")
    assert not list(tmp_path.iterdir())


# --- Tokenizer -------------------------------------------------------------------------

_K2_LETTERS = (
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]",
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]",
)
PRE_TOKENIZERS = {  # tokenizer.ggml.pre -> (the split regexes of a tokenizer.json it names, ignore_merges)
    "qwen2": (
        [
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+"
        ],
        False,
    ),
    "llama-bpe": (
        [
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ],
        True,
    ),
    "deepseek-v3": (
        [
            r"\p{N}{1,3}",
            r"[一-龥぀-ゟ゠-ヿ]+",
            r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
            r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        False,
    ),
    "kimi-k2": (
        [
            "|".join(
                [  # tokenization_kimi.py
                    r"[\p{Han}]+",
                    r"[^\r\n\p{L}\p{N}]?%s*%s+(?i:'s|'t|'re|'ve|'m|'ll|'d)?" % _K2_LETTERS,
                    r"[^\r\n\p{L}\p{N}]?%s+%s*(?i:'s|'t|'re|'ve|'m|'ll|'d)?" % _K2_LETTERS,
                    r"\p{N}{1,3}",
                    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
                    r"\s*[\r\n]+",
                    r"\s+(?!\S)",
                    r"\s+",
                ]
            )
        ],
        True,
    ),
}


def _write_split_tokenizer(folder, regexes, ignore_merges):
    """Replace folder's tokenizer with a byte-level BPE splitting on ``regexes``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 30 + [json.dumps(TINY_KIMI)] * 10, trainer)
    tok.save(str(folder / "tokenizer.json"))


def _metadata_getter(path):
    fields = GGUFReader(path).fields
    return lambda key, default=None: fields[key].contents() if key in fields else default


@pytest.mark.parametrize("pre", ["gpt-2", *PRE_TOKENIZERS])
def test_tokenizer_rebuilt_from_metadata_encodes_like_the_original(tmp_path, pre):
    """What the converter writes as the tokenizer of a GGUF (transformers'
    own GGUF reader imposes the architecture's pre-tokenizer, needs torch and
    knows no deepseek2)."""
    from tokenizers import Tokenizer

    hf = write_hf_checkpoint(tmp_path / "hf", TINY_QWEN2_MOE, seed=6)
    if pre in PRE_TOKENIZERS:
        _write_split_tokenizer(hf, *PRE_TOKENIZERS[pre])
    plan = plan_gguf(hf, "F32")
    plan.tensors = []  # the tokenizer is all metadata
    get = _metadata_getter(write_gguf(plan, tmp_path / "vocab.gguf")[0])
    assert get("tokenizer.ggml.pre") == pre

    rebuilt = build_tokenizer(get)
    original = Tokenizer.from_file(str(hf / "tokenizer.json"))
    for text in TEXTS + [json.dumps(TINY_KIMI)]:
        ids = original.encode(text).ids
        assert rebuilt.encode(text, add_special_tokens=False) == ids, text
        assert rebuilt.decode(ids) == original.decode(ids, skip_special_tokens=False)
    assert rebuilt.eos_token == "<|endoftext|>"


def test_transformers_reads_the_written_tokenizer_as_the_original(ggufs, stock, tmp_path):
    GGUFSource(ggufs("qwen2_moe", "F32")).write_tokenizer(tmp_path)
    from transformers import AutoTokenizer

    rebuilt, original = AutoTokenizer.from_pretrained(str(tmp_path)), stock("qwen2_moe")[1]
    for text in TEXTS:
        assert rebuilt.encode(text, add_special_tokens=False) == original.encode(text), text


def test_the_files_chat_template_becomes_the_folders(ggufs, tmp_path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path = ggufs("kimi_k2", "Q8_0")
    template = GGUFReader(path).fields["tokenizer.chat_template"].contents()
    assert "add_generation_prompt" in template
    out = convert(path, tmp_path / "od", dtype="float32", progress=False)
    assert load_tokenizer(out).chat_template == template


# --- Errors: clear, naming the key or tensor, and no output folder ------------------------


def _drop_tensor(name):
    def edit(plan):
        plan.tensors = [t for t in plan.tensors if t.name != name]

    return edit


def _retype(name, qtype):
    def edit(plan):
        i = next(i for i, t in enumerate(plan.tensors) if t.name == name)
        t = plan.tensors[i]
        plan.tensors[i] = PlannedTensor(
            t.name, t.shape, qtype, _random_blocks(t.shape, qtype, 0), raw=True
        )

    return edit


def _set_arch(arch):
    def edit(plan):
        plan.arch = arch

    return edit


def _drop_key(key):
    def edit(plan):
        del plan.kv[key]

    return edit


BROKEN = {
    "unknown architecture": (
        "qwen2_moe",
        _set_arch("llama"),
        "general.architecture 'llama' is not supported",
    ),
    "unsupported tensor type": (
        "qwen2_moe",
        _retype("blk.1.ffn_up_exps.weight", Q.Q8_1),
        "'blk.1.ffn_up_exps.weight' is stored as Q8_1",
    ),
    "missing metadata key": (
        "qwen2_moe",
        _drop_key("qwen2moe.expert_count"),
        "'qwen2moe.expert_count' is missing",
    ),
    "missing tensor": (
        "qwen2_moe",
        _drop_tensor("blk.2.ffn_down_exps.weight"),
        "'blk.2.ffn_down_exps.weight' is missing",
    ),
    "missing split tensor": (
        "kimi_k2",
        _drop_tensor("blk.1.attn_v_b.weight"),
        "'blk.1.attn_v_b.weight' is missing",
    ),
    "softmax routing": (
        "kimi_k2",
        _drop_key("deepseek2.expert_gating_func"),
        "only sigmoid routing",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_gguf_fails_clearly_and_writes_nothing(models, tmp_path, case):
    kind, edit, message = BROKEN[case]
    plan = plan_gguf(models(kind, "hf"), "F32")
    edit(plan)
    gguf_path = write_gguf(plan, tmp_path / "broken.gguf")[0]
    with pytest.raises(ValueError, match=message):
        convert(gguf_path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def test_truncated_gguf_names_the_cut_tensor(ggufs, tmp_path, capsys):
    data = ggufs("qwen2_moe", "F32").read_bytes()
    last = GGUFReader(ggufs("qwen2_moe", "F32")).tensors[-1].name
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    assert (
        convert_main(["--gguf", str(tmp_path / "cut.gguf"), "--mlx-path", str(tmp_path / "out")])
        == 2
    )
    err = capsys.readouterr().err
    assert "truncated" in err and repr(last) in err
    (tmp_path / "header.gguf").write_bytes(data[:200])  # cut inside the metadata
    with pytest.raises(ValueError, match="header.gguf"):
        convert(tmp_path / "header.gguf", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "header.gguf"]


def test_cli_takes_exactly_one_source(tmp_path):
    for argv in ([], ["--hf-path", "a", "--gguf", "b.gguf"]):
        with pytest.raises(SystemExit) as e:
            convert_main(argv + ["--mlx-path", str(tmp_path / "o")])
        assert e.value.code == 2
    with pytest.raises(SystemExit):
        convert_main(["--gguf", str(tmp_path / "model.bin")])
    assert not (tmp_path / "o").exists()

"""llama.cpp GGUF files as a conversion source.

llama.cpp stores Qwen1.5/Qwen2 MoE as ``qwen2moe`` and DeepSeek-V3 / Kimi K2 as
``deepseek2``. ``GGUFSource`` turns the metadata back into a Hugging Face
config.json, renames tensors to Hugging Face names and dequantizes them with
gguf-py, so the rest of the converter sees the same interface as ``HFSource``.

Neither architecture's llama.cpp converter permutes weights (qwen2moe is roped
NEOX style and deepseek2 in the interleaved "norm" style, both on the Hugging
Face layout), so apart from names only two things differ: GGUF lists
dimensions innermost first (gguf-py's reader hands us numpy order), and
llama.cpp splits DeepSeek's ``kv_b_proj`` into a transposed per-head
``attn_k_b`` and ``attn_v_b``, which are joined back here.

Routed experts are stacked per layer. The reader memory-maps the file, so one
expert is read by slicing its raw blocks out of the stacked tensor before
dequantizing: memory stays bounded by a single expert.
"""

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, TokenType
from gguf import quants as gguf_quants

logger = logging.getLogger(__name__)

QType = GGMLQuantizationType
REQUIRED = object()
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFError(ValueError):
    """A GGUF file this converter cannot read; the message names the file and
    the metadata key or tensor at fault."""


# --- Architecture knowledge, as tables ---------------------------------------


@dataclass(frozen=True)
class Key:
    """One ``{arch}.<gguf>`` metadata key and the config.json key it holds."""

    gguf: str
    hf: str
    vtype: GGUFValueType
    default: Any = REQUIRED
    values: Optional[Dict[str, int]] = None  # Hugging Face value -> GGUF enum
    zero_is_none: bool = False  # llama.cpp writes 0 where Hugging Face has null

    def to_hf(self, value):
        if self.values is not None:
            names = {v: k for k, v in self.values.items()}
            if value not in names:
                raise ValueError(f"unknown value {value!r} (known: {names})")
            return names[value]
        if self.zero_is_none and not value:
            return None
        return _clean_float(value) if self.vtype == GGUFValueType.FLOAT32 else value

    def to_gguf(self, value):
        return self.values[value] if self.values is not None else value


@dataclass(frozen=True)
class Tensor:
    """A per-layer tensor: ``blk.N.<gguf>`` is ``model.layers.N.<hf>``.

    ``need`` says when a layer must have it (see ``_NEEDS``). ``parts`` names
    the tensors llama.cpp splits it into; a file may hold either form."""

    gguf: str
    hf: str
    need: str = "always"
    parts: Tuple[str, ...] = ()


_NEEDS: Dict[str, Callable[[dict, bool], bool]] = {
    "always": lambda cfg, moe: True,
    "moe": lambda cfg, moe: moe,
    "dense": lambda cfg, moe: not moe,
    "q_lora": lambda cfg, moe: bool(cfg.get("q_lora_rank")),
    "no_q_lora": lambda cfg, moe: not cfg.get("q_lora_rank"),
}

U32, F32, BOOL = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL

# llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE values.
GATING_FUNCS = {"softmax": 1, "sigmoid": 2}

_COMMON_KEYS = (
    Key("block_count", "num_hidden_layers", U32),
    Key("context_length", "max_position_embeddings", U32, 4096),
    Key("embedding_length", "hidden_size", U32),
    Key("feed_forward_length", "intermediate_size", U32),
    Key("attention.head_count", "num_attention_heads", U32),
    Key("rope.freq_base", "rope_theta", F32, 10000.0),
    Key("attention.layer_norm_rms_epsilon", "rms_norm_eps", F32),
    Key("expert_used_count", "num_experts_per_tok", U32),
    Key("expert_feed_forward_length", "moe_intermediate_size", U32),
)

# Tensors outside the layers (``output`` is absent when tied to the embedding).
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Routed experts, stacked [E, out, in] in GGUF, one tensor per expert in HF.
EXPERT_TENSORS = {
    "ffn_gate_exps.weight": "gate_proj.weight",
    "ffn_up_exps.weight": "up_proj.weight",
    "ffn_down_exps.weight": "down_proj.weight",
}
# Present in some files, read by nothing we convert to.
_IGNORED_TENSORS = {"rope_freqs.weight"}

_NORMS = (
    Tensor("attn_norm.weight", "input_layernorm.weight"),
    Tensor("ffn_norm.weight", "post_attention_layernorm.weight"),
)

_QWEN2MOE_TENSORS = _NORMS + (
    Tensor("attn_q.weight", "self_attn.q_proj.weight"),
    Tensor("attn_q.bias", "self_attn.q_proj.bias"),
    Tensor("attn_k.weight", "self_attn.k_proj.weight"),
    Tensor("attn_k.bias", "self_attn.k_proj.bias"),
    Tensor("attn_v.weight", "self_attn.v_proj.weight"),
    Tensor("attn_v.bias", "self_attn.v_proj.bias"),
    Tensor("attn_output.weight", "self_attn.o_proj.weight"),
    Tensor("ffn_gate_inp.weight", "mlp.gate.weight"),
    Tensor("ffn_gate_inp_shexp.weight", "mlp.shared_expert_gate.weight"),
    Tensor("ffn_gate_shexp.weight", "mlp.shared_expert.gate_proj.weight"),
    Tensor("ffn_up_shexp.weight", "mlp.shared_expert.up_proj.weight"),
    Tensor("ffn_down_shexp.weight", "mlp.shared_expert.down_proj.weight"),
)

_DEEPSEEK2_TENSORS = _NORMS + (
    Tensor("attn_q.weight", "self_attn.q_proj.weight", "no_q_lora"),
    Tensor("attn_q_a.weight", "self_attn.q_a_proj.weight", "q_lora"),
    Tensor("attn_q_a_norm.weight", "self_attn.q_a_layernorm.weight", "q_lora"),
    Tensor("attn_q_b.weight", "self_attn.q_b_proj.weight", "q_lora"),
    Tensor("attn_kv_a_mqa.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    Tensor("attn_kv_a_norm.weight", "self_attn.kv_a_layernorm.weight"),
    Tensor(
        "attn_kv_b.weight",
        "self_attn.kv_b_proj.weight",
        parts=("attn_k_b.weight", "attn_v_b.weight"),
    ),
    Tensor("attn_output.weight", "self_attn.o_proj.weight"),
    Tensor("ffn_gate.weight", "mlp.gate_proj.weight", "dense"),
    Tensor("ffn_up.weight", "mlp.up_proj.weight", "dense"),
    Tensor("ffn_down.weight", "mlp.down_proj.weight", "dense"),
    Tensor("ffn_gate_inp.weight", "mlp.gate.weight", "moe"),
    Tensor("exp_probs_b.bias", "mlp.gate.e_score_correction_bias", "moe"),
    Tensor("ffn_gate_shexp.weight", "mlp.shared_experts.gate_proj.weight", "moe"),
    Tensor("ffn_up_shexp.weight", "mlp.shared_experts.up_proj.weight", "moe"),
    Tensor("ffn_down_shexp.weight", "mlp.shared_experts.down_proj.weight", "moe"),
)


def _join_kv_b(config: dict, k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """attn_k_b [H, kv_lora_rank, nope] and attn_v_b [H, v, kv_lora_rank] ->
    kv_b_proj [H * (nope + v), kv_lora_rank]."""
    kv_b = np.concatenate([k_b.swapaxes(-1, -2), v_b], axis=1)
    return kv_b.reshape(-1, kv_b.shape[-1])


def _split_kv_b(config: dict, kv_b: np.ndarray):
    """The inverse of ``_join_kv_b`` (llama.cpp's converter does this)."""
    nope = config["qk_nope_head_dim"]
    kv_b = kv_b.reshape(config["num_attention_heads"], nope + config["v_head_dim"], -1)
    return np.ascontiguousarray(kv_b[:, :nope].swapaxes(-1, -2)), np.ascontiguousarray(
        kv_b[:, nope:]
    )


def _qwen2moe_derived(get: Callable, config: dict) -> dict:
    # llama.cpp never renormalizes qwen2moe's top-k (nor does mlx-lm).
    return {"norm_topk_prob": False}


def _deepseek2_derived(get: Callable, config: dict) -> dict:
    """MLA head sizes and fixed routing facts; llama.cpp writes the heads as
    MQA (head_count_kv 1) with key/value lengths of the compressed cache."""
    rope = config["qk_rope_head_dim"]
    if get("attention.key_length_mla", None) is not None:
        k_head, v_head = get("attention.key_length_mla"), get("attention.value_length_mla")
    else:  # files from before the MLA key lengths: plain per-head sizes
        k_head, v_head = get("attention.key_length"), get("attention.value_length")
    if config["scoring_func"] != "sigmoid":
        raise ValueError(
            f"expert_gating_func is {config['scoring_func']}: only sigmoid routing "
            "(DeepSeek-V3, Kimi K2) is supported, not DeepSeek-V2's softmax"
        )
    return {
        "qk_nope_head_dim": k_head - rope,
        "v_head_dim": v_head,
        "num_key_value_heads": config["num_attention_heads"],
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
    }


def _deepseek2_export(config: dict) -> list:
    kv_lora, rope = config["kv_lora_rank"], config["qk_rope_head_dim"]
    return [
        ("attention.head_count_kv", 1, U32),
        ("attention.key_length", kv_lora + rope, U32),
        ("attention.value_length", kv_lora, U32),
        ("attention.key_length_mla", config["qk_nope_head_dim"] + rope, U32),
        ("attention.value_length_mla", config["v_head_dim"], U32),
        ("vocab_size", config["vocab_size"], U32),
    ]


@dataclass(frozen=True)
class Arch:
    name: str  # llama.cpp's general.architecture
    model_type: str  # the Hugging Face config's
    architectures: Tuple[str, ...]
    keys: Tuple[Key, ...]
    tensors: Tuple[Tensor, ...]
    joins: Dict[str, Tuple[Callable, Callable]]  # fused GGUF name -> (join, split)
    derived: Callable[[Callable, dict], dict]
    export_keys: Callable[[dict], list]
    first_moe_layer: Optional[str] = None  # config key; None: every layer is MoE


ARCHS = {
    "qwen2moe": Arch(
        "qwen2moe",
        "qwen2_moe",
        ("Qwen2MoeForCausalLM",),
        _COMMON_KEYS
        + (
            Key("attention.head_count_kv", "num_key_value_heads", U32),
            Key("expert_count", "num_experts", U32),
            Key("expert_shared_feed_forward_length", "shared_expert_intermediate_size", U32),
        ),
        _QWEN2MOE_TENSORS,
        {},
        _qwen2moe_derived,
        lambda config: [],
    ),
    "deepseek2": Arch(
        "deepseek2",
        "kimi_k2",
        ("DeepseekV3ForCausalLM",),
        _COMMON_KEYS
        + (
            Key("expert_count", "n_routed_experts", U32),
            Key("leading_dense_block_count", "first_k_dense_replace", U32, 0),
            Key("expert_shared_count", "n_shared_experts", U32, None, zero_is_none=True),
            Key("expert_weights_scale", "routed_scaling_factor", F32, 1.0),
            Key("expert_weights_norm", "norm_topk_prob", BOOL, False),
            Key("expert_gating_func", "scoring_func", U32, "softmax", values=GATING_FUNCS),
            Key("expert_group_count", "n_group", U32, 1),
            Key("expert_group_used_count", "topk_group", U32, 1),
            Key("attention.q_lora_rank", "q_lora_rank", U32, None, zero_is_none=True),
            Key("attention.kv_lora_rank", "kv_lora_rank", U32),
            Key("rope.dimension_count", "qk_rope_head_dim", U32),
        ),
        _DEEPSEEK2_TENSORS,
        {"attn_kv_b.weight": (_join_kv_b, _split_kv_b)},
        _deepseek2_derived,
        _deepseek2_export,
        first_moe_layer="first_k_dense_replace",
    ),
}
# Hugging Face model types each llama.cpp architecture is written from.
HF_TO_ARCH = {
    "qwen2_moe": "qwen2moe",
    "deepseek_v3": "deepseek2",
    "kimi_k2": "deepseek2",
    "kimi_k25": "deepseek2",
}

# Hugging Face tensors llama.cpp stores in another shape.
_HF_SHAPES = {"mlp.shared_expert_gate.weight": lambda a: a.reshape(1, -1)}


def is_moe_layer(arch: Arch, config: dict, layer: int) -> bool:
    return arch.first_moe_layer is None or layer >= config.get(arch.first_moe_layer, 0)


def _clean_float(x: float) -> float:
    # GGUF stores float32: 1e-6 reads back as 9.99999997e-07; keep the short form.
    return float(str(np.float32(x)))


# --- Rope scaling, both ways -----------------------------------------------------


def rope_scaling_from_gguf(get: Callable, arch: str) -> Optional[dict]:
    kind = get("rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = _clean_float(get("rope.scaling.factor"))
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind != "yarn":
        raise ValueError(f"{arch}.rope.scaling.type {kind!r} is not supported (none, linear, yarn)")
    out = {
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": get("rope.scaling.original_context_length"),
    }
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if get(f"rope.scaling.{key}", None) is not None:
            out[name] = _clean_float(get(f"rope.scaling.{key}"))
    log_mul = get("rope.scaling.yarn_log_multiplier", None)
    if log_mul:
        # llama.cpp stores 0.1 * mscale_all_dim; DeepSeek-V3 and Kimi K2 have mscale == mscale_all_dim.
        out["mscale_all_dim"] = out["mscale"] = round(log_mul / 0.1, 6)
    return out


def rope_scaling_to_gguf(scaling: Optional[dict], arch: str) -> list:
    if not scaling:
        return []
    kind = scaling.get("rope_type", scaling.get("type"))
    S = GGUFValueType.STRING
    if kind == "linear":
        return [("rope.scaling.type", "linear", S), ("rope.scaling.factor", scaling["factor"], F32)]
    if kind != "yarn":
        raise ValueError(f"rope_scaling type {kind!r} cannot be written to GGUF (linear, yarn)")
    out = [
        ("rope.scaling.type", "yarn", S),
        ("rope.scaling.factor", scaling["factor"], F32),
        ("rope.scaling.original_context_length", scaling["original_max_position_embeddings"], U32),
    ]
    for name, key in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
        if name in scaling:
            out.append((f"rope.scaling.{key}", scaling[name], F32))
    if arch == "deepseek2" and scaling.get("mscale_all_dim"):
        out.append(("rope.scaling.yarn_log_multiplier", 0.1 * scaling["mscale_all_dim"], F32))
    return out


# --- Reading files -------------------------------------------------------------


class _Reader(GGUFReader):
    """gguf-py's reader, with a truncated file or an unknown type reported by
    tensor name (the stock reader fails on a bare numpy reshape)."""

    def _build_tensors(self, start_offs, fields):
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            name = bytes(name).decode("utf-8", "replace")
            try:
                qtype = QType(int(raw_type[0]))
            except ValueError:
                raise GGUFError(
                    f"tensor {name!r} has ggml type id {int(raw_type[0])}, unknown to gguf-py"
                ) from None
            block, size = GGML_QUANT_SIZES[qtype]
            end = start_offs + int(offset[0]) + int(np.prod(dims.astype(np.int64))) * size // block
            if end > len(self.data):
                raise GGUFError(
                    f"tensor {name!r} ends at byte {end} but the file has {len(self.data)}: the file is truncated"
                )
        super()._build_tensors(start_offs, fields)


def _open_reader(path: Path) -> GGUFReader:
    try:
        return _Reader(path)
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    except (ValueError, IndexError, OSError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file, truncated or corrupt? ({e})") from e


def split_parts(path: Path) -> list:
    """All files of a GGUF: ``path`` itself, or every ``NAME-0000i-of-0000N.gguf``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if path.suffix != ".gguf":
        raise GGUFError(f"{path}: expected a .gguf file")
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    parts = [
        path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    ]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: split GGUF part(s) {missing} not found next to it")
    return parts


@functools.lru_cache(maxsize=None)
def dequantizable() -> frozenset:
    """The ggml types gguf-py can turn into floats (probed, not hard-coded)."""
    ok = set()
    for qtype in QType:
        block, size = GGML_QUANT_SIZES.get(qtype, (0, 0))
        if not size:
            continue
        try:
            gguf_quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
        except (NotImplementedError, ValueError, TypeError):
            continue
        ok.add(qtype)
    return frozenset(ok)


FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
_MX_FLOATS = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def native_dtype(qtype: QType):
    """F16 and BF16 stay as they are; every other type becomes float32."""
    return {QType.F16: mx.float16, QType.BF16: mx.bfloat16}.get(qtype, mx.float32)


def to_mx(data: np.ndarray, qtype: QType) -> mx.array:
    """A (slice of a) GGUF tensor as an mlx array of ``native_dtype``,
    dequantized by gguf-py."""
    data = np.asarray(data)
    if qtype == QType.F16:
        return mx.array(data)
    if qtype == QType.BF16:
        return mx.array(np.ascontiguousarray(data).view(np.uint16)).view(mx.bfloat16)
    return mx.array(gguf_quants.dequantize(data, qtype))


def _numpy_shape(t) -> tuple:
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def _default_dtype(tensors) -> str:
    """The float type a converted folder defaults to: the file's, or float16
    for quantized files (their dequantized values round well within it)."""
    types = {t.tensor_type for t in tensors.values() if len(t.shape) > 1}
    if types <= {QType.F32}:
        return "float32"
    if QType.BF16 in types and types <= {QType.F32, QType.BF16}:
        return "bfloat16"
    return "float16"


class GGUFSource:
    """A llama.cpp GGUF (single file or split parts) of a ``qwen2moe`` or
    ``deepseek2`` model, seen as a Hugging Face checkpoint."""

    def __init__(self, path, dtype: Optional[str] = None):
        self.path = Path(path)
        self.parts = split_parts(self.path)
        readers = [_open_reader(p) for p in self.parts]
        self.fields = readers[0].fields
        arch_name = self.value("general.architecture")
        if arch_name not in ARCHS:
            raise GGUFError(
                f"{self.path}: general.architecture {arch_name!r} is not supported; "
                f"expected one of {sorted(ARCHS)}"
            )
        self.arch = ARCHS[arch_name]
        self.tensors = self._index(readers)
        self.config = self._config()
        self.quantization = None
        self._resident, self._experts = self._plan()
        # The converter casts resident weights to this type anyway; doing it as
        # each is dequantized keeps a quantized file from filling memory as float32.
        self._dequantized_dtype = _MX_FLOATS.get(dtype or self.config["torch_dtype"], mx.float32)

    # metadata

    def value(self, key: str, default=REQUIRED):
        field = self.fields.get(key)
        if field is None:
            if default is REQUIRED:
                raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return field.contents()

    def _arch_value(self, key: str, default=REQUIRED):
        return self.value(f"{self.arch.name}.{key}", default)

    def _config(self) -> dict:
        arch = self.arch
        config = {"architectures": list(arch.architectures), "model_type": arch.model_type}
        for key in arch.keys:
            name = f"{arch.name}.{key.gguf}"
            if name not in self.fields:
                if key.default is REQUIRED:
                    raise GGUFError(
                        f"{self.path}: metadata key {name!r} is missing (it gives {key.hf})"
                    )
                config[key.hf] = key.default
                continue
            try:
                config[key.hf] = key.to_hf(self.value(name))
            except ValueError as e:
                raise GGUFError(f"{self.path}: metadata key {name!r}: {e}") from None
        try:
            config.update(arch.derived(self._arch_value, config))
            scaling = rope_scaling_from_gguf(self._arch_value, arch.name)
        except GGUFError:
            raise
        except ValueError as e:
            raise GGUFError(f"{self.path}: {e}") from None
        if scaling:
            config["rope_scaling"] = scaling
        embed = self._tensor("token_embd.weight")
        config["vocab_size"] = _numpy_shape(embed)[0]
        config["tie_word_embeddings"] = False  # a missing output.weight is aliased to the embedding
        for key in ("bos_token_id", "eos_token_id"):
            if f"tokenizer.ggml.{key}" in self.fields:
                config[key] = self.value(f"tokenizer.ggml.{key}")
        config["torch_dtype"] = _default_dtype(self.tensors)
        return config

    # tensors

    def _index(self, readers) -> dict:
        tensors = {}
        for path, reader in zip(self.parts, readers):
            for t in reader.tensors:
                if t.name in tensors:
                    raise GGUFError(f"{path}: tensor {t.name!r} appears in more than one part")
                tensors[t.name] = t
        for t in tensors.values():
            if t.tensor_type not in dequantizable():
                raise GGUFError(
                    f"{self.path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which gguf-py "
                    f"cannot dequantize (supported: {sorted(q.name for q in dequantizable())})"
                )
        return tensors

    def _tensor(self, name: str):
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: tensor {name!r} is missing")
        return self.tensors[name]

    def _plan(self):
        """HF name -> (GGUF tensor names, join or None), checking that every
        tensor the config needs is there and every tensor present is known."""
        cfg, arch = self.config, self.arch
        self._tensor("output_norm.weight")
        resident = {hf: ((g,), None) for g, hf in GLOBAL_TENSORS.items() if g in self.tensors}
        resident.setdefault("lm_head.weight", (("token_embd.weight",), None))
        experts, used = {}, set(GLOBAL_TENSORS) | _IGNORED_TENSORS
        for layer in range(cfg["num_hidden_layers"]):
            moe = is_moe_layer(arch, cfg, layer)
            blk, hf = f"blk.{layer}.", f"model.layers.{layer}."
            for t in arch.tensors:
                source = self._layer_source(blk, t, _NEEDS[t.need](cfg, moe))
                if source:
                    resident[hf + t.hf] = source
                    used.update(source[0])
            if moe:
                experts[layer] = {
                    hf_name: self._expert_tensor(blk + g) for g, hf_name in EXPERT_TENSORS.items()
                }
                used.update(blk + g for g in EXPERT_TENSORS)
        n = cfg["num_hidden_layers"]
        unknown = [name for name in self.tensors if name not in used and not _beyond(name, n)]
        if unknown:
            raise GGUFError(
                f"{self.path}: tensor {unknown[0]!r} has no Hugging Face name for {arch.name}"
            )
        return resident, experts

    def _layer_source(self, blk: str, t: Tensor, needed: bool):
        """Where one layer tensor comes from: itself, or the parts llama.cpp
        split it into (joined on read); None if absent and not needed."""
        if blk + t.gguf in self.tensors:
            return (blk + t.gguf,), None
        parts = tuple(blk + p for p in t.parts)
        if parts and all(p in self.tensors for p in parts):
            return parts, self.arch.joins[t.gguf][0]
        if needed:
            self._tensor(next((p for p in parts if p not in self.tensors), blk + t.gguf))
        return None

    def _expert_tensor(self, name: str):
        t = self._tensor(name)
        cfg = self.config
        E, H, I = (
            cfg.get("num_experts") or cfg["n_routed_experts"],
            cfg["hidden_size"],
            cfg["moe_intermediate_size"],
        )
        want = (E, H, I) if "down" in name else (E, I, H)
        if _numpy_shape(t) != want:
            raise GGUFError(
                f"{self.path}: tensor {name!r} has shape {_numpy_shape(t)}, expected {want}"
            )
        return t

    def _read(self, hf: str, names: tuple, join) -> mx.array:
        tensors = [self.tensors[n] for n in names]
        if join is None:
            arr = to_mx(tensors[0].data, tensors[0].tensor_type)
        else:
            parts = [np.array(to_mx(t.data, t.tensor_type).astype(mx.float32)) for t in tensors]
            dtypes = {native_dtype(t.tensor_type) for t in tensors}
            arr = mx.array(join(self.config, *parts)).astype(
                dtypes.pop() if len(dtypes) == 1 else mx.float32
            )
        if any(t.tensor_type not in FLOAT_TYPES for t in tensors):
            arr = arr.astype(self._dequantized_dtype)
            mx.eval(arr)
        for suffix, reshape in _HF_SHAPES.items():
            if hf.endswith(suffix):
                arr = reshape(arr)
        return arr

    def resident_weights(self) -> Dict[str, mx.array]:
        return {hf: self._read(hf, *source) for hf, source in self._resident.items()}

    def expert(self, layer: int, expert: int) -> Dict[str, mx.array]:
        # Slicing the memory-mapped raw blocks reads only this expert's bytes.
        return {hf: to_mx(t.data[expert], t.tensor_type) for hf, t in self._experts[layer].items()}

    # tokenizer

    def write_tokenizer(self, out: Path):
        """Write tokenizer.json (+ tokenizer_config.json, chat template) to
        ``out``: rebuilt from the metadata, whose ``tokenizer.ggml.pre`` names
        the pre-tokenizer (transformers' GGUF reader, tried where the rebuild
        cannot be made, imposes the architecture's own instead)."""
        try:
            tokenizer = build_tokenizer(self.value)
        except GGUFError as e:
            logger.info("%s: %s; reading the tokenizer with transformers", self.path, e)
            tokenizer = _transformers_tokenizer(self.parts[0])
        template = self.value("tokenizer.chat_template", None)
        if template and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = template
        tokenizer.model_max_length = self.config["max_position_embeddings"]
        tokenizer.save_pretrained(str(out))


def _beyond(name: str, n_layers: int) -> bool:
    # Multi-token-prediction blocks come after the model's own layers.
    m = re.match(r"^blk\.(\d+)\.", name)
    return bool(m) and int(m.group(1)) >= n_layers


def _transformers_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# --- Building a tokenizer from tokenizer.ggml.* --------------------------------

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_UPPER, _LOWER = (
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]",
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]",
)
_KIMI_K2_SPLIT = "|".join(
    [  # tokenization_kimi.py's pat_str
        r"[\p{Han}]+",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# tokenizer.ggml.pre -> (the regexes text is split with, in order; whether a
# whole word found in the vocabulary skips the merges, as tiktoken does).
PRE_TOKENIZERS = {
    "gpt-2": ((_GPT2_SPLIT,), False),
    "qwen2": ((_QWEN2_SPLIT,), False),
    "deepseek-r1-qwen": ((_QWEN2_SPLIT,), False),
    "llama-bpe": ((_LLAMA3_SPLIT,), True),
    "deepseek-v3": (_DEEPSEEK3_SPLITS, False),
    "kimi-k2": ((_KIMI_K2_SPLIT,), True),
}


def build_tokenizer(get: Callable):
    """A byte-level BPE ``PreTrainedTokenizerFast`` from llama.cpp's
    ``tokenizer.ggml.*`` keys (``get(key, default)`` reads one)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    kind = get("tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise GGUFError(
            f"tokenizer.ggml.model {kind!r}: only byte-level BPE ('gpt2') can be rebuilt"
        )
    pre = get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"tokenizer.ggml.pre {pre!r} is not known (known: {sorted(PRE_TOKENIZERS)})"
        )
    splits, ignore_merges = PRE_TOKENIZERS[pre]
    tokens = get("tokenizer.ggml.tokens")
    types = get("tokenizer.ggml.token_type", None) or [TokenType.NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]

    # UNUSED entries are llama.cpp's padding up to the model's vocab_size ("[PAD123]"), not tokens.
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != TokenType.UNUSED}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # llama.cpp matches control and user-defined tokens whole, before BPE.
    tok.add_tokens(
        [
            AddedToken(t, special=ty == TokenType.CONTROL, normalized=False)
            for t, ty in zip(tokens, types)
            if ty in (TokenType.CONTROL, TokenType.USER_DEFINED)
        ]
    )

    special = {
        name: tokens[get(f"tokenizer.ggml.{key}")]
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
        if get(f"tokenizer.ggml.{key}", None) is not None
    }
    add_bos = get("tokenizer.ggml.add_bos_token", False) and "bos_token" in special
    add_eos = get("tokenizer.ggml.add_eos_token", False) and "eos_token" in special
    if add_bos or add_eos:
        bos = [special["bos_token"]] if add_bos else []
        eos = [special["eos_token"]] if add_eos else []
        single = " ".join(bos + ["$A"] + eos)
        tok.post_processor = processors.TemplateProcessing(
            single=single,
            pair=f"{single} " + " ".join(bos + ["$B:1"] + eos),
            special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(bos + eos)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, **special
    )

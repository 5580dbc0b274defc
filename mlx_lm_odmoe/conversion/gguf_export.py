"""Write a Hugging Face MoE checkpoint as a llama.cpp GGUF.

Follows llama.cpp's convert_hf_to_gguf.py for ``qwen2moe`` and ``deepseek2``:
the same metadata keys, tensor names and shapes, experts stacked per layer,
DeepSeek's ``kv_b_proj`` split into ``attn_k_b``/``attn_v_b``, and the same
per-tensor types (1-D tensors, norms, biases and routers stay F32; rows gguf-py
cannot quantize fall back to F16). The name and key tables are
``gguf_source``'s, read the other way.

Writing is planned first (names, shapes, types, sizes), then each tensor is
produced and quantized just before it is written, so memory stays bounded by
one layer's stacked experts. Usage::

    python -m mlx_lm_odmoe.conversion.gguf_export ./hf-model ./model-Q8_0.gguf --outtype Q8_0
"""

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFValue,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    SpecialVocab,
    TokenType,
)
from gguf import quants as gguf_quants

from mlx_lm_odmoe.models.common import strip_experts

from .gguf_source import (
    ARCHS,
    EXPERT_TENSORS,
    FLOAT_TYPES,
    GLOBAL_TENSORS,
    HF_TO_ARCH,
    PRE_TOKENIZERS,
    REQUIRED,
    Arch,
    is_moe_layer,
    rope_scaling_to_gguf,
)
from .sources import HFSource, text_config

QType = GGMLQuantizationType
# What gguf-py can quantize that llama.cpp's converter offers as --outtype.
OUTTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# Routers stay F32, as in llama.cpp (quantizing them changes which experts run).
_F32_TENSORS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


@dataclass
class PlannedTensor:
    """One tensor to write: ``make()`` gives float32 values in numpy order
    (or, with ``raw``, bytes already encoded as ``qtype``)."""

    name: str
    shape: tuple
    qtype: QType
    make: Callable[[], np.ndarray]
    raw: bool = False

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size

    def data(self) -> np.ndarray:
        data = self.make()
        return data if self.raw else gguf_quants.quantize(data, self.qtype)


@dataclass
class GGUFPlan:
    arch: str
    kv: Dict[str, GGUFValue]
    tensors: List[PlannedTensor]


def tensor_type(name: str, shape: tuple, outtype: QType) -> QType:
    """llama.cpp's choice for one tensor of a file of type ``outtype``."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return QType.F32
    if name.endswith(_F32_TENSORS):
        return QType.F32
    if outtype not in FLOAT_TYPES and shape[-1] % GGML_QUANT_SIZES[outtype][0]:
        return QType.F16
    return outtype


def file_type(outtype: QType) -> LlamaFileType:
    return (
        LlamaFileType.ALL_F32 if outtype == QType.F32 else LlamaFileType[f"MOSTLY_{outtype.name}"]
    )


# --- Metadata ------------------------------------------------------------------


def _arch_for(config: dict) -> Arch:
    model_type = config.get("model_type")
    if model_type not in HF_TO_ARCH:
        raise ValueError(
            f"model_type {model_type!r} has no llama.cpp architecture here; "
            f"expected one of {sorted(HF_TO_ARCH)}"
        )
    return ARCHS[HF_TO_ARCH[model_type]]


def _model_kv(w: GGUFWriter, arch: Arch, config: dict):
    for key in arch.keys:
        value = config.get(key.hf)
        if value is None:
            if key.default is REQUIRED:
                raise ValueError(f"config.json lacks {key.hf!r} (GGUF key {arch.name}.{key.gguf})")
            continue
        if key.vtype == GGUFValueType.BOOL and not value:
            continue  # llama.cpp writes these flags only when set
        w.add_key_value(f"{arch.name}.{key.gguf}", key.to_gguf(value), key.vtype)
    extra = arch.export_keys(config) + rope_scaling_to_gguf(config.get("rope_scaling"), arch.name)
    for key, value, vtype in extra:
        w.add_key_value(f"{arch.name}.{key}", value, vtype)


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or (
        token.startswith("<｜") and token.endswith("｜>")
    )


def _pre_tokenizer_name(hf_path: Path) -> str:
    """tokenizer.ggml.pre for a byte-level tokenizer.json. llama.cpp hashes
    the encoding of a probe text; we compare the split regexes instead."""
    pre = json.loads((hf_path / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = tuple(p.get("pattern", {}).get("Regex") for p in steps if p.get("type") == "Split")
    for name, (regexes, _) in PRE_TOKENIZERS.items():
        if splits == regexes:
            return name
    raise ValueError(
        f"{hf_path / 'tokenizer.json'}: pre-tokenizer {pre.get('type')!r} with splits {splits} "
        f"matches none of {sorted(PRE_TOKENIZERS)}"
    )


def _vocab_kv(w: GGUFWriter, hf_path: Path, vocab_size: int):
    """tokenizer.ggml.* as llama.cpp's _set_vocab_gpt2 writes them (it reads
    the same vocabulary through transformers, which needs a config it knows)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_path / "tokenizer.json"))
    reverse = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    if max(reverse) >= vocab_size:
        raise ValueError(
            f"{hf_path}: tokenizer id {max(reverse)} is beyond vocab_size {vocab_size}"
        )
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(token)
        if i not in added:
            types.append(TokenType.NORMAL)
        elif added[i].special or _looks_special(token):
            types.append(TokenType.CONTROL)
        else:
            types.append(TokenType.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(hf_path))
    w.add_token_list(tokens)
    w.add_token_types(types)
    SpecialVocab(hf_path, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _metadata(
    hf_path: Path, arch: Arch, config: dict, outtype: QType, name: str
) -> Dict[str, GGUFValue]:
    w = GGUFWriter(None, arch.name)  # collects key/values only
    w.add_type("model")
    w.add_name(name)
    _model_kv(w, arch, config)
    w.add_file_type(file_type(outtype))
    w.add_quantization_version(GGML_QUANT_VERSION)
    _vocab_kv(w, hf_path, config["vocab_size"])
    return dict(w.kv_data[0])


# --- Tensors ---------------------------------------------------------------------


def _as_numpy(arr: mx.array) -> np.ndarray:
    return np.array(arr.astype(mx.float32))


def _resident_tensors(
    arch: Arch, config: dict, weights: dict, outtype: QType
) -> List[PlannedTensor]:
    """Non-expert tensors under their llama.cpp names."""
    n_layers = config["num_hidden_layers"]
    layer_names = {t.hf: t for t in arch.tensors}
    global_names = {hf: g for g, hf in GLOBAL_TENSORS.items()}
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    out = []
    for key, value in weights.items():
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", key)
        if key.endswith("rotary_emb.inv_freq") or (m and int(m.group(1)) >= n_layers):
            continue  # unused, or multi-token-prediction layers llama.cpp leaves out
        if key in global_names:
            out.append(
                _planned(global_names[key], value.shape, outtype, lambda v=value: _as_numpy(v))
            )
        elif m and m.group(2) in layer_names:
            out += _layer_tensor(
                arch, config, f"blk.{m.group(1)}.", layer_names[m.group(2)], value, outtype
            )
        else:
            raise ValueError(f"tensor {key!r} has no llama.cpp name for {arch.name}")
    return out


def _layer_tensor(
    arch: Arch, config: dict, blk: str, t, value, outtype: QType
) -> List[PlannedTensor]:
    if not t.parts:
        return [_planned(blk + t.gguf, value.shape, outtype, lambda: _as_numpy(value))]
    split = arch.joins[t.gguf][1]  # DeepSeek's kv_b_proj -> attn_k_b, attn_v_b
    shapes = [part.shape for part in split(config, np.empty(value.shape, np.float32))]
    return [
        _planned(blk + name, shape, outtype, lambda i=i: split(config, _as_numpy(value))[i])
        for i, (name, shape) in enumerate(zip(t.parts, shapes))
    ]


def _name_order(arch: Arch, n_layers: int) -> dict:
    """Tensor name -> position: embedding, each layer's tensors then its
    experts, final norm, output (llama.cpp's order is the checkpoint's)."""
    names = ["token_embd.weight"]
    for layer in range(n_layers):
        for t in arch.tensors:
            names += [f"blk.{layer}.{g}" for g in (t.parts or (t.gguf,))]
        names += [f"blk.{layer}.{g}" for g in EXPERT_TENSORS]
    names += ["output_norm.weight", "output.weight"]
    return {name: i for i, name in enumerate(names)}


def _planned(name: str, shape, outtype: QType, make) -> PlannedTensor:
    shape = tuple(int(d) for d in shape)
    return PlannedTensor(name, shape, tensor_type(name, shape, outtype), make)


def _expert_tensors(arch: Arch, config: dict, src: HFSource, outtype: QType) -> List[PlannedTensor]:
    """Each MoE layer's experts, stacked [E, out, in] as llama.cpp does."""
    E = config.get("num_experts") or config["n_routed_experts"]
    out = []
    for layer in range(config["num_hidden_layers"]):
        if not is_moe_layer(arch, config, layer):
            continue
        first = src.expert(layer, 0)
        out += [
            _planned(
                f"blk.{layer}.{g}",
                (E, *first[hf].shape),
                outtype,
                lambda layer=layer, hf=hf: np.stack(
                    [_as_numpy(src.expert(layer, e)[hf]) for e in range(E)]
                ),
            )
            for g, hf in EXPERT_TENSORS.items()
        ]
    return out


def plan_gguf(hf_path, outtype: str = "F32", name: Optional[str] = None) -> GGUFPlan:
    """What ``write_gguf`` writes for the Hugging Face checkpoint ``hf_path``.
    Tensors are not read until written."""
    outtype = outtype.upper()
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype {outtype!r}: gguf-py can write {OUTTYPES}")
    qtype = QType[outtype]
    hf_path = Path(hf_path)
    src = HFSource(hf_path)
    config = text_config(src.config)
    arch = _arch_for(config)
    kv = _metadata(hf_path, arch, config, qtype, name or hf_path.name)
    tensors = _resident_tensors(arch, config, strip_experts(src.resident_weights()), qtype)
    tensors += _expert_tensors(arch, config, src, qtype)
    order = _name_order(arch, config["num_hidden_layers"])
    tensors.sort(key=lambda t: order[t.name])
    return GGUFPlan(arch.name, kv, tensors)


def write_gguf(plan: GGUFPlan, path, split_max_tensors: int = 0) -> List[Path]:
    """Write ``plan`` to ``path`` (or ``NAME-0000i-of-0000N.gguf`` parts of at
    most ``split_max_tensors`` tensors). Returns the files written."""
    path = Path(path)
    w = GGUFWriter(path, plan.arch, split_max_tensors=split_max_tensors)
    for key, v in plan.kv.items():
        if key != "general.architecture":
            w.add_key_value(key, v.value, v.type, v.sub_type)
    for t in plan.tensors:
        dtype = {QType.F32: np.float32, QType.F16: np.float16}.get(t.qtype)
        w.add_tensor_info(
            t.name, t.shape, dtype or np.float32, t.nbytes, raw_dtype=None if dtype else t.qtype
        )
    files = w.format_shard_names(path)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in plan.tensors:
            data = t.data()
            if data.nbytes != t.nbytes:
                raise ValueError(f"tensor {t.name!r}: {data.nbytes} bytes made, {t.nbytes} planned")
            w.write_tensor_data(data)
    except BaseException:
        w.close()
        for f in files:
            f.unlink(missing_ok=True)
        raise
    w.close()
    return files


def export_gguf(hf_path, path, outtype: str = "F32", split_max_tensors: int = 0) -> List[Path]:
    return write_gguf(plan_gguf(hf_path, outtype), path, split_max_tensors)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mlx_lm_odmoe.conversion.gguf_export",
        description="Write a qwen2_moe / DeepSeek-V3 / Kimi K2 checkpoint as a llama.cpp GGUF.",
    )
    p.add_argument("hf_path", help="Hugging Face checkpoint folder.")
    p.add_argument("out", help="Output .gguf file.")
    p.add_argument(
        "--outtype", default="F32", choices=OUTTYPES, type=str.upper, help="Default: F32"
    )
    p.add_argument(
        "--split-max-tensors", type=int, default=0, help="Tensors per split part (0: one file)."
    )
    args = p.parse_args(argv)
    try:
        files = export_gguf(args.hf_path, args.out, args.outtype, args.split_max_tensors)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())

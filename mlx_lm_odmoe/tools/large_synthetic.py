"""Big random MoE models with a real architecture's shapes, for benchmarks.

    python -m mlx_lm_odmoe.tools.large_synthetic --preset qwen1.5-moe-a2.7b --out qwen-moe-synth
    python -m mlx_lm_odmoe.tools.large_synthetic --preset qwen2-57b-a14b --layers 8 --out DIR
    python -m mlx_lm_odmoe.tools.large_synthetic --preset qwen1.5-moe-a2.7b --out DIR \\
        --stock DIR-stock --gguf DIR.gguf

The model is written straight into the sharded layout: routed experts are
random packed weights (uint32) with float32 scales and biases drawn so every
dequantized weight has the spread of mlx-lm's own initialisation, streamed
one expert at a time through ExpertShardWriter (memory stays bounded by one
expert). Resident (non-expert) weights come from mlx-lm's model class,
quantized with mlx-lm's quantize_model and saved with its save_model.

Scales and biases are float16-exact, so the optional GGUF copy (llama.cpp
Q4_1: a float16 scale and minimum per 32 weights) holds exactly the same
weights, and the optional stock copy (mlx-lm's stacked switch_mlp experts)
holds the same bytes: all three are one model, read three ways. The text it
writes is garbage; its speed and memory are a real model's.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..block import moe_layers_of
from ..model_types import STOCK_TYPE_OF

DATA_DIR = Path(__file__).resolve().parent.parent / "tests" / "data"
PRESETS = {
    "qwen1.5-moe-a2.7b": "qwen1.5-moe-a2.7b.config.json",
    "qwen2-57b-a14b": "qwen2-57b-a14b.config.json",
    "kimi-k2.5": "kimi-k2.5.config.json",
}
TINY_PRESET = "tiny-qwen2-moe"


def load_preset(name: Optional[str] = None, config_path: Optional[str] = None) -> dict:
    """A text-model config (K2.5's nested text_config flattened)."""
    from mlx_lm_odmoe.conversion.sources import text_config

    if config_path:
        return text_config(json.loads(Path(config_path).read_text()))
    if name == TINY_PRESET:
        from .synthetic import TINY_QWEN2_MOE

        return dict(TINY_QWEN2_MOE)
    if name not in PRESETS:
        raise ValueError(
            f"unknown preset {name!r}; choose one of {sorted(PRESETS) + [TINY_PRESET]} or pass --config"
        )
    path = DATA_DIR / PRESETS[name]
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found (presets read the repository's tests/data); pass --config"
        )
    return text_config(json.loads(path.read_text()))


def shrink(config: dict, layers: Optional[int] = None, vocab_size: Optional[int] = None) -> dict:
    config = dict(config, torch_dtype="float32")
    if vocab_size:
        config["vocab_size"] = int(vocab_size)
    for k in ("bos_token_id", "eos_token_id"):  # the written tokenizer's <|endoftext|> is id 0
        if isinstance(config.get(k), int) and config[k] >= config["vocab_size"]:
            config[k] = 0
    for k in ("quantization_config", "quantization", "num_nextn_predict_layers"):
        config.pop(k, None)
    if layers:
        config["num_hidden_layers"] = int(layers)
    return config


def _num_experts(config: dict) -> int:
    return config.get("num_experts") or config["n_routed_experts"]


def expert_shapes(config: dict, bits: int, group_size: int) -> Dict[str, tuple]:
    """Packed weight / scales / biases shapes of one expert, in record order."""
    D, inter = config["hidden_size"], config["moe_intermediate_size"]
    shapes = {}
    for proj, (out, inp) in (
        ("gate_proj", (inter, D)),
        ("up_proj", (inter, D)),
        ("down_proj", (D, inter)),
    ):
        if inp % group_size:
            raise ValueError(
                f"{proj}: {inp} inputs are not a multiple of --group-size {group_size}"
            )
        shapes[f"{proj}.weight"] = (out, inp * bits // 32)
        shapes[f"{proj}.scales"] = (out, inp // group_size)
        shapes[f"{proj}.biases"] = (out, inp // group_size)
    return shapes


def expert_nbytes(config: dict, bits: int, group_size: int) -> int:
    return sum(int(np.prod(s)) * 4 for s in expert_shapes(config, bits, group_size).values())


def random_expert(
    rng: np.random.Generator, shapes: Dict[str, tuple], bits: int
) -> Dict[str, np.ndarray]:
    """Uniform packed codes; scale ~ the spread of mlx-lm's uniform(+-1/sqrt(in))
    init, bias centres the codes on zero. Both float16-exact (see module doc)."""
    mid = (2**bits - 1) / 2
    code_std = np.sqrt(((2**bits) ** 2 - 1) / 12)
    out = {}
    for name, shape in shapes.items():
        proj, part = name.split(".")
        if part == "weight":
            out[name] = np.frombuffer(rng.bytes(int(np.prod(shape)) * 4), dtype=np.uint32).reshape(
                shape
            )
            in_dims = shape[1] * 32 // bits
            std = 1.0 / np.sqrt(3.0 * in_dims)
            scale = (std / code_std) * rng.uniform(0.75, 1.25, size=shapes[f"{proj}.scales"])
            scale = scale.astype(np.float16).astype(np.float32)
            out[f"{proj}.scales"] = scale
            out[f"{proj}.biases"] = (-mid * scale).astype(np.float16).astype(np.float32)
    return {k: out[k] for k in shapes}


def write_resident(out: Path, config: dict, bits: int, group_size: int, seed: int):
    """Non-expert weights through mlx-lm's own classes; returns the config to
    save and the MoE layers."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import quantize_model, save_model

    from mlx_lm_odmoe.conversion.convert import build_skeleton, odmoe_config

    mx.random.seed(seed)
    cfg = odmoe_config(config)
    model = build_skeleton(cfg)  # routed experts are on-demand blocks: never allocated
    model, cfg = quantize_model(model, cfg, group_size, bits)
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            m.scales = m.scales.astype(mx.float16).astype(mx.float32)
            m.biases = m.biases.astype(mx.float16).astype(mx.float32)
    for layer in model.model.layers:  # one layer at a time: bounded memory
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    moe_layers = moe_layers_of(model)
    save_model(out, model, donate_model=True)
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    return cfg, moe_layers


def moe_layer_ids(config: dict):
    n = config["num_hidden_layers"]
    first = config.get("first_k_dense_replace", 0)
    freq = config.get("moe_layer_freq", 1) or 1
    step = config.get("decoder_sparse_step", 1) or 1
    if "n_routed_experts" in config:
        return [i for i in range(n) if i >= first and i % freq == 0]
    return [i for i in range(n) if (i + 1) % step == 0]


def write_experts(
    out: Path,
    config: dict,
    moe_layers,
    bits: int,
    group_size: int,
    seed: int,
    shard_size_gb: float,
    progress: bool = True,
):
    import mlx.core as mx
    from tqdm import tqdm

    from mlx_lm_odmoe.conversion.shard_writer import ExpertShardWriter

    rng = np.random.default_rng(seed)
    shapes = expert_shapes(config, bits, group_size)
    E = _num_experts(config)
    q = {"group_size": group_size, "bits": bits, "mode": "affine"}
    first = random_expert(rng, shapes, bits)
    writer = ExpertShardWriter(
        out, {k: mx.array(v) for k, v in first.items()}, E, moe_layers, q, int(shard_size_gb * 1e9)
    )
    rec = expert_nbytes(config, bits, group_size)
    bar = tqdm(
        total=rec * E * len(moe_layers),
        unit="B",
        unit_scale=True,
        desc="experts",
        disable=not progress,
    )
    for l in moe_layers:
        for e in range(E):
            arrays = first if first is not None else random_expert(rng, shapes, bits)
            first = None
            writer.add(l, e, {k: mx.array(v) for k, v in arrays.items()})
            bar.update(rec)
    bar.close()
    return writer.finish()


def estimate_nbytes(config: dict, bits: int, group_size: int) -> Dict[str, int]:
    """Expert and (roughly) resident bytes, to check the disk before writing."""
    experts = (
        expert_nbytes(config, bits, group_size) * _num_experts(config) * len(moe_layer_ids(config))
    )
    D, V, L = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    shared = config.get("shared_expert_intermediate_size") or (
        config.get("n_shared_experts", 0) * config["moe_intermediate_size"]
    )
    params = 2 * V * D + L * (4 * D * D + 3 * D * shared)
    return {"experts": experts, "resident": int(params * (bits + 64 / group_size) / 8)}


def _check_disk(path: Path, need: int):
    free = shutil.disk_usage(path if path.exists() else path.parent).free
    if need > free * 0.95:
        raise OSError(f"{path}: needs about {need / 1e9:.1f} GB, only {free / 1e9:.1f} GB free")


def generate(
    out,
    config: dict,
    bits: int = 4,
    group_size: int = 64,
    seed: int = 0,
    shard_size_gb: float = 2.0,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write a random model with ``config``'s shapes to ``out`` (sharded layout)."""
    from mlx_lm.utils import save_config

    from mlx_lm_odmoe.conversion.atomic import atomic_dir
    from mlx_lm_odmoe.layout import FORMAT_VERSION

    from .synthetic import write_tokenizer

    out = Path(out)
    est = estimate_nbytes(config, bits, group_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(out.parent, est["experts"] + est["resident"])
    with atomic_dir(out, force=force) as tmp:
        cfg, moe_layers = write_resident(tmp, config, bits, group_size, seed)
        layout = write_experts(
            tmp, config, moe_layers, bits, group_size, seed + 1, shard_size_gb, progress
        )
        cfg["odmoe"] = {
            "format": FORMAT_VERSION,
            "expert_bytes": layout.record_nbytes,
            "experts_total_bytes": layout.total_nbytes,
        }
        save_config(cfg, config_path=tmp / "config.json")
        write_tokenizer(tmp)
    return out


# -- the same model for other runtimes ----------------------------------------

_EXPORTABLE = ("qwen2_moe_odmoe",)  # types whose stock checkpoint and GGUF this can write
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _odmoe_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def export_stock(model_dir, out, force: bool = False, progress: bool = True) -> Path:
    """The model as a stock mlx-lm checkpoint: resident weights hard-linked,
    each layer's experts stacked into ``switch_mlp`` tensors."""
    import mlx.core as mx
    from tqdm import tqdm

    from mlx_lm_odmoe.conversion.atomic import atomic_dir

    from ..store import ShardedFolderReader
    from ..store.records import record_to_arrays

    model_dir = Path(model_dir)
    config = _odmoe_config(model_dir)
    if config["model_type"] not in _EXPORTABLE:
        raise ValueError(f"stock export supports {list(_EXPORTABLE)}, not {config['model_type']!r}")
    reader = ShardedFolderReader(model_dir, verify=False)
    layout = reader.layout
    _check_disk(Path(out).parent, layout.total_nbytes)
    with atomic_dir(Path(out), force=force) as tmp:
        for f in model_dir.glob("model*.safetensors"):
            _link_or_copy(f, tmp / f.name)
        bar = tqdm(
            total=layout.total_nbytes,
            unit="B",
            unit_scale=True,
            desc="stacked experts",
            disable=not progress,
        )
        for l in layout.moe_layers:
            recs = [record_to_arrays(reader.read(l, e), layout) for e in range(layout.num_experts)]
            stacked = {
                f"model.layers.{l}.mlp.switch_mlp.{t.name}": mx.stack([r[t.name] for r in recs])
                for t in layout.tensors
            }
            mx.save_safetensors(
                str(tmp / f"model-experts-{l:04d}.safetensors"), stacked, metadata={"format": "mlx"}
            )
            del recs, stacked
            bar.update(layout.record_nbytes * layout.num_experts)
        bar.close()
        config["model_type"] = STOCK_TYPE_OF[config["model_type"]]
        config.pop("odmoe", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
        for name in _TOKENIZER_FILES:
            if (model_dir / name).exists():
                shutil.copy(model_dir / name, tmp / name)
    reader.close()
    return Path(out)


def _link_or_copy(src: Path, dst: Path):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)


def affine4_to_q4_1(
    w: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int
) -> np.ndarray:
    """MLX affine 4-bit rows as llama.cpp Q4_1 blocks, exactly.

    MLX packs 8 codes per uint32, lowest bits first, with a scale and bias
    per ``group_size`` codes; Q4_1 keeps 32 codes per block (codes i and
    i + 16 share byte i) with a float16 scale ``d`` and minimum ``m``. The
    values are equal iff the scales and biases are float16-exact.
    """
    if group_size % 32:
        raise ValueError(f"group size {group_size} is not a multiple of Q4_1's 32")
    lead = w.shape[:-1]
    u8 = np.ascontiguousarray(w).view(np.uint8).reshape(-1, w.shape[-1] * 4)
    rows, cols = u8.shape[0], u8.shape[1] * 2
    codes = np.empty((rows, cols), dtype=np.uint8)
    codes[:, 0::2] = u8 & 0xF
    codes[:, 1::2] = u8 >> 4
    codes = codes.reshape(rows, cols // 32, 32)
    per = group_size // 32
    d = np.repeat(scales.reshape(rows, -1), per, axis=-1).astype(np.float16)
    m = np.repeat(biases.reshape(rows, -1), per, axis=-1).astype(np.float16)
    if not (
        np.array_equal(d.astype(np.float32), np.repeat(scales.reshape(rows, -1), per, axis=-1))
        and np.array_equal(m.astype(np.float32), np.repeat(biases.reshape(rows, -1), per, axis=-1))
    ):
        raise ValueError("scales/biases are not float16-exact; Q4_1 would change the weights")
    blocks = np.empty((rows, cols // 32, 20), dtype=np.uint8)
    blocks[..., 0:2] = d.view(np.uint8).reshape(rows, cols // 32, 2)
    blocks[..., 2:4] = m.view(np.uint8).reshape(rows, cols // 32, 2)
    blocks[..., 4:] = codes[..., :16] | (codes[..., 16:] << 4)
    return blocks.reshape(*lead, (cols // 32) * 20)


def _f16_exact(a) -> bool:
    import mlx.core as mx

    a = a.astype(mx.float32)
    return bool(mx.array_equal(a.astype(mx.float16).astype(mx.float32), a).item())


def export_gguf(model_dir, path, progress: bool = True) -> Path:
    """The model as a llama.cpp GGUF (``qwen2moe``), quantized weights as
    Q4_1 with exactly the same values (dequantized to F32 where Q4_1's
    float16 scales cannot hold them), routers, norms and float experts (an
    inflated testbed's) as F32."""
    import mlx.core as mx
    from gguf import GGMLQuantizationType as QType
    from tqdm import tqdm

    from mlx_lm_odmoe.conversion.gguf_export import (
        GGUFPlan,
        PlannedTensor,
        _arch_for,
        _metadata,
        _name_order,
        write_gguf,
    )
    from mlx_lm_odmoe.conversion.gguf_source import EXPERT_TENSORS, GLOBAL_TENSORS

    from ..store import ShardedFolderReader
    from ..store.records import record_to_arrays

    model_dir, path = Path(model_dir), Path(path)
    config = _odmoe_config(model_dir)
    q = config.get("quantization") or {}
    if (
        config["model_type"] not in _EXPORTABLE
        or q.get("bits") != 4
        or q.get("mode", "affine") != "affine"
    ):
        raise ValueError(
            "GGUF export needs a qwen2_moe_odmoe model whose resident weights are 4-bit affine "
            "(as the shipped tiny-qwen2-moe and its inflated copies)"
        )
    gs = q["group_size"]
    hf_config = dict(config, model_type=STOCK_TYPE_OF[config["model_type"]])
    arch = _arch_for(hf_config)
    kv = _metadata(model_dir, arch, hf_config, QType.Q4_1, model_dir.name)
    weights = {}
    for f in sorted(model_dir.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    layer_names = {t.hf: t.gguf for t in arch.tensors}
    global_names = {hf: g for g, hf in GLOBAL_TENSORS.items()}
    f32_names = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
    tensors = []
    for key, value in weights.items():
        if key.endswith((".scales", ".biases")) and key.rsplit(".", 1)[0] + ".weight" in weights:
            continue
        layer, _, rest = key.partition("model.layers.")[2].partition(".")
        name = global_names.get(key) or f"blk.{layer}.{layer_names[rest]}"
        base = key.rsplit(".", 1)[0]
        if (
            not key.endswith(".weight") or f"{base}.scales" not in weights
        ):  # norms, attention biases
            tensors.append(
                PlannedTensor(name, tuple(value.shape), QType.F32, lambda v=value: np.array(v))
            )
            continue
        shape = (value.shape[0], value.shape[1] * 8)
        s, b = weights[f"{base}.scales"], weights[f"{base}.biases"]
        if name.endswith(f32_names) or not (_f16_exact(s) and _f16_exact(b)):
            # Routers, and weights Q4_1 could not hold exactly: dequantized.
            make = lambda v=value, s=s, b=b: np.array(mx.dequantize(v, s, b, gs, 4))  # noqa: E731
            tensors.append(PlannedTensor(name, shape, QType.F32, make))
        else:

            def make(v=value, s=s, b=b):
                return affine4_to_q4_1(np.array(v), np.array(s), np.array(b), gs)

            tensors.append(PlannedTensor(name, shape, QType.Q4_1, make, raw=True))

    reader = ShardedFolderReader(model_dir, verify=False)
    layout = reader.layout
    bar = tqdm(
        total=layout.total_nbytes,
        unit="B",
        unit_scale=True,
        desc="gguf experts",
        disable=not progress,
    )
    cache = {}

    def layer_experts(l):
        # All three projections of a layer come from one pass over its experts.
        if l not in cache:
            cache.clear()
            recs = [record_to_arrays(reader.read(l, e), layout) for e in range(layout.num_experts)]
            cache[l] = {
                t.name: np.stack([np.array(r[t.name]) for r in recs]) for t in layout.tensors
            }
            bar.update(layout.record_nbytes * layout.num_experts)
        return cache[l]

    float_experts = layout.quantization is None  # e.g. widened by mlx_lm_odmoe.inflate
    for l in layout.moe_layers:
        for g, proj in EXPERT_TENSORS.items():
            p = proj.rsplit(".", 1)[0]
            w_shape = next(t.shape for t in layout.tensors if t.name == f"{p}.weight")
            if float_experts:
                shape = (layout.num_experts,) + tuple(w_shape)

                def make(l=l, p=p):
                    return layer_experts(l)[f"{p}.weight"].astype(np.float32)

                tensors.append(PlannedTensor(f"blk.{l}.{g}", shape, QType.F32, make))
                continue
            shape = (layout.num_experts, w_shape[0], w_shape[1] * 8)

            def make(l=l, p=p):
                x = layer_experts(l)
                return affine4_to_q4_1(x[f"{p}.weight"], x[f"{p}.scales"], x[f"{p}.biases"], gs)

            tensors.append(PlannedTensor(f"blk.{l}.{g}", shape, QType.Q4_1, make, raw=True))
    order = _name_order(arch, config["num_hidden_layers"])
    tensors.sort(key=lambda t: order[t.name])
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(path.parent, sum(t.nbytes for t in tensors))
    write_gguf(GGUFPlan(arch.name, kv, tensors), path)
    bar.close()
    reader.close()
    return path


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mlx_lm_odmoe.tools.large_synthetic",
        description="Write a big random MoE model with a real architecture's shapes in the sharded "
        "expert layout (and optionally the same model as a stock mlx-lm checkpoint and a GGUF).",
        epilog=f"Presets (configs in tests/data): {', '.join(sorted(PRESETS))}; {TINY_PRESET} is a tiny "
        "model for tests. Qwen1.5-MoE-A2.7B at 4 bits, group 64 has about 7.8 GB of experts.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS) + [TINY_PRESET])
    src.add_argument(
        "--config",
        help="A Hugging Face config.json (qwen2_moe, deepseek_v3, kimi_k2) to take shapes from.",
    )
    p.add_argument("--out", required=True, help="Output model folder (sharded layout).")
    p.add_argument(
        "--layers", type=int, help="Keep only the first N decoder layers (smaller, faster runs)."
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        help="Override the vocabulary size (a big embedding and lm_head "
        "dominate decode on slow CPUs and hide the experts' cost).",
    )
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size-gb", type=float, default=2.0)
    p.add_argument(
        "--stock", help="Also write the same model as a stock mlx-lm checkpoint here (qwen2_moe)."
    )
    p.add_argument(
        "--gguf", help="Also write the same model as a llama.cpp GGUF file here (qwen2_moe, 4-bit)."
    )
    p.add_argument("--force", action="store_true", help="Replace existing output folders.")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    config = shrink(load_preset(args.preset, args.config), args.layers, args.vocab_size)
    est = estimate_nbytes(config, args.bits, args.group_size)
    print(
        f"{config['num_hidden_layers']} layers, {_num_experts(config)} experts per MoE layer: "
        f"~{est['experts'] / 1e9:.2f} GB of experts, ~{est['resident'] / 1e9:.2f} GB resident",
        flush=True,
    )
    progress = not args.no_progress
    out = Path(args.out)
    if (
        out.exists()
        and not args.force
        and (out / "experts" / "index.json").exists()
        and (args.stock or args.gguf)
    ):
        print(f"{out} exists: exporting from it")
    else:
        generate(
            out,
            config,
            args.bits,
            args.group_size,
            args.seed,
            args.shard_size_gb,
            args.force,
            progress,
        )
        print(f"model: {out}")
    if args.stock:
        print(
            f"stock mlx-lm copy: {export_stock(out, args.stock, force=args.force, progress=progress)}"
        )
    if args.gguf:
        print(f"GGUF copy: {export_gguf(out, args.gguf, progress=progress)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

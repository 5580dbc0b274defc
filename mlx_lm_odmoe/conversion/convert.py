"""Convert a Hugging Face, mlx-lm or GGUF MoE checkpoint to the sharded layout.

Resident weights go through mlx-lm's own sanitize, casting and
``quantize_model``, so they are exactly what ``mlx_lm.convert`` would write.
Experts stream one at a time: cast, quantized with ``mx.quantize`` (group-wise,
so per-expert quantization equals quantizing the stacked tensor), and appended
to a shard. The output folder appears only when complete.

Without ``dtype`` the float type is float32 where MLX has no GPU (its CPU
backend cannot multiply 16-bit experts, see ``mlx_lm_odmoe.backend``), and
the source's elsewhere.
"""

import argparse
import importlib
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_map_with_path
from tqdm import tqdm

from mlx_lm_odmoe.backend import default_dtype, expert_float_dtype, half_precision_problem
from mlx_lm_odmoe.block import OnDemandSwitchGLU, moe_layers_of
from mlx_lm_odmoe.errors import ConversionError, OdmoeError
from mlx_lm_odmoe.layout import EXPERTS_DIR, FORMAT_VERSION, load_layout
from mlx_lm_odmoe.model_types import DEDICATED, odmoe_type_of_config, supported_sources

from .atomic import atomic_dir
from .config_keys import missing_keys
from .shard_writer import ExpertShardWriter
from .sources import is_converted, open_source, text_config

DTYPES = ("float32", "float16", "bfloat16")
_TOKENIZER_GLOBS = (
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "*.jinja",
    "chat_template*",
    "generation_config.json",
    "*.tiktoken",
)


def odmoe_config(source_config: dict, where: Optional[str] = None) -> dict:
    """The config.json of the converted folder: ``source_config`` (read from
    ``where``) under its odmoe type, with every key mlx-lm reads."""
    base = source_config.get("model_type")
    odmoe = odmoe_type_of_config(source_config)
    if odmoe is None:
        raise ValueError(
            f"model_type {base!r} is not supported; expected one of {supported_sources()}"
        )
    source_config = {**source_config, **missing_keys(source_config, odmoe, where)}
    # The types of their own take K2.5-style nested configs flat; the rule's
    # keep what mlx-lm's ModelArgs read (llama4's text_config, ...).
    dedicated = odmoe in DEDICATED.values()
    config = text_config(source_config) if dedicated else dict(source_config)
    config["model_type"] = odmoe
    for k in ("quantization_config", "auto_map") + (
        ("text_config", "vision_config") if dedicated else ()
    ):
        config.pop(k, None)
    return config


def _resident(model, weights: dict) -> dict:
    """The resident weights as the model holds them. A checkpoint already
    named as the model's parameters (an mlx-lm folder) is taken as is:
    loading runs mlx-lm's sanitize on it, as on the source, and some
    sanitizes are not idempotent (bailing_moe normalizes lm_head each time).
    Others go through sanitize (no store is opened: it only sanitizes)."""
    from mlx.utils import tree_flatten

    as_is = model.without_routed(weights)
    names = {k for k, _ in tree_flatten(model.parameters())}
    if {k for k in as_is if not k.endswith((".scales", ".biases"))} == names:
        return as_is
    return model.sanitize(weights)


def _without_expert_entries(quantization: dict, model) -> dict:
    """A quantization config less per-layer entries of the routed experts
    (their quantization is the expert layout's; the blocks hold no layers
    mlx-lm's loader could quantize)."""
    routed = tuple(f"{p}." for p, m in model.named_modules() if isinstance(m, OnDemandSwitchGLU))
    return {k: v for k, v in quantization.items() if not k.startswith(routed)}


def build_skeleton(config: dict):
    """Our model class with no store attached (conversion never opens one)."""
    module = importlib.import_module(f"mlx_lm_odmoe.models.{config['model_type']}")
    args = module.ModelArgs.from_dict({**config, "odmoe": {"resolve": False}})
    return module.Model(args)


def _cast(arrays: dict, dtype, keep=lambda k: True):
    if dtype is None:
        return arrays
    return {
        k: v.astype(dtype) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in arrays.items()
    }


def convert(
    hf_path: str,
    mlx_path: str,
    quantize: bool = False,
    q_group_size: int = 64,
    q_bits: int = 4,
    dtype: Optional[str] = None,
    shard_size_gb: float = 2.0,
    force: bool = False,
    progress: bool = True,
):
    if dtype is None and not quantize and is_converted(hf_path):
        raise ConversionError(_already_converted(Path(hf_path)))
    # Chosen before opening: a GGUF source dequantizes straight into it.
    dtype = dtype or default_dtype()
    src = open_source(hf_path, dtype)
    where = Path(hf_path) / "config.json" if Path(hf_path).is_dir() else Path(hf_path)
    config = odmoe_config(src.config, where=str(where))
    if src.quantization and quantize:
        raise ValueError(f"{hf_path} is already quantized; convert it without -q")
    if dtype is None:
        # transformers 5 writes "dtype", 4 "torch_dtype"
        dtype = next(
            (c.get(k) for c in (src.config, config) for k in ("torch_dtype", "dtype") if c.get(k)),
            None,
        )
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype is not None:
        # What the folder holds (a GGUF's was a guess); "dtype" is transformers 5's name.
        config["torch_dtype"] = dtype
        if "dtype" in config:
            config["dtype"] = dtype
    problem = half_precision_problem(dtype, bool(quantize or src.quantization))
    if problem:
        print(
            f"warning: --dtype {dtype}: {problem}; --dtype float32 (the default on this "
            "machine) gives a model that runs well here",
            file=sys.stderr,
        )
    mx_dtype = getattr(mx, dtype) if dtype else None

    with atomic_dir(Path(mlx_path), force=force) as out:
        model = build_skeleton(config)
        if hasattr(src, "attach"):
            src.attach(model)
        keep = getattr(model, "cast_predicate", lambda _: True)
        weights = _resident(model, src.resident_weights())
        if src.quantization:
            _quantize_like_source(model, src.config["quantization"], weights)
        model.load_weights(list(weights.items()), strict=True)
        if mx_dtype is not None:
            model.update(
                tree_map_with_path(
                    lambda k, v: (
                        v.astype(mx_dtype) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v
                    ),
                    model.parameters(),
                )
            )
        if quantize:
            from mlx_lm.utils import quantize_model

            model, config = quantize_model(model, config, q_group_size, q_bits)
            qparams = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}
        else:
            qparams = getattr(src, "expert_quantization", lambda: src.quantization)()
            if qparams:
                config["quantization"] = dict(src.config["quantization"])
        for k in ("quantization", "quantization_config"):
            if isinstance(config.get(k), dict):
                config[k] = _without_expert_entries(config[k], model)

        from mlx_lm.utils import save_config, save_model

        moe_layers = moe_layers_of(model)
        E = next(m for _, m in model.named_modules() if isinstance(m, OnDemandSwitchGLU)).dims[2]
        save_model(out, model, donate_model=True)
        del model, weights

        def expert(l, e):
            # Scales of quantized experts take the type too, as mlx_lm.convert casts them.
            arrays = _cast(src.expert(l, e), mx_dtype)
            if quantize:
                q = {}
                for name, w in arrays.items():
                    if not name.endswith(".weight"):  # a projection's bias stays as it is
                        q[name] = w
                        continue
                    if w.shape[-1] % q_group_size:
                        raise ValueError(
                            f"expert {name} has {w.shape[-1]} input columns, not a multiple of "
                            f"--q-group-size {q_group_size}; pick a group size that divides it"
                        )
                    proj = name.rsplit(".", 1)[0]
                    q[f"{proj}.weight"], q[f"{proj}.scales"], q[f"{proj}.biases"] = mx.quantize(
                        w, q_group_size, q_bits
                    )
                arrays = q
            mx.eval(arrays)
            return arrays

        writer = ExpertShardWriter(
            out, expert(moe_layers[0], 0), E, moe_layers, qparams, int(shard_size_gb * 1e9)
        )
        bar = tqdm(total=E * len(moe_layers), desc="experts", unit="expert", disable=not progress)
        for l in moe_layers:
            for e in range(E):
                writer.add(l, e, expert(l, e))
                bar.update(1)
        bar.close()
        layout = writer.finish()

        config["odmoe"] = {
            "format": FORMAT_VERSION,
            "expert_bytes": layout.record_nbytes,
            "experts_total_bytes": layout.total_nbytes,
        }
        save_config(config, config_path=out / "config.json")
        if hasattr(src, "write_tokenizer"):
            src.write_tokenizer(out)  # a GGUF holds its tokenizer as metadata
        else:
            _copy_tokenizer(Path(hf_path), out)
        if is_converted(hf_path):
            _copy(Path(hf_path), out, ("shadow.*",))  # the predictor fits any re-cast
    return Path(mlx_path)


def _quantize_like_source(model, quantization: dict, weights: dict):
    """Quantize the skeleton's modules the way mlx-lm's load_model does for
    a quantized checkpoint, so its weights load as they are."""
    import mlx.nn as nn
    from mlx_lm.utils import infer_quant_config

    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def _already_converted(path: Path) -> str:
    what = f"{path} is already converted (an odmoe folder)"
    try:
        layout = load_layout(path / EXPERTS_DIR)
        problem = half_precision_problem(expert_float_dtype(layout), bool(layout.quantization))
    except (OSError, ValueError):
        problem = None  # loading it will say what is wrong
    if problem and not layout.quantization:
        return f"{what}, but its {problem}: re-cast it with --dtype float32"
    runs = f"{what}: it runs as is (mlx_lm.generate --model {path})"
    if problem:
        return f"{runs}, though its {problem}; --dtype float32 re-casts it for full speed"
    return f"{runs}; pass --dtype to re-cast its weights or -q to quantize it"


def _copy(src: Path, dst: Path, patterns):
    for pattern in patterns:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy(f, dst / f.name)


def _copy_tokenizer(src: Path, dst: Path):
    _copy(src, dst, _TOKENIZER_GLOBS)
    _chat_template_json_to_jinja(dst)


def _chat_template_json_to_jinja(folder: Path):
    """transformers reads a tokenizer's template from tokenizer_config.json
    or chat_template.jinja, not from a chat_template.json (a processor file):
    give such a template to the tokenizer too."""
    legacy, jinja = folder / "chat_template.json", folder / "chat_template.jinja"
    if not legacy.is_file() or jinja.exists():
        return
    config = folder / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("chat_template"):
        return
    template = json.loads(legacy.read_text()).get("chat_template")
    if isinstance(template, str):
        jinja.write_text(template)


# -- the mlx_lm_odmoe.convert command ------------------------------------------


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_lm_odmoe.convert",
        description=(
            "Convert a Hugging Face (per-expert tensors), mlx-lm (stacked "
            "switch_mlp) or llama.cpp GGUF MoE checkpoint into a model folder "
            "whose routed experts are loaded on demand. Supported model types: "
            "every mlx-lm MoE type (README: Architectures; GGUF: qwen2moe, "
            "deepseek2). The output loads with stock mlx_lm.generate / "
            "mlx_lm.server / mlx_lm.load."
        ),
        epilog="Examples: mlx_lm_odmoe.convert --hf-path ./Qwen1.5-MoE-A2.7B --mlx-path ./qwen-odmoe -q ; "
        "mlx_lm_odmoe.convert --gguf ./Kimi-K2-Q4_K_M-00001-of-00013.gguf --mlx-path ./kimi -q",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-path", "--model", help="Source model folder.")
    source.add_argument(
        "--gguf",
        help="Source llama.cpp GGUF file (qwen2moe or deepseek2); for a split "
        "model, any of its NAME-0000i-of-0000N.gguf parts.",
    )
    p.add_argument(
        "--mlx-path", default="mlx_model", help="Output folder (must not exist). Default: mlx_model"
    )
    p.add_argument(
        "-q",
        "--quantize",
        action="store_true",
        help="Quantize (MLX affine) the model, experts included.",
    )
    # As mlx_lm.convert's: affine quantization, its defaults when not given.
    p.add_argument(
        "--q-group-size",
        type=int,
        default=None,
        choices=(32, 64, 128),
        help="Quantization group size. Default: 64",
    )
    p.add_argument(
        "--q-bits",
        type=int,
        default=None,
        choices=(2, 3, 4, 5, 6, 8),
        help="Bits per weight. Default: 4",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="Type of float weights. Default: float32 where MLX has no GPU (its CPU "
        "backend cannot run 16-bit experts), else the source's torch_dtype.",
    )
    p.add_argument(
        "--shard-size-gb", type=float, default=2.0, help="Largest expert shard in GB. Default: 2"
    )
    p.add_argument("--force", action="store_true", help="Replace --mlx-path if it exists.")
    return p


def main(argv=None):
    parser = configure_parser()
    args = parser.parse_args(argv)
    if args.gguf and not args.gguf.endswith(".gguf"):
        parser.error(f"--gguf expects a .gguf file, got {args.gguf!r}")
    try:
        out = convert(
            args.hf_path or args.gguf,
            args.mlx_path,
            quantize=args.quantize,
            q_group_size=args.q_group_size or 64,
            q_bits=args.q_bits or 4,
            dtype=args.dtype,
            shard_size_gb=args.shard_size_gb,
            force=args.force,
        )
    except (
        OdmoeError,
        ValueError,
        OSError,
    ) as e:  # OSError: FileNotFoundError, FileExistsError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[INFO] Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

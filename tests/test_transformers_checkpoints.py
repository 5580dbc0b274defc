"""Hugging Face checkpoints saved by transformers itself convert exactly.

For each family a tiny random model is built by transformers' own class and
saved with ``save_pretrained``: as transformers 5 writes it (the rope in
``rope_parameters``) and as transformers 4 did (``rope_theta`` /
``rope_scaling``), with a non-default rope theta and, for DeepSeek-V3, yarn
scaling. Converted by ``mlx_lm_odmoe.convert``:

- its logits match transformers' (torch) to 1e-4, in both styles;
- they equal, bit for bit, those of ``mlx_lm.convert``'s output loaded by
  stock mlx-lm (float32 and quantized), where stock mlx-lm reads the config.
  Stock mlx-lm reads only the transformers 4 keys: on a transformers 5 config
  it runs with its default rope theta (max abs logit error 0.98 for
  qwen2_moe, 1.2 for mixtral, 1.9 for deepseek_v3 here, against our 2e-6)
  or fails (qwen3_moe: no rope_theta, and num_experts saved as
  num_local_experts), so there we match transformers instead;
- ``mlx_lm.generate --model DIR`` runs on it.

Needs torch (a test-only dependency): skipped without it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from logits import prefill_and_decode, prompt_tokens

import mlx_lm_odmoe
from mlx_lm_odmoe.conversion.convert import main
from mlx_lm_odmoe.models.hf_layouts import as_sanitize_reads
from mlx_lm_odmoe.tools.synthetic import write_tokenizer

torch = pytest.importorskip("torch", reason="torch (test-only) builds the transformers models")
transformers = pytest.importorskip("transformers")

THETA = 5e4
_COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    initializer_range=0.1,  # logits of order one: a wrong rope shows
)
FAMILIES = {
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=128,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        dict(
            head_dim=16,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    "mixtral": (
        "MixtralForCausalLM",
        dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
    ),
    "gpt_oss": (
        "GptOssForCausalLM",
        dict(
            head_dim=16,
            intermediate_size=64,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3ForCausalLM",
        dict(
            num_key_value_heads=4,
            intermediate_size=128,
            moe_intermediate_size=64,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=32,
            q_lora_rank=48,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
            rope_parameters=dict(
                rope_type="yarn",
                factor=4.0,
                original_max_position_embeddings=64,
                beta_fast=32.0,
                beta_slow=1.0,
                mscale=1.0,
                mscale_all_dim=1.0,
            ),
        ),
    ),
}
# transformers 4's names for what transformers 5 renamed (its attribute_map).
V4_NAMES = {"qwen3_moe": {"num_local_experts": "num_experts"}}
PROMPT = prompt_tokens(24, seed=3)


def _as_transformers_4(config: dict, family: str) -> dict:
    """The config transformers 4 saved: rope_theta and rope_scaling."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type", "default")
    config["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    for new, old in V4_NAMES.get(family, {}).items():
        config[old] = config.pop(new)
    return config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoints(family) -> (torch model, {"5": folder, "4": folder})."""
    root = tmp_path_factory.mktemp("transformers")
    cache = {}

    def get(family):
        if family not in cache:
            class_name, kwargs = FAMILIES[family]
            kwargs = {**_COMMON, **kwargs}
            kwargs["rope_parameters"] = {
                "rope_type": "default",
                **kwargs.get("rope_parameters", {}),
            }
            kwargs["rope_parameters"]["rope_theta"] = THETA
            torch.manual_seed(0)
            cls = getattr(transformers, class_name)
            config = cls.config_class(**kwargs)
            model = cls(config).eval()
            _randomize_biases(model)
            folders = {}
            for style in ("5", "4"):
                folder = root / f"{family}-{style}"
                model.save_pretrained(folder)
                write_tokenizer(folder)
                if style == "4":
                    saved = json.loads((folder / "config.json").read_text())
                    assert "rope_parameters" in saved, "transformers 5 writes rope_parameters"
                    (folder / "config.json").write_text(
                        json.dumps(_as_transformers_4(saved, family), indent=2)
                    )
                folders[style] = folder
            cache[family] = (model, folders)
        return cache[family]

    return get


def _randomize_biases(model):
    """Zero-initialized extras (routing correction bias, gpt-oss sinks and
    biases) made random, so they are tested too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("e_score_correction_bias", "sinks", "_bias", ".bias")):
                p.copy_(torch.randn_like(p) * 0.1)


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    """converted(family, style, tool, *flags) -> folder, made once."""
    root = tmp_path_factory.mktemp("converted")
    cache = {}

    def get(family, style, tool, *flags):
        key = (family, style, tool, flags)
        if key not in cache:
            source = checkpoints(family)[1][style]
            out = root / "-".join([family, style, tool, *flags])
            if tool == "stock" and family in STOCK_CANNOT_READ:
                source = _as_stock_reads(source, family, root / f"{family}-{style}-readable")
            argv = ["--hf-path", str(source), "--mlx-path", str(out), *flags]
            if tool == "odmoe":
                assert main(argv) == 0
            else:
                from mlx_lm.convert import configure_parser
                from mlx_lm.convert import convert as stock_convert

                args = vars(configure_parser().parse_args(argv))
                stock_convert(**{k: v for k, v in args.items() if v is not None})
            cache[key] = out
        return cache[key]

    return get


def _as_stock_reads(folder: Path, family: str, out: Path) -> Path:
    """A copy of ``folder`` in the layout stock mlx-lm's sanitize reads."""
    if not out.exists():
        shutil.copytree(folder, out)
        for f in out.glob("*.safetensors"):
            mx.save_safetensors(str(f), as_sanitize_reads(family, mx.load(str(f))))
    return out


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].numpy()


def _mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array([PROMPT]))[0])


@pytest.mark.parametrize("style", ["5", "4"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(checkpoints, converted, family, style):
    torch_model, _ = checkpoints(family)
    model, _ = mlx_lm_odmoe.load(converted(family, style, "odmoe"))
    want, got = _torch_logits(torch_model), _mlx_logits(model)
    assert np.abs(want).max() > 0.5  # logits large enough for a wrong rope to show
    assert np.abs(want - got).max() <= 1e-4


# transformers' unquantized gpt-oss layout (fused experts as x @ W): stock
# mlx-lm's sanitize reads only OpenAI's MXFP4 release layout. Compared with
# mlx_lm.convert of the same tensors put in that layout.
STOCK_CANNOT_READ = {"gpt_oss"}


@pytest.mark.parametrize(
    "flags", [(), ("-q",), ("-q", "--q-bits", "3", "--q-group-size", "32")], ids=["f32", "q4", "q3"]
)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_equals_mlx_lm_convert_with_experts_split_out(converted, family, flags):
    """The transformers 4 style, which stock mlx-lm reads."""
    stock, _ = mlx_lm.load(str(converted(family, "4", "stock", *flags)))
    model, _ = mlx_lm_odmoe.load(converted(family, "4", "odmoe", *flags))
    want, got = prefill_and_decode(stock, PROMPT), prefill_and_decode(model, PROMPT)
    assert all(mx.array_equal(w, g).item() for w, g in zip(want, got))


def test_mlx_lm_generate_runs_converted_folders(converted):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    generate = Path(sys.executable).parent / "mlx_lm.generate"
    for family in ("qwen3_moe", "mixtral", "deepseek_v3"):
        folder = converted(family, "5", "odmoe")
        proc = subprocess.run(
            [str(generate), "--model", str(folder), "--prompt", "def f", "--max-tokens", "8"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        text = proc.stdout.split("==========")[1].strip()
        assert text, (family, proc.stdout)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_mlx_lm_folder_of_a_transformers_5_checkpoint_runs_right(checkpoints, converted, family):
    """mlx_lm.convert copies the transformers 5 config as it is; in place and
    converted again, odmoe reads its rope (stock mlx-lm does not)."""
    torch_model, _ = checkpoints(family)
    stock_folder = converted(family, "5", "stock")
    want = _torch_logits(torch_model)
    in_place, _ = mlx_lm_odmoe.load(stock_folder)
    assert np.abs(want - _mlx_logits(in_place)).max() <= 1e-4
    out = stock_folder.parent / f"{stock_folder.name}-odmoe"
    assert main(["--hf-path", str(stock_folder), "--mlx-path", str(out)]) == 0
    assert np.abs(want - _mlx_logits(mlx_lm_odmoe.load(out)[0])).max() <= 1e-4
    stock, _ = mlx_lm.load(str(stock_folder))
    assert np.abs(want - _mlx_logits(stock)).max() > 1e-2


# Every tiny architecture config transformers has a causal-LM class for,
# built by that class and saved by it (transformers 5 style).
ARCHS_DIR = Path(__file__).parent / "data" / "archs"
ARCHS = sorted(p.stem for p in ARCHS_DIR.glob("*.json"))
# Where stock mlx-lm's model gives the same logits as ours (or refuses the
# checkpoint as well), and transformers' differ.
STOCK_DIFFERS = {
    "deepseek_v32": "stock mlx-lm's logits are ours, 0.1 from transformers' (sparse-attention indexer)",
    "ernie4_5_moe": "stock mlx-lm's logits are ours, 1.0 from transformers'",
    "jamba": "stock mlx-lm's logits are ours, 1.4 from transformers'",
    "phimoe": "stock mlx-lm's logits are ours, 2.3 from transformers' (longrope)",
    "gpt_oss": "mlx-lm's yarn rope ignores rope_scaling.truncate = false: 6e-3 from transformers'",
    "lfm2_moe": "transformers saves an lm_head mlx-lm's lfm2_moe lacks (stock refuses it too)",
    "mimo_v2_flash": "transformers' attention_sink_bias is not in mlx-lm's model (stock refuses it too)",
    "llama4": "transformers saves the text model as llama4_text, a type mlx-lm lacks",
    "gemma4_text": "config restructured by transformers 5 (see test_config_fidelity)",
    "granitemoehybrid": "config restructured by transformers 5 (see test_config_fidelity)",
}


def _transformers_model(arch):
    config = json.loads((ARCHS_DIR / f"{arch}.json").read_text())
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    try:
        hf_config = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
        hf_config.initializer_range = _COMMON["initializer_range"]
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, AssertionError) as e:  # no such class, or not from this config
        pytest.skip(f"transformers builds no causal LM from {arch}.json: {str(e)[:80]}")
    model = model.eval().float()
    _randomize_biases(model)
    prompt = [t % config["vocab_size"] for t in PROMPT]
    try:
        with torch.no_grad():
            return model, prompt, model(torch.tensor([prompt])).logits[0].numpy()
    except RuntimeError as e:
        pytest.skip(f"transformers' {arch} does not run on this tiny config: {str(e)[:80]}")


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param(a, marks=pytest.mark.xfail(reason=STOCK_DIFFERS[a], strict=True))
        if a in STOCK_DIFFERS
        else a
        for a in ARCHS
    ],
)
def test_every_architecture_saved_by_transformers_matches_it(arch, tmp_path):
    model, prompt, want = _transformers_model(arch)
    model.save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf")
    assert main(["--hf-path", str(tmp_path / "hf"), "--mlx-path", str(tmp_path / "odmoe")]) == 0
    got = mlx_lm_odmoe.load(tmp_path / "odmoe")[0](mx.array([prompt]))[0]
    assert np.abs(want - np.array(got)).max() <= 1e-4

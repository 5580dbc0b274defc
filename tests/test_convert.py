"""Converters: HF and mlx-lm checkpoints in, the sharded layout out."""

import json
import subprocess
import sys
from pathlib import Path

import mlx_lm
import pytest
from logits import max_abs_diff, prefill_and_decode, prompt_tokens

import mlx_lm_odmoe
from mlx_lm_odmoe.backend import expert_float_dtype, has_gpu
from mlx_lm_odmoe.conversion.convert import convert, main
from mlx_lm_odmoe.models import kimi_k2_odmoe
from mlx_lm_odmoe.tools.synthetic import TINY_KIMI, TINY_QWEN2_MOE, hf_weights, write_hf_checkpoint

DATA = Path(__file__).parent / "data"
cpu_only = pytest.mark.skipif(has_gpu(), reason="MLX's CPU backend only (no GPU)")


@pytest.mark.parametrize("source_dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_convert_like_mlx_lm_convert(tmp_path, source_dtype):
    """--dtype float32 of a f16/bf16 checkpoint equals mlx_lm.convert's."""
    from mlx_lm.convert import convert as stock_convert

    hf = write_hf_checkpoint(tmp_path / "hf", TINY_QWEN2_MOE, seed=2, dtype=source_dtype)
    stock_convert(str(hf), str(tmp_path / "stock"), dtype="float32")
    convert(hf, tmp_path / "od", dtype="float32", progress=False)
    stock, _ = mlx_lm.load(str(tmp_path / "stock"))
    model, _ = mlx_lm_odmoe.load(tmp_path / "od", expert_cache="50%")
    prompt = prompt_tokens(20)
    assert max_abs_diff(prefill_and_decode(stock, prompt), prefill_and_decode(model, prompt)) == 0.0


def test_kimi_k25_checkpoint_with_nested_text_config(tmp_path):
    """K2.5 nests the language model (config text_config, weights under
    language_model.); it converts to a flat kimi_k2_odmoe folder."""
    hf = tmp_path / "hf"
    weights = {f"language_model.{k}": v for k, v in hf_weights(TINY_KIMI, seed=3).items()}
    config = {
        "model_type": "kimi_k25",
        "architectures": ["KimiK25ForConditionalGeneration"],
        "text_config": TINY_KIMI,
    }
    write_hf_checkpoint(hf, config, weights=weights)
    convert(hf, tmp_path / "od", progress=False)
    flat = write_hf_checkpoint(tmp_path / "flat", TINY_KIMI, seed=3)
    stock, _ = mlx_lm.load(str(flat))
    model, _ = mlx_lm_odmoe.load(tmp_path / "od", expert_cache="min")
    prompt = prompt_tokens(12)
    assert max_abs_diff(prefill_and_decode(stock, prompt), prefill_and_decode(model, prompt)) == 0.0


@pytest.mark.parametrize("name", ["kimi-k2.5.config.json"])
def test_real_kimi_configs_are_accepted(name):
    config = json.loads((DATA / name).read_text())
    config["model_type"] = "kimi_k2_odmoe"
    args = kimi_k2_odmoe.ModelArgs.from_dict(config)
    assert (args.n_routed_experts, args.num_experts_per_tok, args.first_k_dense_replace) == (
        384,
        8,
        1,
    )
    assert args.routed_scaling_factor == 2.827 and args.kv_lora_rank == 512


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    write_hf_checkpoint(tmp_path / "hf", TINY_QWEN2_MOE, seed=4)
    weights = hf_weights(TINY_QWEN2_MOE, seed=4)
    del weights["model.layers.2.mlp.experts.5.down_proj.weight"]
    write_hf_checkpoint(tmp_path / "broken", TINY_QWEN2_MOE, weights=weights)
    with pytest.raises(ValueError, match="layer 2 expert 5"):
        convert(tmp_path / "broken", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "hf"]


def test_refuses_to_overwrite_and_rejects_dense_models(tmp_path):
    hf = write_hf_checkpoint(tmp_path / "hf", TINY_QWEN2_MOE, seed=5)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert(hf, tmp_path / "out", progress=False)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["model_type"] = "llama"
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'llama' is not supported"):
        convert(hf, tmp_path / "out2", progress=False)


def test_cli_help_and_errors(tmp_path):
    exe = [sys.executable, "-m", "mlx_lm_odmoe.conversion.convert"]
    help_text = subprocess.run(exe + ["--help"], capture_output=True, text=True).stdout
    assert "--q-bits" in help_text and "--dtype" in help_text and "--hf-path" in help_text
    proc = subprocess.run(
        exe + ["--hf-path", str(tmp_path / "nope"), "--mlx-path", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "nope" in proc.stderr and not (tmp_path / "o").exists()


def test_kimi_with_yarn_rope_loads_through_stock_mlx_lm(tmp_path):
    """Real Kimi K2 configs use yarn rope scaling; the tokenizer loads and
    the model generates through plain mlx_lm.load."""
    config = dict(
        TINY_KIMI,
        rope_scaling={
            "type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )
    hf = write_hf_checkpoint(tmp_path / "hf", config, seed=6)
    convert(hf, tmp_path / "od", progress=False)
    model, tok = mlx_lm.load(str(tmp_path / "od"))
    assert len(mlx_lm.generate(model, tok, prompt="def hello", max_tokens=4)) > 0


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-kimi"])
def test_trained_models_exported_to_hf_convert_back_exactly(tmp_path, name):
    """The shipped trained models, as Hugging Face checkpoints (learned
    routing, real tokenizer): HF -> convert -> load equals stock mlx-lm
    loading the HF checkpoint, at a budget where experts stream."""
    from mlx_lm_odmoe.tools.synthetic import export_hf

    hf = export_hf(Path(__file__).parent.parent / "models" / name, tmp_path / "hf")
    convert(hf, tmp_path / "od", progress=False)
    stock, tok = mlx_lm.load(str(hf))
    model, _ = mlx_lm_odmoe.load(tmp_path / "od", expert_cache="25%")
    prompt = tok.encode("def parse(self, text):\n    ")
    assert max_abs_diff(prefill_and_decode(stock, prompt), prefill_and_decode(model, prompt)) == 0.0
    assert mlx_lm_odmoe.stats(model)["misses"] > 0


# --- Float type defaults and what this machine's MLX can run ---------------------


def _expert_dtype(folder) -> str:
    from mlx_lm_odmoe.layout import load_layout

    return expert_float_dtype(load_layout(Path(folder) / "experts"))


def test_default_dtype_is_float32_without_a_gpu_else_the_sources(tmp_path):
    hf = write_hf_checkpoint(tmp_path / "hf", TINY_QWEN2_MOE, seed=2, dtype="float16")
    out = convert(hf, tmp_path / "od", progress=False)
    want = "float16" if has_gpu() else "float32"
    assert _expert_dtype(out) == want
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == want
    model, tok = mlx_lm_odmoe.load(out)
    assert len(mlx_lm.generate(model, tok, prompt="def f(", max_tokens=4)) > 0


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "quantized"])
def test_explicit_half_dtype_warns_when_mlx_has_no_gpu(tmp_path, capsys, quantize):
    hf = write_hf_checkpoint(tmp_path / "hf", TINY_QWEN2_MOE, seed=2)
    argv = ["--hf-path", str(hf), "--mlx-path", str(tmp_path / "od"), "--dtype", "float16"]
    assert main(argv + ["-q"] * quantize) == 0
    err = capsys.readouterr().err
    if has_gpu():
        assert "warning" not in err
        return
    problem = "scales are several times slower" if quantize else "experts will not run on this"
    assert f"warning: --dtype float16: float16 {problem}" in err
    assert "MLX CPU backend" in err and "--dtype float32 (the default on this machine)" in err


@cpu_only
def test_half_precision_experts_are_refused_on_cpu_with_the_command_that_fixes_it(
    tmp_path, monkeypatch
):
    """Stock mlx-lm fails mid-generation ([GatherMM::eval] float32 only); odmoe
    refuses at load, and the command it gives yields the float32 model."""
    import shlex

    from mlx_lm_odmoe.errors import BackendError

    hf = write_hf_checkpoint(tmp_path / "hf", TINY_QWEN2_MOE, seed=2, dtype="float16")
    half = convert(hf, tmp_path / "half", dtype="float16", progress=False)
    with pytest.raises(BackendError, match="float16 experts will not run") as e:
        mlx_lm.load(str(half))
    command = str(e.value).rsplit(": ", 1)[1]
    assert command.startswith("mlx_lm_odmoe.convert ") and "--dtype float32" in command
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(command)[1:]) == 0
    fixed, _ = mlx_lm_odmoe.load(tmp_path / "half-float32", expert_cache="50%")
    direct, _ = mlx_lm_odmoe.load(convert(hf, tmp_path / "f32", dtype="float32", progress=False))
    prompt = prompt_tokens(16)
    assert max_abs_diff(prefill_and_decode(direct, prompt), prefill_and_decode(fixed, prompt)) == 0


@cpu_only
def test_quantized_experts_with_half_scales_load_on_cpu_with_a_warning(tmp_path, caplog):
    hf = write_hf_checkpoint(tmp_path / "hf", TINY_QWEN2_MOE, seed=2)
    out = convert(hf, tmp_path / "q", quantize=True, dtype="bfloat16", progress=False)
    with caplog.at_level("WARNING", logger="mlx_lm_odmoe"):
        model, tok = mlx_lm_odmoe.load(out)
    assert "bfloat16 scales are several times slower" in caplog.text
    assert "--dtype float32" in caplog.text
    assert len(mlx_lm.generate(model, tok, prompt="def f(", max_tokens=4)) > 0


# --- Chat templates and bad sources ------------------------------------------------

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize(
    "where", ["tokenizer_config.json", "chat_template.jinja", "chat_template.json"]
)
def test_converted_folder_keeps_the_sources_chat_template(tmp_path, where):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    hf = write_hf_checkpoint(tmp_path / "hf", TINY_QWEN2_MOE, seed=2)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    if where != "tokenizer_config.json":
        del config["chat_template"]
        text = TEMPLATE if where.endswith(".jinja") else json.dumps({"chat_template": TEMPLATE})
        (hf / where).write_text(text)
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    out = convert(hf, tmp_path / "od", dtype="float32", progress=False)
    assert load_tokenizer(out).chat_template == TEMPLATE


def _convert_cli(*args):
    exe = [sys.executable, "-m", "mlx_lm_odmoe.conversion.convert"]
    return subprocess.run(exe + [str(a) for a in args], capture_output=True, text=True)


def test_a_missing_source_folder_is_named_as_missing(tmp_path):
    proc = _convert_cli("--hf-path", tmp_path / "nope", "--mlx-path", tmp_path / "o")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {tmp_path / 'nope'}: no such folder" in proc.stderr
    assert ".safetensors" not in proc.stderr and not (tmp_path / "o").exists()


def test_converting_a_converted_folder_says_it_runs_as_is(models, tmp_path):
    od = models("qwen2_moe", "odmoe")
    proc = _convert_cli("--hf-path", od, "--mlx-path", tmp_path / "o")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{od} is already converted" in proc.stderr and "it runs as is" in proc.stderr
    assert "no routed experts" not in proc.stderr and not (tmp_path / "o").exists()


def test_a_converted_folder_recasts_exactly(models, tmp_path):
    """--dtype on a converted folder re-casts it; to its own float32, the
    files come out the same."""
    od = models("qwen2_moe", "odmoe")
    again = convert(od, tmp_path / "again", dtype="float32", progress=False)
    assert (again / "experts" / "index.json").read_bytes() == (
        od / "experts" / "index.json"
    ).read_bytes()
    assert (again / "model.safetensors").read_bytes() == (od / "model.safetensors").read_bytes()
    assert json.loads((again / "config.json").read_text()) == json.loads(
        (od / "config.json").read_text()
    )

"""mlx_lm_odmoe.inflate: the shipped models with wider experts compute what
the small models compute, so they make an I/O-bound testbed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from logits import prefill_and_decode, prompt_tokens

import mlx_lm_odmoe
from mlx_lm_odmoe.store.readers import ShardedFolderReader
from mlx_lm_odmoe.store.records import record_to_arrays
from mlx_lm_odmoe.tools.inflate import inflate

MODELS = Path(__file__).parent.parent / "models"
BIN = Path(sys.executable).parent
SHIPPED = ["tiny-qwen2-moe", "tiny-kimi"]


@pytest.fixture(scope="module")
def inflated(tmp_path_factory):
    """inflated(name, quantized) -> the shipped model at twice its expert width."""
    root, cache = tmp_path_factory.mktemp("inflated"), {}

    def get(name, quantized=False):
        if (name, quantized) not in cache:
            out = root / f"{name}-{'q' if quantized else 'f32'}"
            width = 2 * config_of(MODELS / name)["moe_intermediate_size"]
            inflate(MODELS / name, out, width, keep_quantized=quantized, progress=False)
            cache[name, quantized] = out
        return cache[name, quantized]

    return get


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def greedy_tokens(model, tokenizer, n=16):
    return [
        r.token for r in mlx_lm.stream_generate(model, tokenizer, "def fibonacci(n):", max_tokens=n)
    ]


def expert(folder: Path, layer: int, e: int) -> dict:
    reader = ShardedFolderReader(folder)
    try:
        return record_to_arrays(reader.read(layer, e), reader.layout)
    finally:
        reader.close()


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "q4"])
@pytest.mark.parametrize("name", SHIPPED)
def test_inflated_model_generates_the_small_models_tokens_and_logits(inflated, name, quantized):
    """Greedy tokens are equal and logits agree to float rounding.

    The extra units' outputs meet exactly-zero down_proj columns, so they add
    exact zeros; what may differ is rounding, because each down_proj sum runs
    over a longer intermediate axis that a kernel may tile or split
    differently (and float experts go through the float gather kernel, not
    the quantized one). MLX's CPU kernels happen to give identical bits at
    these sizes; the bound is what holds for any kernel."""
    small, tok = mlx_lm_odmoe.load(MODELS / name, expert_cache="100%")
    wide, wide_tok = mlx_lm_odmoe.load(inflated(name, quantized), expert_cache="100%")
    assert greedy_tokens(wide, wide_tok) == greedy_tokens(small, tok)
    prompt = prompt_tokens(24)
    ref, got = prefill_and_decode(small, prompt), prefill_and_decode(wide, prompt)
    scale = max(float(mx.abs(x).max()) for x in ref)
    assert max(float(mx.abs(x - y).max()) for x, y in zip(ref, got)) < 1e-4 * scale


@pytest.mark.parametrize("name", SHIPPED)
def test_float_experts_are_the_dequantized_source_plus_random_rows_and_zero_columns(inflated, name):
    src = MODELS / name
    inter, width = (
        config_of(src)["moe_intermediate_size"],
        config_of(inflated(name))["moe_intermediate_size"],
    )
    q = config_of(src)["quantization"]
    layer = json.loads((src / "experts" / "index.json").read_text())["moe_layers"][-1]
    small, wide = expert(src, layer, 3), expert(inflated(name), layer, 3)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        real = mx.dequantize(
            small[f"{proj}.weight"],
            small[f"{proj}.scales"],
            small[f"{proj}.biases"],
            group_size=q["group_size"],
            bits=q["bits"],
        )
        w = wide[f"{proj}.weight"]
        assert w.dtype == mx.float32 and f"{proj}.scales" not in wide
        if proj == "down_proj":
            assert w.shape == (real.shape[0], width)
            assert mx.array_equal(w[:, :inter], real) and not mx.any(w[:, inter:]).item()
        else:
            assert w.shape == (width, real.shape[1]) and mx.array_equal(w[:inter], real)
            spread = float(np.std(np.array(w[inter:]))) / float(np.std(np.array(real)))
            assert 0.8 < spread < 1.25  # scaled like the real rows


@pytest.mark.parametrize("name", SHIPPED)
def test_quantized_inflation_keeps_the_source_bytes_and_zeroes_the_extra_down_groups(
    inflated, name
):
    src = MODELS / name
    layer = json.loads((src / "experts" / "index.json").read_text())["moe_layers"][0]
    small, wide = expert(src, layer, 5), expert(inflated(name, quantized=True), layer, 5)
    for key, a in small.items():
        b = wide[key]
        axis = 1 if key.startswith("down_proj.") else 0
        assert b.shape[axis] == 2 * a.shape[axis]
        kept = b[:, : a.shape[1]] if axis else b[: a.shape[0]]
        assert mx.array_equal(kept, a), key
        if axis and not key.endswith(".weight"):  # zero scales and biases: the columns are 0
            assert not mx.any(b[:, a.shape[1] :]).item(), key


@pytest.mark.parametrize("name", SHIPPED)
def test_record_size_and_config_describe_the_wider_experts(inflated, name):
    src, out, out_q = MODELS / name, inflated(name), inflated(name, quantized=True)
    small = config_of(src)
    D, width = small["hidden_size"], 2 * small["moe_intermediate_size"]
    for folder, record in ((out, 3 * width * D * 4), (out_q, 2 * small["odmoe"]["expert_bytes"])):
        config = config_of(folder)
        assert config["moe_intermediate_size"] == width
        assert config["odmoe"]["expert_bytes"] == record
        index = json.loads((folder / "experts" / "index.json").read_text())
        assert index["record_nbytes"] == record
        assert (
            config["odmoe"]["inflated_from"]["moe_intermediate_size"]
            == small["moe_intermediate_size"]
        )
        assert config["odmoe"]["inflated_from"]["width"] == width
    assert config_of(out)["quantization"] == small["quantization"]  # the resident part's


def test_a_trained_shadow_model_and_the_tokenizer_are_copied(inflated):
    for name in SHIPPED:
        for f in ("shadow.json", "shadow.safetensors", "tokenizer.json"):
            assert (inflated(name) / f).read_bytes() == (MODELS / name / f).read_bytes()


def test_qwen_keeps_its_shared_expert_and_kimi_widens_its_tied_one(inflated):
    """Qwen2-MoE sizes its shared expert with shared_expert_intermediate_size;
    deepseek_v3 with moe_intermediate_size * n_shared_experts, so Kimi's
    resident shared experts widen too (zero down_proj groups)."""
    qwen = inflated("tiny-qwen2-moe")
    assert (qwen / "model.safetensors").read_bytes() == (
        MODELS / "tiny-qwen2-moe" / "model.safetensors"
    ).read_bytes()
    small, wide = (
        mx.load(str(MODELS / "tiny-kimi" / "model.safetensors")),
        mx.load(str(inflated("tiny-kimi") / "model.safetensors")),
    )
    key = "model.layers.1.mlp.shared_experts.down_proj"
    assert wide[f"{key}.weight"].shape[1] == 2 * small[f"{key}.weight"].shape[1]
    cols = small[f"{key}.scales"].shape[1]
    assert (
        not mx.any(wide[f"{key}.scales"][:, cols:]).item()
        and not mx.any(wide[f"{key}.biases"][:, cols:]).item()
    )
    assert set(wide) == set(small)
    for k in small:
        if ".shared_experts." not in k:
            assert mx.array_equal(wide[k], small[k]), k


def run_inflate(*args):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(BIN / "mlx_lm_odmoe.inflate"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_the_command_prints_the_sizes_and_refuses_bad_input_without_a_traceback(tmp_path):
    src = MODELS / "tiny-qwen2-moe"
    ok = run_inflate("--from", src, "--width", 256, "-q", tmp_path / "wide")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "122880 bytes" in ok.stdout and " MB on disk" in ok.stdout  # 2 x 61440-byte records
    new = tmp_path / "other"
    for args, message in [
        (
            (src, "--width", 100, new),
            "--width 100 is smaller than the model's moe_intermediate_size",
        ),
        ((src, "--width", 160, "-q", new), "must be a multiple of 64"),
        ((src, "--width", 256, tmp_path / "wide"), "already exists"),
        ((tmp_path / "missing", "--width", 256, new), "no such model folder"),
    ]:
        proc = run_inflate("--from", *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "error: " in proc.stderr and message in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide"]  # nothing half-written


def test_the_inflated_qwen_model_exports_as_a_gguf_with_the_same_float_experts(inflated, tmp_path):
    """The llama.cpp race runs on the same weights: the GGUF's expert
    tensors are the inflated model's float32 experts, stacked per layer."""
    from gguf import GGUFReader

    from mlx_lm_odmoe.tools.large_synthetic import export_gguf

    folder = inflated("tiny-qwen2-moe")
    path = export_gguf(folder, tmp_path / "wide.gguf", progress=False)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    reader = ShardedFolderReader(folder)
    layer = reader.layout.moe_layers[-1]
    up = tensors[f"blk.{layer}.ffn_up_exps.weight"]
    assert up.tensor_type.name == "F32"
    want = record_to_arrays(reader.read(layer, 3), reader.layout)["up_proj.weight"]
    got = np.asarray(up.data).reshape(-1, *want.shape)[3]
    assert np.array_equal(got, np.array(want))

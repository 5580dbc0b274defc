"""Smoke tests of the measuring tools: they run and write what they promise.
No timing is asserted here; timings belong in benchmarks/."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_lm_odmoe.tools import bench, doctor, large_synthetic
from tests.conftest import DATA

SHIPPED = Path(__file__).resolve().parent.parent / "models"


def run_cli(command, *args):
    """Run an installed console script, as a user would."""
    exe = Path(sys.executable).parent / command
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A tiny-preset model from large_synthetic, plus its stock and GGUF copies."""
    root = tmp_path_factory.mktemp("synth")
    model = root / "model"
    large_synthetic.main(
        [
            "--preset",
            large_synthetic.TINY_PRESET,
            "--out",
            str(model),
            "--no-progress",
            "--stock",
            str(root / "stock"),
            "--gguf",
            str(root / "model.gguf"),
        ]
    )
    return root


def test_large_synthetic_loads_and_generates(synth):
    import mlx_lm

    import mlx_lm_odmoe

    model, tok = mlx_lm_odmoe.load(synth / "model", expert_cache="50%")
    text = mlx_lm.generate(model, tok, prompt="def f(x):", max_tokens=4)
    assert isinstance(text, str)
    assert mlx_lm_odmoe.stats(model)["misses"] > 0


def test_large_synthetic_copies_hold_the_same_weights(synth):
    import mlx.core as mx
    import mlx_lm
    from gguf import GGUFReader
    from gguf.quants import dequantize

    import mlx_lm_odmoe

    od, _ = mlx_lm_odmoe.load(synth / "model", expert_cache="50%")
    stock, _ = mlx_lm.load(str(synth / "stock"))
    x = mx.array([[1, 2, 3, 4, 5]])
    assert mx.array_equal(od(x), stock(x)).item()

    tensors = {t.name: t for t in GGUFReader(synth / "model.gguf").tensors}
    sw = stock.model.layers[1].mlp.switch_mlp.down_proj
    want = np.array(mx.dequantize(sw.weight, sw.scales, sw.biases, 64, 4))
    got = tensors["blk.1.ffn_down_exps.weight"]
    assert np.array_equal(dequantize(got.data, got.tensor_type).reshape(want.shape), want)


def test_bench_quick_writes_table_and_plot(synth, tmp_path):
    out = tmp_path / "bench"
    assert (
        bench.main(
            ["--model", str(synth / "model"), "--quick", "--budgets", "100%,50%", "--out", str(out)]
        )
        == 0
    )
    table = (out / "results.md").read_text()
    for name in ("resident (MemoryStore)", "odmoe@100%", "odmoe@50%", "decode tok/s", "hit rate"):
        assert name in table
    assert (out / "residency.png").stat().st_size > 0
    rows = json.loads((out / "results.json").read_text())["summary"]
    assert [r["status"] for r in rows] == ["ok"] * 3
    # Same ids, greedy, EOS banned: every contender makes the same tokens.
    assert all(r["tokens"] == rows[0]["tokens"] and len(r["tokens"]) == 8 for r in rows)
    # A smoke run says it is one, how far to trust it, and what to run instead.
    notes = json.loads((out / "results.json").read_text())["meta"]["notes"]
    for text in (table, notes[0]):
        assert "indicative only" in text and "not measured (1 repetition)" in text
        assert "run without --quick" in text and "Load average" in text
    # The all-resident baseline is a reference line, not a point of the odmoe curve.
    series = bench.plot_series(rows)
    assert [x for x, _, _ in series["odmoe"]] == [50.0, 100.0]
    odmoe_100 = next(r for r in rows if r["name"] == "odmoe@100%")
    assert series["odmoe"][-1][1] == odmoe_100["decode_tok_s"]
    assert series["references"] == [("resident (MemoryStore)", rows[0]["decode_tok_s"])]


def test_bench_plot_draws_baselines_apart_from_the_odmoe_curve():
    rows = [
        {
            "name": "stock mlx-lm",
            "kind": "stock",
            "residency": 1.0,
            "decode_tok_s": 90.0,
            "hit_rate": 1.0,
        },
        {
            "name": "odmoe@100%",
            "kind": "odmoe",
            "residency": 1.0,
            "decode_tok_s": 80.0,
            "hit_rate": 1.0,
        },
        {
            "name": "odmoe@25%",
            "kind": "odmoe",
            "residency": 0.25,
            "decode_tok_s": 20.0,
            "hit_rate": 0.4,
        },
        {"name": "llama.cpp (mmap)", "kind": "llamacpp", "decode_tok_s": 50.0},
    ]
    series = bench.plot_series(rows)
    assert series["odmoe"] == [(25.0, 20.0, 0.4), (100.0, 80.0, 1.0)]
    assert series["references"] == [("stock mlx-lm", 90.0), ("llama.cpp (mmap)", 50.0)]


def test_bench_spread_note_reports_the_spread_between_repetitions():
    rows = [
        {
            "name": "odmoe@50%",
            "decode_tok_s": 40.0,
            "decode_tok_s_min": 30.0,
            "decode_tok_s_max": 50.0,
        },
        {
            "name": "odmoe@100%",
            "decode_tok_s": 80.0,
            "decode_tok_s_min": 78.0,
            "decode_tok_s_max": 82.0,
        },
    ]
    assert bench.spread_note(rows, 3) == (
        "Decode tok/s varied by up to 50% of the median between repetitions "
        "(odmoe@50%: 30.00 to 50.00 tok/s)."
    )


def test_bench_on_a_missing_folder_says_so(tmp_path):
    for args in ([tmp_path / "does-not-exist"], ["--model", "does-not-exist"]):
        proc = run_cli("mlx_lm_odmoe.bench", *args, "--out", tmp_path / "out")
        assert proc.returncode == 2
        assert "does-not-exist does not exist" in proc.stderr and "org/name" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_doctor_refuses_a_folder_the_loader_would_refuse(tmp_path):
    folder = tmp_path / "tiny-qwen2-moe"
    shutil.copytree(SHIPPED / "tiny-qwen2-moe", folder)
    shard = next((folder / "experts").glob("experts-*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    proc = run_cli("mlx_lm_odmoe.doctor", folder, "--no-probe")
    assert proc.returncode == 2
    assert f"{shard.name}: expert shard is" in proc.stderr and "truncated" in proc.stderr
    assert "fits entirely" not in proc.stdout and "Traceback" not in proc.stderr


def test_doctor_on_a_model_folder(synth, capsys):
    assert doctor.main([str(synth / "model"), "--probe-mb", "8", "--memory", "8GB"]) == 0
    out = capsys.readouterr().out
    for line in (
        "resident weights",
        "routed experts",
        "KV cache",
        "expert budget",
        "expected decode",
        "how far to trust it   measured decode was",
    ):
        assert line in out


def test_doctor_forecasts_kimi_from_its_config(capsys):
    args = [
        "--config",
        str(DATA / "kimi-k2.5.config.json"),
        "--memory",
        "64GB",
        "--disk-gbps",
        "2",
        "--compute-gbps",
        "100",
        "--json",
    ]
    assert doctor.main(args) == 0
    f = json.loads(capsys.readouterr().out)["forecast"]
    assert f["expert_bytes"] > 400e9 and not f["fits_entirely"] and f["runs"]
    assert 0 < f["residency"] < 0.2 and f["tok_s"] > 0


def run_moe_vs_dense(*args):
    script = SHIPPED.parent / "benchmarks" / "moe_vs_dense.py"
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_moe_vs_dense_benchmark_writes_its_table_and_plot(tmp_path):
    args = ["--shapes", "tiny-qwen2-moe", "--reps", "1", "--min-time", "0", "--prefill", "16"]
    proc = run_moe_vs_dense(*args, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "results.md").read_text()
    for precision in ("float32", "4bit"):
        for layer in ("moe", "moe-odmoe", "dense-total", "dense-active"):
            assert f"| tiny-qwen2-moe | {precision} | {layer} |" in table
    assert "Load average" in table and "not measured (1 repetition)" in table
    assert (tmp_path / "moe_vs_dense.png").stat().st_size > 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    flops = {r["layer"]: r["flops_per_token"] for r in rows if r["precision"] == "float32"}
    # The MoE layer does a token's share of the work: the dense-active layer's
    # FLOPs plus its router and shared-expert gate, a small fraction of dense-total's.
    assert flops["moe"] == flops["moe-odmoe"]
    assert flops["dense-active"] < flops["moe"] < 1.02 * flops["dense-active"]
    assert flops["dense-total"] > 5 * flops["moe"]
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows)


def test_moe_vs_dense_benchmark_names_an_unknown_shape(tmp_path):
    proc = run_moe_vs_dense("--shapes", "tiny-mixtral", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "error: --shapes: unknown shape 'tiny-mixtral'" in proc.stderr
    assert "tiny-qwen2-moe" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_doctor_takes_the_hit_rate_from_earlier_runs_routes_when_it_has_them(
    synth, capsys, monkeypatch, tmp_path
):
    import numpy as np

    from mlx_lm_odmoe import warm_start
    from mlx_lm_odmoe.layout import load_layout

    folder = synth / "model"
    args = [str(folder), "--budget", "25%", "--json", "--disk-gbps", "1", "--compute-gbps", "1"]
    args += ["--fixed-ms", "1", "--memory", "8GB"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert doctor.main(args) == 0
    f = json.loads(capsys.readouterr().out)["forecast"]
    assert f["hit_rate_from"].startswith("residency") and f["expected_hit_rate"] == f["residency"]
    layout = load_layout(folder / "experts")
    E = layout.num_experts
    skewed = np.zeros(E)
    skewed[: E // 4] = 1.0  # every route to a quarter of the experts
    warm_start.save_counts(warm_start.counts_path(folder), {l: skewed for l in layout.moe_layers})
    assert doctor.main(args) == 0
    f = json.loads(capsys.readouterr().out)["forecast"]
    assert f["hit_rate_from"].startswith("earlier runs")
    assert f["expected_hit_rate"] == min(1.0, f["slots_per_layer"] / (E // 4))


def test_doctor_says_how_to_speed_prompts_up_where_the_cpu_blas_is_the_reference_one():
    from mlx_lm_odmoe.tools.doctor import blas_hint

    hint = blas_hint({"gflops": 2.5, "device": "Device(cpu, 0)"})
    assert "LD_PRELOAD=libopenblas.so.0" in hint and "2.5 GFLOP/s" in hint
    assert blas_hint({"gflops": 60.0, "device": "Device(cpu, 0)"}) is None
    assert blas_hint({"gflops": 2.5, "device": "Device(gpu, 0)"}) is None


def test_a_contenders_peak_rss_is_its_own_not_its_parents():
    """Linux keeps the larger RSS across exec: the driver's own memory must
    not be billed to the contender it starts."""
    ballast = np.ones(512 << 20, dtype=np.uint8)  # 512 MB held by this process
    child = "from mlx_lm_odmoe.tools.bench import _peak_rss_bytes; print(_peak_rss_bytes())"
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) < 256 << 20
    del ballast


def test_the_bare_process_contender_holds_a_tokenizer_and_no_weights():
    from types import SimpleNamespace

    spec = {"name": "bare process", "kind": "bare", "path": str(SHIPPED / "tiny-qwen2-moe")}
    row = bench.run_contender(spec, SimpleNamespace(cold=False, timeout=120), None)
    assert row["status"] == "ok" and row["stats"] is None and row["tokens"] == []
    assert 0 < row["peak_rss_bytes"] < 1 << 30


def test_better_estimates_of_the_next_layers_input_recall_its_routes_better():
    """On a trained model, layer L+1's router recalls its own picks better
    from layer L's whole output than from L's MoE input (the lookahead), and
    better still once L+1's attention has run on an estimate of its input."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lookahead_ceiling", Path(__file__).parents[1] / "benchmarks" / "lookahead_ceiling.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import mlx.core as mx

    import mlx_lm_odmoe

    models = Path(__file__).parents[1] / "models"
    model, tok = mlx_lm_odmoe.load(str(models / "tiny-kimi"), expert_cache="100%")
    text = (Path(__file__).parents[1] / "README.md").read_text()
    r = mod.ceiling(model, mx.array([tok.encode(text)[:256]]))
    attention = "L+1's attention on the estimate"
    assert set(r) == {"lookahead", "+ shared expert", "+ whole MoE output", attention}
    assert all(0.0 <= v <= 1.0 for v in r.values())
    assert r["lookahead"] < r["+ whole MoE output"] < r[attention]
    before = [type(l.mlp) for l in model.model.layers]
    d = mod.decode_recall(model, mx.array([tok.encode(text)[:64]]), 24)
    assert d["lookahead"] < d[attention]  # on the real cache, while decoding
    assert [type(l.mlp) for l in model.model.layers] == before  # the model is as it was

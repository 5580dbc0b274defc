"""Smoke tests of the measuring tools: they run and write what they promise.
No timing is asserted here; timings belong in benchmarks/."""

import json

import numpy as np
import pytest

from mlx_lm_odmoe import bench, doctor, large_synthetic
from tests.conftest import DATA


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A tiny-preset model from large_synthetic, plus its stock and GGUF copies."""
    root = tmp_path_factory.mktemp("synth")
    model = root / "model"
    large_synthetic.main(["--preset", large_synthetic.TINY_PRESET, "--out", str(model), "--no-progress",
                          "--stock", str(root / "stock"), "--gguf", str(root / "model.gguf")])
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
    assert bench.main(["--model", str(synth / "model"), "--quick", "--budgets", "100%,50%", "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    for name in ("resident (MemoryStore)", "odmoe@100%", "odmoe@50%", "decode tok/s", "hit rate"):
        assert name in table
    assert (out / "residency.png").stat().st_size > 0
    rows = json.loads((out / "results.json").read_text())["summary"]
    assert [r["status"] for r in rows] == ["ok"] * 3
    # Same ids, greedy, EOS banned: every contender makes the same tokens.
    assert all(r["tokens"] == rows[0]["tokens"] and len(r["tokens"]) == 8 for r in rows)


def test_doctor_on_a_model_folder(synth, capsys):
    assert doctor.main([str(synth / "model"), "--probe-mb", "8", "--memory", "8GB"]) == 0
    out = capsys.readouterr().out
    for line in ("resident weights", "routed experts", "KV cache", "expert budget", "expected decode"):
        assert line in out


def test_doctor_forecasts_kimi_from_its_config(capsys):
    args = ["--config", str(DATA / "kimi-k2.5.config.json"), "--memory", "64GB",
            "--disk-gbps", "2", "--compute-gbps", "100", "--json"]
    assert doctor.main(args) == 0
    f = json.loads(capsys.readouterr().out)["forecast"]
    assert f["expert_bytes"] > 400e9 and not f["fits_entirely"] and f["runs"]
    assert 0 < f["residency"] < 0.2 and f["tok_s"] > 0

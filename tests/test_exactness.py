"""The odmoe model's logits are bit-identical to stock mlx-lm with every
expert resident: both model types, float32 and 4-bit, every budget, prefill
(short prompts run unsorted, long ones sorted by expert) and decode."""

import mlx_lm
import pytest
from logits import max_abs_diff, prefill_and_decode, prompt_tokens

import mlx_lm_odmoe

KINDS = ["qwen2_moe", "kimi_k2"]
BUDGETS = ["100%", "50%", "min"]
PROMPTS = [7, 48]  # 7*k routes stay unsorted, 48*k >= 64 are sorted


@pytest.fixture(scope="module")
def stock(models):
    cache = {}

    def get(kind, precision):
        key = (kind, precision)
        if key not in cache:
            src = models(kind, "hf" if precision == "f32" else "stock_q4")
            cache[key] = mlx_lm.load(str(src))[0]
        return cache[key]

    return get


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", ["f32", "q4"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_logits_bit_identical_to_stock(models, stock, kind, precision, budget):
    folder = models(kind, "odmoe" if precision == "f32" else "odmoe_q4")
    model, _ = mlx_lm_odmoe.load(folder, expert_cache=budget)
    for length in PROMPTS:
        prompt = prompt_tokens(length, seed=length)
        want = prefill_and_decode(stock(kind, precision), prompt)
        got = prefill_and_decode(model, prompt)
        assert max_abs_diff(want, got) == 0.0, (kind, precision, budget, length)
    stats = mlx_lm_odmoe.stats(model)
    if budget != "100%":
        assert stats["misses"] > 0 and stats["evictions"] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_converted_from_mlx_checkpoint_matches_stock(models, stock, kind):
    model, _ = mlx_lm_odmoe.load(models(kind, "odmoe_from_stock_q4"), expert_cache="50%")
    prompt = prompt_tokens(40, seed=3)
    assert (
        max_abs_diff(
            prefill_and_decode(stock(kind, "q4"), prompt), prefill_and_decode(model, prompt)
        )
        == 0.0
    )


@pytest.mark.parametrize("kind", KINDS)
def test_stock_checkpoint_read_in_place_matches_stock(models, stock, kind):
    """An unconverted mlx-lm checkpoint runs with on-demand experts read
    straight from its stacked switch_mlp tensors."""
    model, _ = mlx_lm_odmoe.load(models(kind, "stock_q4"), expert_cache="min")
    assert type(model).__module__.endswith("_odmoe")
    prompt = prompt_tokens(40, seed=4)
    assert (
        max_abs_diff(
            prefill_and_decode(stock(kind, "q4"), prompt), prefill_and_decode(model, prompt)
        )
        == 0.0
    )
    assert mlx_lm_odmoe.stats(model)["misses"] > 0


def test_stock_mlx_lm_load_uses_config_budget(models, stock, tmp_path):
    """Plain mlx_lm.load() honours the budget written in config.json."""
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(models("qwen2_moe", "odmoe"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["odmoe"]["expert_cache"] = "min"
    (folder / "config.json").write_text(json.dumps(cfg))
    model, _ = mlx_lm.load(str(folder))
    assert mlx_lm_odmoe.stats(model)["slots_per_layer"] == 2
    prompt = prompt_tokens(30, seed=5)
    assert (
        max_abs_diff(
            prefill_and_decode(stock("qwen2_moe", "f32"), prompt), prefill_and_decode(model, prompt)
        )
        == 0.0
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", ["f32", "q4"])
@pytest.mark.parametrize("budget", ["50%", "min"])
def test_slow_reads_streamed_and_prefetched_stay_bit_identical(
    models, stock, kind, precision, budget
):
    """Where reads are slow (the disk, not the page cache), a token's
    experts compute one by one as their reads land and the routers'
    lookahead prefetches the next layer, records read in pieces: the
    logits do not change."""
    folder = models(kind, "odmoe" if precision == "f32" else "odmoe_q4")
    odmoe = {"predictor": "on", "prefetch_min_read_ms": 0}
    model, _ = mlx_lm_odmoe.load(folder, expert_cache=budget, model_config={"odmoe": odmoe})
    store = model.expert_runtime.store
    store.inline_read_s = -1  # every read to the threads
    store.split_bytes = 4096  # and in pieces
    store.stream_min_read_s = 0  # each expert computed as it lands, however fast
    prompt = prompt_tokens(7, seed=5)
    want = prefill_and_decode(stock(kind, precision), prompt, steps=12)
    assert max_abs_diff(want, prefill_and_decode(model, prompt, steps=12)) == 0.0
    s = mlx_lm_odmoe.stats(model)
    assert s["misses"] > 0 and s["read_wait_s"] > 0
    if budget == "50%":
        assert s["prefetch"] == "on" and s["prefetched_bytes"] > 0

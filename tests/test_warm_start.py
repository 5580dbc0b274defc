"""Warm start: a restart begins with the experts earlier runs used most,
read in the background at load; outputs do not change."""

import json
import subprocess
import sys

import mlx_lm
from logits import max_abs_diff, prefill_and_decode, prompt_tokens

import mlx_lm_odmoe
from mlx_lm_odmoe import warm_start


def _run(folder, counts_file, **odmoe):
    odmoe = {"warm_start_file": str(counts_file), **odmoe}
    model, _ = mlx_lm_odmoe.load(folder, expert_cache="25%", model_config={"odmoe": odmoe})
    return model


def test_a_second_run_starts_with_the_first_runs_hottest_experts(models, tmp_path):
    folder, counts = models("qwen2_moe", "odmoe"), tmp_path / "hot.json"
    prompt = prompt_tokens(12, seed=2)
    first = _run(folder, counts)
    want = prefill_and_decode(first, prompt, steps=6)
    cold_misses = mlx_lm_odmoe.stats(first)["misses"]
    first.expert_runtime.close()  # saves the counts, as exit does
    saved = json.loads(counts.read_text())["counts"]
    assert set(map(int, saved)) == set(first.expert_runtime.store.layout.moe_layers)

    second = _run(folder, counts)
    s = mlx_lm_odmoe.stats(second)
    assert s["preloaded_bytes"] > 0
    got = prefill_and_decode(second, prompt, steps=6)
    assert max_abs_diff(want, got) == 0.0
    assert mlx_lm_odmoe.stats(second)["misses"] < cold_misses
    stock, _ = mlx_lm.load(str(models("qwen2_moe", "hf")))
    assert max_abs_diff(prefill_and_decode(stock, prompt, steps=6), got) == 0.0


def test_counts_of_earlier_runs_weigh_less_and_bad_files_are_ignored(tmp_path):
    import numpy as np

    path = tmp_path / "hot.json"
    warm_start.save_counts(path, {1: np.array([4.0, 0.0]), 2: np.array([0.0, 2.0])})
    warm_start.save_counts(path, {1: np.array([0.0, 3.0]), 2: np.array([0.0, 2.0])})
    c = warm_start.load_counts(path, [1, 2], 2)
    assert c[1].tolist() == [2.0, 3.0] and c[2].tolist() == [0.0, 3.0]
    assert warm_start.hottest(c, 1)[1].tolist() == [1]
    assert warm_start.load_counts(path, [1, 2, 3], 2) is None  # another model's shape
    path.write_text("{not json")
    assert warm_start.load_counts(path, [1, 2], 2) is None


def test_counts_are_saved_at_exit_in_the_users_cache_folder(models, tmp_path):
    folder = models("qwen2_moe", "odmoe")
    code = (
        "import mlx_lm, mlx_lm_odmoe\n"
        f"m, t = mlx_lm_odmoe.load({str(folder)!r}, expert_cache='min')\n"
        "mlx_lm.generate(m, t, prompt='def f(x):', max_tokens=3)\n"
    )
    env = dict(__import__("os").environ, XDG_CACHE_HOME=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    files = list((tmp_path / "mlx-lm-odmoe" / "hot-experts").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith(folder.name)
    import os

    os.environ["XDG_CACHE_HOME"], old = str(tmp_path), os.environ.get("XDG_CACHE_HOME")
    try:
        assert warm_start.counts_path(folder) == files[0]
    finally:
        os.environ["XDG_CACHE_HOME"] = old


def test_a_prompt_too_big_for_the_cache_ends_with_the_hottest_experts_resident(models, tmp_path):
    """A pass that cannot hold all its experts runs them coldest first and
    keeps the hot resident ones throughout, so decoding starts with the
    hottest in memory (here: hottest by earlier runs' counts)."""
    import numpy as np

    folder = models("qwen2_moe", "odmoe")
    probe = _run(folder, tmp_path / "none.json", warm_start=False)
    layout = probe.expert_runtime.store.layout
    E = layout.num_experts
    hot = {l: 1e3 * np.arange(E, dtype=np.float64) for l in layout.moe_layers}  # higher ids hotter
    path = tmp_path / "hot.json"
    warm_start.save_counts(path, hot)
    model, _ = mlx_lm_odmoe.load(
        folder, expert_cache="min", model_config={"odmoe": {"warm_start_file": str(path)}}
    )
    store = model.expert_runtime.store
    cache = __import__("mlx_lm.models.cache", fromlist=["make_prompt_cache"])
    import mlx.core as mx

    prompt = prompt_tokens(48, seed=4)
    mx.eval(model(mx.array([prompt]), cache=cache.make_prompt_cache(model)))
    for l in layout.moe_layers:
        resident = set(np.flatnonzero(store._layers[l].expert_slot >= 0).tolist())
        assert E - 1 in resident, (l, resident)

"""Prefetch: predicted experts are read ahead into a staging area that never
evicts the working set; outputs stay bit-identical to stock mlx-lm."""

import mlx.core as mx
import mlx_lm
import numpy as np
from logits import max_abs_diff, prefill_and_decode, prompt_tokens

import mlx_lm_odmoe
from mlx_lm_odmoe.predict.base import ExpertPredictor, later_layers
from mlx_lm_odmoe.store import CachedStore, ShardedFolderReader


class SameAsThisLayer(ExpertPredictor):
    """Guesses that later layers use this layer's experts (cheap, often wrong)."""

    name, distance = "same", 2

    def __init__(self, moe_layers, num_experts):
        self.moe_layers, self.E = moe_layers, num_experts

    def predict(self, layer, hidden, topk):
        onehot = (
            mx.zeros((hidden.shape[0], self.E))
            .at[mx.arange(hidden.shape[0])[:, None], topk]
            .add(1.0)
        )
        return {l: onehot for l in later_layers(self.moe_layers, layer, self.distance)}


class Oracle(ExpertPredictor):
    """Knows the next token's experts (replayed from a first run)."""

    name, distance = "oracle", 1

    def __init__(self, moe_layers, num_experts, routes):
        self.moe_layers, self.E, self.routes, self.step = moe_layers, num_experts, routes, {}

    def predict(self, layer, hidden, topk):
        out = {}
        for l in later_layers(self.moe_layers, layer, 1):
            t = self.step.get(l, 0)
            self.step[l] = t + 1
            scores = np.zeros((1, self.E), np.float32)
            if t < len(self.routes[l]):
                scores[0, self.routes[l][t]] = 1.0
            out[l] = mx.array(scores)
        return out


def attach(model, predictor):
    return model.expert_runtime.attach_predictor(predictor)


def test_prefetch_keeps_outputs_bit_identical(models):
    stock, _ = mlx_lm.load(str(models("kimi_k2", "hf")))
    model, _ = mlx_lm_odmoe.load(models("kimi_k2", "odmoe"), expert_cache="min")
    layout = model.expert_runtime.store.layout
    attach(model, SameAsThisLayer(layout.moe_layers, layout.num_experts))
    prompt = prompt_tokens(20, seed=9)
    assert (
        max_abs_diff(
            prefill_and_decode(stock, prompt, steps=8), prefill_and_decode(model, prompt, steps=8)
        )
        == 0.0
    )
    s = mlx_lm_odmoe.stats(model)
    assert s["prefetched_bytes"] > 0 and s["predictor_recall"] is not None


def test_a_perfect_predictor_turns_misses_into_hits(models):
    folder = models("qwen2_moe", "odmoe")
    prompt = prompt_tokens(10, seed=11)

    # First run records each decode step's experts per layer.
    plain, _ = mlx_lm_odmoe.load(folder, expert_cache="min")
    routes = {}
    plain.expert_runtime.observers.append(
        lambda layer, x, idx: (
            routes.setdefault(layer, []).append(np.unique(np.array(idx)))
            if x.shape[1] == 1
            else None
        )
    )
    prefill_and_decode(plain, prompt, steps=8)
    base = mlx_lm_odmoe.stats(plain)

    model, _ = mlx_lm_odmoe.load(folder, expert_cache="min")
    layout = model.expert_runtime.store.layout
    attach(model, Oracle(layout.moe_layers, layout.num_experts, routes))
    prefill_and_decode(model, prompt, steps=8)
    s = mlx_lm_odmoe.stats(model)
    assert s["predictor_recall"] == 1.0
    assert s["prefetch_hits"] > 0 and s["misses"] < base["misses"]
    assert s["wasted_bytes"] == 0


def test_staging_is_bounded_unused_guesses_are_waste_and_used_ones_cost_no_copy(models):
    folder = models("qwen2_moe", "odmoe")
    store = CachedStore(ShardedFolderReader(folder), slots_per_layer=4, staging=3)
    rec = store.layout.record_nbytes
    store.fetch(1, np.arange(4))  # the working set
    store.prefetch(1, np.arange(4, 12))  # 8 guesses, room for 3: the rest are not read
    s = store.telemetry.snapshot()
    assert s["prefetched_bytes"] == 3 * rec and s["evictions"] == 0
    # The layer then uses one guess: it becomes resident where it was read.
    before = s["bytes_read"]
    pool, slots = store.fetch(1, np.array([0, 1, 2, 4]))
    s = store.telemetry.snapshot()
    withdrawn = 3 * rec - s["prefetched_bytes"]  # taken back before their reads started
    assert s["bytes_read"] == before - withdrawn and s["prefetch_hits"] == 1
    # The two guesses it did not use: waste where they were read.
    assert s["wasted_bytes"] + withdrawn == 2 * rec
    want = CachedStore(ShardedFolderReader(folder), slots_per_layer=4)
    wpool, wslots = want.fetch(1, np.array([0, 1, 2, 4]))
    for name in pool:
        assert mx.array_equal(pool[name][mx.array(slots)], wpool[name][mx.array(wslots)]).item()


SHIPPED = __import__("pathlib").Path(__file__).resolve().parent.parent / "models" / "tiny-qwen2-moe"


def load_shipped(**odmoe):
    return mlx_lm_odmoe.load(SHIPPED, expert_cache="25%", model_config={"odmoe": odmoe})[0]


def test_auto_prediction_stays_off_when_experts_arrive_from_memory():
    # The shipped model's experts (50 KB each) come from the page cache in
    # microseconds: prediction could only add time, so `auto` skips it...
    for f in (SHIPPED / "experts").iterdir():
        f.read_bytes()  # into the page cache, as after any first use
    model = load_shipped()
    assert model.expert_runtime.predictor is None
    assert mlx_lm_odmoe.stats(model)["prefetch"].startswith("off (reads take")
    # ...unless reads are slower than the floor.
    model = load_shipped(prefetch_min_read_ms=0)
    assert model.expert_runtime.predictor is not None
    assert mlx_lm_odmoe.stats(model)["prefetch"] == "on"


def test_prediction_on_and_off_are_obeyed():
    assert load_shipped(predictor="on").expert_runtime.predictor is not None
    assert load_shipped(predictor="off").expert_runtime.predictor is None


def test_bad_predictor_settings_are_clear_errors():
    import pytest

    with pytest.raises(ValueError, match="predictor.*'sometimes'.*auto, on, off"):
        load_shipped(predictor="sometimes")


def test_without_a_shadow_model_the_routers_themselves_predict(models):
    from mlx_lm_odmoe.predict.baselines import RouterLookahead

    model, _ = mlx_lm_odmoe.load(
        models("qwen2_moe", "odmoe"),
        expert_cache="50%",
        model_config={"odmoe": {"predictor": "on"}},
    )
    assert isinstance(model.expert_runtime.predictor, RouterLookahead)
    assert mlx_lm_odmoe.stats(model)["prefetch"] == "on"
    # Guesses land in the cache itself, so even the minimum budget predicts...
    model, _ = mlx_lm_odmoe.load(
        models("qwen2_moe", "odmoe"),
        expert_cache="min",
        model_config={"odmoe": {"predictor": "on"}},
    )
    assert mlx_lm_odmoe.stats(model)["prefetch"] == "on"
    # ...but staging slots taken out of the budget leave no room there.
    odmoe = {"predictor": "on", "prefetch_into": "staging"}
    model, _ = mlx_lm_odmoe.load(
        models("qwen2_moe", "odmoe"), expert_cache="min", model_config={"odmoe": odmoe}
    )
    assert model.expert_runtime.predictor is None
    assert "no staging" in mlx_lm_odmoe.stats(model)["prefetch"]


def test_guesses_read_into_the_cache_replace_the_victim_and_unused_ones_are_waste(models):
    folder = models("qwen2_moe", "odmoe")
    store = CachedStore(ShardedFolderReader(folder), slots_per_layer=4)
    store.prefetch_width = 2
    rec, layer = store.layout.record_nbytes, store.layout.moe_layers[0]
    store.fetch(layer, np.arange(4))
    store.prefetch(layer, np.array([0, 5, 6, 7]))  # 0 is resident; reads 5 and 6, not 7
    for read in store._layers[layer].loading.values():
        read.result()  # landed (a guess still queued when its layer comes is withdrawn)
    s = store.telemetry.snapshot()
    assert s["prefetched_bytes"] == 2 * rec and s["evictions"] == 2
    assert store._layers[layer].expert_slot[0] >= 0  # a guess is never a victim
    pool, slots = store.fetch(layer, np.array([0, 5]))  # 5 was a good guess
    s = store.telemetry.snapshot()
    assert (s["prefetch_hits"], s["misses"], s["bytes_read"]) == (1, 4, 6 * rec)
    want = CachedStore(ShardedFolderReader(folder), slots_per_layer=4)
    wpool, wslots = want.fetch(layer, np.array([0, 5]))
    for name in pool:
        assert mx.array_equal(pool[name][mx.array(slots)], wpool[name][mx.array(wslots)]).item()
    others = np.flatnonzero(store._layers[layer].expert_slot < 0)[:3]
    store.fetch(layer, others)  # evicts, among others, the unused guess 6
    assert store.telemetry.snapshot()["wasted_bytes"] == rec


def test_stats_count_the_predictors_host_time_only_when_it_runs():
    prompt = "def main():\n"
    for predictor, ran in (("on", True), ("off", False)):
        model, tok = mlx_lm_odmoe.load(
            SHIPPED, expert_cache="25%", model_config={"odmoe": {"predictor": predictor}}
        )
        mlx_lm.generate(model, tok, prompt, max_tokens=8)
        assert (mlx_lm_odmoe.stats(model).predictor_s > 0) is ran


def test_a_staged_guess_still_landing_when_needed_is_a_late_hit_and_a_miss(models):
    """A guess in a staging slot that its layer asks for before the read
    lands counts as a prefetch hit that was late (its wait is a miss's);
    one that has landed is a hit alone."""
    import threading

    class GatedReader(ShardedFolderReader):
        gate = threading.Event()

        def read_into(self, layer, expert, views):
            self.gate.wait()
            super().read_into(layer, expert, views)

    folder = models("qwen2_moe", "odmoe")
    reader = GatedReader(folder)
    store = CachedStore(reader, slots_per_layer=4, staging=2)
    store.inline_read_s = -1.0
    layer = store.layout.moe_layers[0]
    store.prefetch(layer, np.array([5]))
    f = store.begin_fetch(layer, np.array([5]))
    reader.gate.set()
    f.wait_all()
    s = store.telemetry.snapshot()
    assert (s["prefetch_hits"], s["prefetch_late"], s["misses"]) == (1, 1, 1)
    store.prefetch(layer, np.array([6]))
    store._layers[layer].staged[6][1].result()
    store.fetch(layer, np.array([6]))
    s = store.telemetry.snapshot()
    assert (s["prefetch_hits"], s["prefetch_late"], s["misses"]) == (2, 1, 1)

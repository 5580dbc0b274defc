"""Expert stores: the cache, its policy, its counters, and the on-disk readers."""

import json
import time

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

import mlx_lm_odmoe
from mlx_lm_odmoe.budget import BudgetError, parse_budget, slots_for_budget
from mlx_lm_odmoe.store import (
    CachedStore,
    ExpertReader,
    LRUPolicy,
    ShardedFolderReader,
    StackedCheckpointReader,
)
from mlx_lm_odmoe.store.records import record_to_arrays


def test_shards_are_real_safetensors_with_each_expert_contiguous(models):
    folder = models("qwen2_moe", "odmoe_q4")
    reader = ShardedFolderReader(folder)
    layout = reader.layout
    shard = folder / "experts" / layout.shards[0]["file"]
    with safe_open(str(shard), framework="numpy") as f:
        for name, a in record_to_arrays(reader.read(1, 3), layout).items():
            want = f.get_tensor(f"model.layers.1.mlp.experts.3.{name}")
            assert np.array_equal(np.array(a), want)
    offsets = [t.offset for t in layout.tensors]
    assert (
        offsets == sorted(offsets)
        and layout.tensors[-1].offset + layout.tensors[-1].nbytes == layout.record_nbytes
    )


def test_in_place_reader_slices_stacked_experts(models):
    folder = models("kimi_k2", "stock_q4")
    reader = StackedCheckpointReader(
        folder, num_layers=4, quantization={"group_size": 64, "bits": 4}
    )
    assert reader.layout.moe_layers == [1, 2, 3]  # the first layer is dense
    weights = mx.load(str(folder / "model.safetensors"))
    got = record_to_arrays(reader.read(2, 5), reader.layout)
    for name, a in got.items():
        assert mx.array_equal(a, weights[f"model.layers.2.mlp.switch_mlp.{name}"][5]).item()


def test_lru_evicts_the_least_recently_used_expert(models):
    store = CachedStore(ShardedFolderReader(models("qwen2_moe", "odmoe")), slots_per_layer=3)
    for experts in ([0, 1], [2], [0], [3]):  # 3 must evict 1 (0 was reused)
        store.fetch(0, np.array(experts))
    st = store._layers[0]
    assert st.expert_slot[1] == -1 and all(st.expert_slot[e] >= 0 for e in (0, 2, 3))
    s = store.telemetry.snapshot()
    assert (s["hits"], s["misses"], s["evictions"]) == (1, 4, 1)
    assert s["bytes_read"] == 4 * store.layout.record_nbytes
    assert (
        s["fetch_latency_p50_ms"] is not None
        and s["fetch_latency_p99_ms"] >= s["fetch_latency_p50_ms"]
    )


def test_the_current_pass_is_never_evicted():
    p = LRUPolicy()
    for e in (0, 1, 2):
        p.insert(0, e)
    assert p.victim(0, protected={0, 1}) == 2


def test_budget_parsing():
    total = 1000
    assert parse_budget("25%", total) == 250
    assert parse_budget("2GB", total) == 2 * 10**9
    assert parse_budget("1MiB", total) == 2**20
    assert parse_budget(123, total) == 123
    with pytest.raises(BudgetError, match="cannot read"):
        parse_budget("lots", total)


def test_too_small_budget_is_a_clear_error_at_load(models):
    with pytest.raises(BudgetError, match="too small.*at least"):
        mlx_lm_odmoe.load(models("qwen2_moe", "odmoe"), expert_cache="10KB")
    with pytest.raises(BudgetError):
        slots_for_budget(10, record_nbytes=100, num_layers=2, num_experts=8, top_k=2)


def test_environment_variable_sets_the_budget(models, monkeypatch):
    monkeypatch.setenv("MLX_LM_ODMOE_EXPERT_CACHE", "min")
    model, _ = mlx_lm_odmoe.load(models("qwen2_moe", "odmoe"))
    assert mlx_lm_odmoe.stats(model)["slots_per_layer"] == 2
    model, _ = mlx_lm_odmoe.load(models("qwen2_moe", "odmoe"), expert_cache="50%")
    assert mlx_lm_odmoe.stats(model)["slots_per_layer"] == 4  # the API wins


def test_stats_count_use_per_layer_and_expert(models):
    import mlx_lm

    model, tok = mlx_lm_odmoe.load(models("kimi_k2", "odmoe"), expert_cache="50%")
    mlx_lm.generate(model, tok, prompt="def hello", max_tokens=4)
    s = mlx_lm_odmoe.stats(model)
    assert set(s.per_layer) == {1, 2, 3} and s.per_layer[1].hits + s.per_layer[1].misses > 0
    assert sum(s.expert_use[1]) > 0 and s.load_balance >= 1.0
    assert s.resident_bytes <= s.budget_bytes
    assert json.loads(json.dumps(s.to_dict()))["per_layer"]["1"]["hits"] == s.per_layer[1].hits


def test_stats_are_logged_at_an_interval(models, monkeypatch, caplog):
    import logging

    import mlx_lm

    monkeypatch.setenv("MLX_LM_ODMOE_LOG_INTERVAL", "0.000001")
    model, tok = mlx_lm_odmoe.load(models("qwen2_moe", "odmoe"), expert_cache="min")
    with caplog.at_level(logging.INFO, logger="mlx_lm_odmoe"):
        mlx_lm.generate(model, tok, prompt="def hello", max_tokens=3)
    assert any("experts: hit rate" in r.message for r in caplog.records)


class _SlowReader(ExpertReader):
    """A real reader that takes 20 ms per read and counts reads in flight."""

    def __init__(self, base):
        import threading

        self.base, self.layout, self.live, self.peak = base, base.layout, 0, 0
        self._lock = threading.Lock()

    def read_into(self, layer, expert, dests):
        import time

        with self._lock:
            self.live += 1
            self.peak = max(self.peak, self.live)
        time.sleep(0.02)
        self.base.read_into(layer, expert, dests)
        with self._lock:
            self.live -= 1

    def close(self):
        self.base.close()


def test_slow_reads_of_a_layer_run_together_straight_into_the_pool(models):
    """A layer's misses go to the read threads at once (the disk sees them
    together) and land in their slots with nothing copied after; the pool
    then holds exactly the experts' bytes."""
    folder = models("qwen2_moe", "odmoe")
    reader = _SlowReader(ShardedFolderReader(folder))
    store = CachedStore(reader, slots_per_layer=8, threads=4)
    store.inline_read_s = -1  # every read counts as slow: the thread path
    f = store.begin_fetch(1, np.arange(8))
    assert len(f.pending) == 8
    f.wait_all()
    assert reader.peak == 4 and store.telemetry.snapshot()["read_wait_s"] > 0
    plain = CachedStore(ShardedFolderReader(folder), slots_per_layer=8)
    want, want_slots = plain.fetch(1, np.arange(8))
    for name in f.pool:
        got = f.pool[name][mx.array(f.slots)]
        assert mx.array_equal(got, want[name][mx.array(want_slots)]).item()


def test_direct_reads_around_the_page_cache_return_the_same_bytes(models):
    folder = models("qwen2_moe", "odmoe")
    buffered = ShardedFolderReader(folder)
    direct = ShardedFolderReader(folder)
    direct.set_direct_io(True)
    layers, E = direct.layout.moe_layers, direct.layout.num_experts
    for layer, expert in [(layers[0], 0), (layers[-1], E // 2), (layers[-1], E - 1)]:
        dests = [np.zeros(t.nbytes, np.uint8) for t in direct.layout.tensors]
        direct.read_into(layer, expert, dests)
        assert np.array_equal(np.concatenate(dests), buffered.read(layer, expert))
    model, _ = mlx_lm_odmoe.load(
        folder, expert_cache="min", model_config={"odmoe": {"direct_io": "on"}}
    )
    assert model.expert_runtime.direct_io


def test_the_default_reads_through_the_page_cache_where_it_can_hold_the_experts(models):
    model, _ = mlx_lm_odmoe.load(models("qwen2_moe", "odmoe"), expert_cache="min")
    assert not model.expert_runtime.direct_io


def test_direct_reads_land_in_the_pool_itself_when_aligned(models):
    """Shards start their data on a page boundary and pools are page
    aligned, so a record of whole pages goes from the disk straight into its
    slot; anything else goes through an aligned buffer, same bytes."""
    from mlx_lm_odmoe.layout import read_safetensors_header
    from mlx_lm_odmoe.store.records import aligned_zeros, mx_dtype, writable_rows

    folder = models("qwen2_moe", "odmoe")
    reader = ShardedFolderReader(folder)
    for shard in reader.layout.shards:
        assert read_safetensors_header(folder / "experts" / shard["file"])[1] % 4096 == 0
    reader.set_direct_io(True)
    lay = reader.layout
    pool = {t.name: aligned_zeros((2,) + t.shape, mx_dtype(t.dtype)) for t in lay.tensors}
    rows = writable_rows(pool, lay)
    layer = lay.moe_layers[0]
    reader.read_into(layer, 3, [r[1] for r in rows])
    whole_pages = all(t.nbytes % 4096 == 0 for t in lay.tensors)
    assert (getattr(reader._files._local, "bounce", None) is None) == whole_pages
    assert np.array_equal(np.concatenate([r[1] for r in rows]), reader.read(layer, 3))


class _PieceLog(ShardedFolderReader):
    """Records each piece read, slowly, as a disk would deliver it."""

    def __init__(self, folder):
        super().__init__(folder)
        self.pieces = []

    def read_span_into(self, layer, expert, dests, start, stop):
        time.sleep(0.05)
        super().read_span_into(layer, expert, dests, start, stop)
        self.pieces.append((expert, start, stop))


def test_large_records_are_read_in_pieces_and_land_one_after_another(models):
    """A record big enough is split over the read threads, pieces queued
    record after record: the first miss lands while the others are still
    being read (the block computes it meanwhile), and the bytes are the
    record's."""
    folder = models("qwen2_moe", "odmoe")
    reader = _PieceLog(folder)
    store = CachedStore(reader, slots_per_layer=8, threads=4)
    store.inline_read_s = -1
    store.split_bytes = reader.layout.record_nbytes // 4
    experts = np.array([2, 5, 6])
    f = store.begin_fetch(1, experts)
    assert [f.wait_any() for _ in experts] == [0, 1, 2]
    assert len(reader.pieces) == 3 * 4
    assert sorted(b - a for _, a, b in reader.pieces)[-1] <= -(-reader.layout.record_nbytes // 4)
    want, want_slots = CachedStore(ShardedFolderReader(folder), slots_per_layer=8).fetch(1, experts)
    for name in f.pool:
        got = f.pool[name][mx.array(f.slots)]
        assert mx.array_equal(got, want[name][mx.array(want_slots)]).item()


def test_a_guess_is_read_in_smaller_pieces_than_a_demanded_read(models):
    """A demanded read that arrives while a guess is on the disk waits only
    for the guess's pieces already started: guesses come in small pieces."""
    folder = models("qwen2_moe", "odmoe")
    reader = _PieceLog(folder)
    store = CachedStore(reader, slots_per_layer=4, threads=2)
    store.inline_read_s = -1
    nbytes = reader.layout.record_nbytes
    store.split_bytes, store.guess_split_bytes = nbytes // 4, nbytes // 8
    store.begin_fetch(1, np.array([2])).wait_all()
    demanded = len(reader.pieces)
    store.prefetch(1, [5])
    store.begin_fetch(1, np.array([5])).wait_all()  # waits for the guess to land
    assert demanded == 2 and len(reader.pieces) - demanded == 8
    want, slots = CachedStore(ShardedFolderReader(folder), slots_per_layer=8).fetch(1, [5])
    got, got_slots = store.fetch(1, [5])
    for name in got:
        assert mx.array_equal(got[name][got_slots[0]], want[name][slots[0]]).item()


def test_demanded_reads_go_before_queued_guesses():
    """A guess never keeps the forward pass waiting for the disk: reads it
    needs run before any guess still queued, each kind in order."""
    import threading

    from mlx_lm_odmoe.store.read_queue import DEMAND, GUESS, ReadQueue

    q, ran, gate = ReadQueue(threads=1), [], threading.Event()
    q.submit(DEMAND, gate.wait)
    futs = [q.submit(GUESS, ran.append, f"guess {i}") for i in range(3)]
    futs += [q.submit(DEMAND, ran.append, "demand")]
    gate.set()
    for fut in futs:
        fut.result(timeout=10)
    q.shutdown()
    assert ran == ["demand", "guess 0", "guess 1", "guess 2"]


class _ReadLog(ShardedFolderReader):
    def __init__(self, folder):
        super().__init__(folder)
        self.read = []

    def read_into(self, layer, expert, dests):
        time.sleep(0.05)
        super().read_into(layer, expert, dests)
        self.read.append(expert)


def test_guesses_a_layer_does_not_want_are_taken_back_before_they_are_read(models):
    """When the layer's routes arrive, a queued guess it wants is read
    before its other reads wait on anything, and queued guesses it does not
    want are withdrawn: their slots are free again and the disk never
    carries them."""
    reader = _ReadLog(models("qwen2_moe", "odmoe"))
    store = CachedStore(reader, slots_per_layer=4, threads=1)
    store.inline_read_s = -1
    store.prefetch(1, [3, 4, 5])  # 3 starts at once, 4 and 5 wait
    time.sleep(0.01)
    f = store.begin_fetch(1, np.array([5, 7]))
    f.wait_all()
    time.sleep(0.1)  # anything still queued would run now
    assert reader.read == [3, 5, 7]
    s = store.telemetry.snapshot()
    assert s["prefetched_bytes"] == 2 * reader.layout.record_nbytes
    assert sorted(np.flatnonzero(store.resident_mask(1, np.arange(8)))) == [3, 5, 7]


def test_guesses_never_fail_when_every_slot_is_still_being_read(models):
    """Guesses from several layers ahead can fill a layer's slots with
    reads in flight; a further guess is then dropped, not an error."""
    reader = _ReadLog(models("qwen2_moe", "odmoe"))
    store = CachedStore(reader, slots_per_layer=4, threads=1)
    store.inline_read_s = -1
    store.prefetch(1, [0, 1, 2, 3])
    store.prefetch(1, [4, 5])  # no slot left that is not landing
    store.fetch(1, np.array([0, 1, 2]))
    assert sorted(reader.read) == [0, 1, 2]  # 3 was withdrawn unread

"""OnDemandSwitchGLU computes exactly what mlx-lm's SwitchGLU computes."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchGLU

from mlx_lm_odmoe.block import OnDemandSwitchGLU
from mlx_lm_odmoe.layout import MLX_TO_ST, ExpertLayout, record_specs
from mlx_lm_odmoe.store import CachedStore, MemoryStore
from mlx_lm_odmoe.store.readers import ExpertReader

D, H, E, K = 128, 128, 8, 2


class _Runtime:
    observers = ()
    predictor = None

    def __init__(self, store):
        self.store = store


class StackedArraysReader(ExpertReader):
    """Serves experts from a stock SwitchGLU's stacked tensors."""

    def __init__(self, glu, quantization):
        self.arrays = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for part in ("weight", "scales", "biases"):
                if part in getattr(glu, proj):
                    self.arrays[f"{proj}.{part}"] = np.array(getattr(glu, proj)[part])
        specs = [(n, MLX_TO_ST[str(a.dtype)], a.shape[1:]) for n, a in self.arrays.items()]
        self.layout = ExpertLayout(E, [0], record_specs(specs), quantization)
        self.reads = 0

    def read(self, layer, expert):
        self.reads += 1
        return np.concatenate([a[expert].reshape(-1).view(np.uint8) for a in self.arrays.values()])


def stock_glu(bits, group_size):
    mx.random.seed((bits or 0) * 1000 + (group_size or 0))
    glu = SwitchGLU(D, H, E)
    q = None
    if bits:
        nn.quantize(glu, group_size=group_size, bits=bits)
        q = {"group_size": group_size, "bits": bits, "mode": "affine"}
    return glu, q


def routes(tokens, seed=0):
    rng = np.random.default_rng(seed)
    return mx.array(np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)])[None])


QUANT = [(None, None), (4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)]


@pytest.mark.parametrize("bits,group_size", QUANT)
@pytest.mark.parametrize("slots", [E, 4, K])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_block_matches_switch_glu(bits, group_size, slots, tokens):
    glu, q = stock_glu(bits, group_size)
    reader = StackedArraysReader(glu, q)
    block = OnDemandSwitchGLU(_Runtime(CachedStore(reader, slots)), 0, D, H, E)
    x = mx.random.normal((1, tokens, D))
    inds = routes(tokens, seed=tokens)
    assert mx.array_equal(block(x, inds), glu(x, inds)).item()


def test_memory_store_takes_the_no_sync_path():
    glu, q = stock_glu(4, 64)
    store = MemoryStore.from_reader(StackedArraysReader(glu, q))
    block = OnDemandSwitchGLU(_Runtime(store), 0, D, H, E)
    x = mx.random.normal((1, 3, D))
    inds = routes(3)
    assert mx.array_equal(block(x, inds), glu(x, inds)).item()
    stats = store.telemetry.snapshot()
    assert stats["misses"] == 0 and sum(stats["expert_use"][0]) == 3 * K


def float_block(slots, reader_class=StackedArraysReader):
    """A float32 stock SwitchGLU, and an on-demand block over a cache of
    ``slots`` experts reading it: (glu, reader, store, block)."""
    glu, q = stock_glu(None, None)
    reader = reader_class(glu, q)
    store = CachedStore(reader, slots)
    return glu, reader, store, OnDemandSwitchGLU(_Runtime(store), 0, D, H, E)


@pytest.mark.parametrize("slots", [K, 3, 4, 6])
def test_each_expert_is_read_once_per_pass_even_when_the_prompt_needs_more_than_fit(slots):
    glu, reader, _, block = float_block(slots)
    x = mx.random.normal((1, 64, D))
    inds = routes(64, seed=7)
    assert mx.array_equal(block(x, inds), glu(x, inds)).item()
    assert reader.reads == len(np.unique(np.array(inds)))


@pytest.mark.parametrize("slots", [3, 4, 6])
def test_a_pass_reads_none_of_the_experts_already_resident(slots):
    """A second long prompt finds some experts resident (the hottest, kept
    through the pass, and others): none of them is evicted before its turn
    and read again."""
    glu, reader, store, block = float_block(slots)
    x = mx.random.normal((1, 64, D))
    inds = routes(64, seed=7)
    block(x, inds)
    resident = int(store.resident_mask(0, np.arange(E)).sum())
    reader.reads = 0
    assert mx.array_equal(block(x, inds), glu(x, inds)).item()
    assert reader.reads == len(np.unique(np.array(inds))) - resident


@pytest.mark.parametrize("kind", ["qwen2_moe", "kimi_k2"])
def test_the_shared_expert_starts_early_and_is_computed_once(models, kind):
    """The block starts the shared expert right after the router's sync (it
    overlaps the fetch); the MoE block then reuses that result, so each pass
    computes it once per layer, and the parameter names are mlx-lm's."""
    from mlx_lm.utils import tree_flatten

    import mlx_lm_odmoe

    model, _ = mlx_lm_odmoe.load(models(kind, "odmoe"), expert_cache="min")
    mlps = [l.mlp for l in model.model.layers if "switch_mlp" in l.mlp]
    shared = [m.get("shared_expert", m.get("shared_experts")) for m in mlps]
    assert all(type(s).__name__.startswith("Early") for s in shared)
    assert not any(".start" in k or "_early" in k for k, _ in tree_flatten(model.parameters()))
    base = type(shared[0]).__mro__[2]
    calls, original = [], base.__call__
    base.__call__ = lambda self, x: (
        calls.append(any(self is s for s in shared)) or original(self, x)
    )
    try:
        mx.eval(model(mx.array([[1, 2, 3]])))
    finally:
        base.__call__ = original
    assert sum(calls) == len(mlps)  # (a dense layer's MLP may share the class)


class LoggingSlowReader(StackedArraysReader):
    """Reads take 20 ms each and are logged as they start and end."""

    def __init__(self, glu, quantization):
        super().__init__(glu, quantization)
        import threading

        self.lock, self.in_flight, self.landed, self.most = threading.Lock(), set(), set(), 0

    def read(self, layer, expert):
        import time

        with self.lock:
            self.in_flight.add(expert)
            self.most = max(self.most, len(self.in_flight))
        time.sleep(0.02)
        out = super().read(layer, expert)
        with self.lock:
            self.in_flight.discard(expert)
            self.landed.add(expert)
        return out


@pytest.mark.parametrize("slots", [3, 4, 6])
def test_a_pass_bigger_than_the_cache_reads_into_every_free_slot_while_it_computes(slots):
    """Reads of a long prompt's pass fill every slot the kept experts leave
    free, compute starts on each expert once its read has landed (never
    before), and while the pass computes the disk keeps reading."""
    glu, reader, store, block = float_block(slots, LoggingSlowReader)
    store.inline_read_s = -1.0  # every read on the store's threads
    x = mx.random.normal((1, 64, D))
    inds = routes(64, seed=3)
    want = glu(x, inds)
    assert mx.array_equal(block(x, inds), want).item()  # leaves hot experts resident
    kept = slots // 2
    calls, run_routes = [], block._run_routes

    def logged(store_, pool, slot_ids, tokens, rows):
        with reader.lock:
            experts = set(store._layer(0).slot_expert[np.unique(slot_ids)].tolist())
            calls.append((experts, set(reader.in_flight), set(reader.landed)))
        return run_routes(store_, pool, slot_ids, tokens, rows)

    block._run_routes = logged
    reader.most, reader.landed = 0, set()
    resident = set(np.flatnonzero(store.resident_mask(0, np.arange(E))).tolist())
    assert mx.array_equal(block(x, inds), want).item()
    needed = len(np.unique(np.array(inds))) - len(resident)
    assert reader.most == min(slots - kept, needed)  # every free slot read into at once
    for experts, _, landed in calls:
        assert experts <= landed | resident  # computed only once its bytes are in
    assert sum(1 for _, flying, _ in calls if flying) >= 2  # reads overlap compute


@pytest.mark.parametrize("copied", [False, True], ids=["reads-in-place", "reads-copied-in"])
def test_a_pass_that_fails_midway_leaves_no_read_in_flight(monkeypatch, copied):
    """When a chunk's compute fails while the next chunk is being read,
    those reads land before the error leaves the block (a later pass
    counts their slots as holding whole experts: where the pool's memory
    is not writable, their bytes are copied in), and the next pass
    matches stock."""
    import sys
    import time

    import mlx_lm_odmoe.store.cached as cached

    if copied:
        monkeypatch.setattr(cached, "writable_rows", lambda pool, layout: None)

    class SlowReader(StackedArraysReader):
        def read(self, layer, expert):
            time.sleep(0.05)
            return super().read(layer, expert)

    glu, _, store, block = float_block(4, SlowReader)
    store.inline_read_s = -1.0  # every read on the store's threads
    started, start_read = [], store._start_read
    store._start_read = lambda *a: started.append(start_read(*a)) or started[-1]
    x = mx.random.normal((1, 64, D))
    inds = routes(64, seed=5)
    want = glu(x, inds)
    mx.eval(x, inds, want)
    evaluate = mx.eval

    def failing_eval(*arrays):
        if sys._getframe(1).f_globals["__name__"].endswith("expert_pass"):  # a chunk's compute
            raise RuntimeError("compute failed")
        evaluate(*arrays)

    monkeypatch.setattr(mx, "eval", failing_eval)
    with pytest.raises(RuntimeError, match="compute failed"):
        block(x, inds)
    monkeypatch.setattr(mx, "eval", evaluate)
    assert len(started) > 2 and all(read.done() for read in started)
    assert mx.array_equal(block(x, inds), want).item()

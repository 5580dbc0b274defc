"""Expert prediction: traces, predictors, shadow model, evaluation, simulator.

Tiny random models route at random, so nothing here checks accuracy; these
tests check shapes, alignment, round trips and agreement with the store.
"""

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_lm_odmoe
from mlx_lm_odmoe.predict import ExpertPredictor, load_predictor
from mlx_lm_odmoe.predict.base import later_layers
from mlx_lm_odmoe.predict.baselines import MostFrequent, PreviousToken, RouterLookahead
from mlx_lm_odmoe.predict.routers import router_scores
from mlx_lm_odmoe.predict.shadow import parameter_count, save_shadow
from mlx_lm_odmoe.research.cache_sim import SimCache, run, uniform_slots
from mlx_lm_odmoe.research.traces import Trace, collect, eval_mask, moe_layers_of, previous_topk
from mlx_lm_odmoe.research.train_shadow import train
from mlx_lm_odmoe.store import CachedStore, LRUPolicy, ShardedFolderReader
from mlx_lm_odmoe.store.policy import LFUDecayPolicy, LRUKPolicy

KINDS = ["qwen2_moe", "kimi_k2"]


@pytest.fixture(scope="module")
def traced(models, tmp_path_factory):
    """kind -> (model folder, model, trace file, trace)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            folder = models(kind, "odmoe")
            model, _ = mlx_lm_odmoe.load(folder, expert_cache="100%")
            heldout = np.random.default_rng(0).integers(0, 300, 4000)
            trace = collect(
                model,
                heldout,
                chunks=8,
                chunk_len=24,
                generate=8,
                prompt_len=8,
                max_tokens=16,
                batch=4,
                progress=False,
            )
            path = tmp_path_factory.mktemp("traces") / f"{kind}.npz"
            trace.source = str(folder)
            trace.save(path)
            cache[kind] = (folder, model, path, Trace.load(path))
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_traces_have_the_right_shapes_and_split(traced, kind):
    _, model, _, trace = traced(kind)
    layers = moe_layers_of(model)
    T = 8 * 24 + 8 * (8 + 16)
    k, D = trace.top_k, model.args.hidden_size
    assert trace.hidden.shape == (len(layers), T, D) and trace.hidden.dtype == np.float16
    assert trace.topk.shape == (len(layers), T, k) and trace.tokens.shape == trace.seq.shape == (T,)
    assert trace.moe_layers == layers and int(trace.generated.sum()) == 8 * 16
    assert len(trace.sequences()) == 16
    assert (trace.topk >= 0).all() and (trace.topk < trace.num_experts).all()
    held = eval_mask(trace)
    assert 0 < held.sum() < T and trace.generated[held].any() and (~trace.generated[held]).any()
    prev = previous_topk(trace)
    assert (prev[:, 0] == -1).all() and (prev[:, 1] == trace.topk[:, 0]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_trace_rows_line_up_with_a_fresh_forward(traced, kind):
    """Replaying a sequence's tokens teacher-forced gives back its rows,
    for held-out text and for the prompt + sampled continuation alike."""
    _, model, _, trace = traced(kind)
    layers = moe_layers_of(model)
    seen = {}
    model.expert_runtime.observers.append(lambda l, x, i: seen.__setitem__(l, (x, i)))
    try:
        for start, stop in (trace.sequences()[0], trace.sequences()[-1]):
            mx.eval(model(mx.array(trace.tokens[start:stop])[None]))
            for row, l in enumerate(layers):
                x, ids = seen[l]
                np.testing.assert_allclose(
                    np.array(x[0]), trace.hidden[row, start:stop], atol=2e-2, rtol=2e-2
                )
                same = np.sort(np.array(ids[0]), -1) == np.sort(trace.topk[row, start:stop], -1)
                assert same.all(-1).mean() > 0.9  # cached decode vs one pass: near-ties may flip
    finally:
        model.expert_runtime.observers.clear()


@pytest.mark.parametrize("kind", KINDS)
def test_router_lookahead_at_distance_zero_is_the_router(traced, kind):
    _, model, _, _ = traced(kind)
    agree = []

    def check(layer, x, indices):
        x = x.reshape(-1, x.shape[-1])
        k = indices.shape[-1]
        mine = np.sort(
            np.array(mx.argpartition(-router_scores(model, layer, x), kth=k - 1, axis=-1)[:, :k]),
            -1,
        )
        agree.append((mine == np.sort(np.array(indices).reshape(-1, k), -1)).all())

    model.expert_runtime.observers.append(check)
    try:
        mx.eval(model(mx.array(np.arange(40) % 300)[None]))
    finally:
        model.expert_runtime.observers.clear()
    assert agree and all(agree)


def test_quantized_router_and_fused_shadow_agree(models, traced, tmp_path):
    """4-bit routers: the lookahead at distance 0 is still the router, and
    the shadow model's fused, compiled step equals its plain one."""
    model, _ = mlx_lm_odmoe.load(models("qwen2_moe", "odmoe_q4"), expert_cache="100%")
    assert "scales" in model.model.layers[0].mlp.gate
    seen = {}
    model.expert_runtime.observers.append(lambda l, x, i: seen.__setitem__(l, (x, i)))
    mx.eval(model(mx.array(np.arange(30) % 300)[None]))
    for l, (x, ids) in seen.items():
        k = ids.shape[-1]
        mine = mx.argpartition(-router_scores(model, l, x[0]), kth=k - 1, axis=-1)[:, :k]
        assert (np.sort(np.array(mine), -1) == np.sort(np.array(ids[0]), -1)).all()
    _, _, _, trace = traced("qwen2_moe")
    net, _ = train(model, trace, distance=2, rank=8, epochs=1, batch=32, log=lambda *a: None)
    save_shadow(net, tmp_path)
    fused, plain = load_predictor(model, tmp_path), load_predictor(model, tmp_path)
    plain._fuse = False
    layers = trace.moe_layers
    x, ids = mx.array(trace.hidden[0, :4]), mx.array(trace.topk[0, :4])
    a, b = fused.predict(layers[0], x, ids), plain.predict(layers[0], x, ids)
    assert all(mx.allclose(a[t], b[t], atol=1e-4).item() for t in a)


def test_online_guesses_are_the_top_k_of_the_scores(traced, tmp_path):
    """What the block prefetches (the shadow model's own compiled guesses for
    the nearest layer) is each row's top-k of its scores, minus guesses
    below the probability floor."""
    from mlx_lm_odmoe.predict.base import select_guesses

    folder, model, _, trace = traced("kimi_k2")
    net, _ = train(model, trace, distance=2, rank=8, epochs=1, batch=32, log=lambda *a: None)
    save_shadow(net, tmp_path)
    shadow = load_predictor(model, tmp_path)
    layers, k = trace.moe_layers, trace.top_k
    x, ids = mx.array(trace.hidden[0, :6]), mx.array(trace.topk[0, :6])
    shadow.reset()
    s = shadow.predict(layers[0], x, ids)[layers[1]]
    top = mx.sort(mx.softmax(s, axis=-1), axis=-1)[:, -k:]
    for floor in (0.0, float(np.median(np.array(top)))):  # the second keeps about half
        shadow.reset()
        scores = shadow.predict(layers[0], x, ids)
        shadow.reset()
        guesses = shadow.guesses(layers[0], x, ids, distance=1, min_prob=floor)
        assert list(guesses) == [layers[1]]
        want = np.sort(np.array(select_guesses(scores[layers[1]], k, floor)), -1)
        assert (np.sort(np.array(guesses[layers[1]]), -1) == want).all()
    assert (want == -1).any() and (want >= 0).any()  # the floor dropped some, kept some


@pytest.mark.parametrize("kind", KINDS)
def test_host_and_device_shadow_steps_guess_alike(traced, kind, tmp_path):
    """Small shadow models run online in numpy (cheaper than kernels at this
    size); they must guess what the MLX step guesses, previous-token state
    included, above and below the probability floor."""
    folder, model, _, trace = traced(kind)
    net, _ = train(model, trace, distance=2, rank=8, epochs=1, batch=32, log=lambda *a: None)
    save_shadow(net, tmp_path)
    shadow = load_predictor(model, tmp_path)
    assert shadow.on_host
    layers = trace.moe_layers
    for floor in (0.0, 0.05):
        shadow.reset()
        for row in range(3):  # consecutive tokens: the second and third use the state
            for i, l in enumerate(layers):
                x, ids = trace.hidden[i, row : row + 2], trace.topk[i, row : row + 2]
                dev = shadow.guesses(l, mx.array(x), mx.array(ids), 1, floor)
                host = shadow.host_guesses(l, x, ids, 1, floor)
                assert list(dev) == list(host)
                for t in dev:
                    assert (np.sort(np.array(dev[t]), -1) == np.sort(host[t], -1)).all(), (
                        floor,
                        row,
                        l,
                    )


@pytest.mark.parametrize("kind", KINDS)
def test_every_predictor_scores_the_later_layers(traced, kind, tmp_path):
    folder, model, _, trace = traced(kind)
    layers, E = trace.moe_layers, trace.num_experts
    net, _ = train(model, trace, distance=2, rank=8, epochs=1, batch=32, log=lambda *a: None)
    save_shadow(net, tmp_path)
    predictors = [
        RouterLookahead(model, layers, 2),
        PreviousToken(layers, E, 2),
        MostFrequent.fit(trace, 2),
        load_predictor(model, tmp_path),
    ]
    for p in predictors:
        assert isinstance(p, ExpertPredictor)
        for step in range(2):  # the second pass sees the first's state
            for row, l in enumerate(layers):
                n = 3
                out = p.predict(l, mx.array(trace.hidden[row, :n]), mx.array(trace.topk[row, :n]))
                assert sorted(out) == later_layers(layers, l, 2)
                for s in out.values():
                    assert s.shape == (n, E)
        p.reset()


def test_previous_token_reports_the_last_tokens_experts(traced):
    _, _, _, trace = traced("kimi_k2")
    layers, E = trace.moe_layers, trace.num_experts
    p = PreviousToken(layers, E, 1)
    first = p.predict(layers[0], mx.zeros((1, 4)), mx.array(trace.topk[0, :1]))
    assert float(first[layers[1]].sum()) == 0  # nothing seen yet
    p.predict(layers[1], mx.zeros((1, 4)), mx.array(trace.topk[1, :1]))
    nxt = p.predict(layers[0], mx.zeros((1, 4)), mx.array(trace.topk[0, 1:2]))
    assert set(np.flatnonzero(np.array(nxt[layers[1]][0]))) == set(trace.topk[1, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_shadow_round_trip(traced, kind, tmp_path):
    _, model, _, trace = traced(kind)
    assert load_predictor(model, tmp_path) is None
    net, info = train(model, trace, distance=4, rank=16, epochs=2, batch=32, log=lambda *a: None)
    save_shadow(net, tmp_path, {"training": info})
    shadow = load_predictor(model, tmp_path)
    assert shadow is not None and shadow.distance == 4
    layers = trace.moe_layers
    x, ids = mx.array(trace.hidden[0, :5]), mx.array(trace.topk[0, :5])
    got = shadow.predict(layers[0], x, ids)
    from mlx_lm_odmoe.predict.shadow import ShadowModel

    want = ShadowModel(model, net).predict(layers[0], x, ids)
    assert all(mx.array_equal(got[t], want[t]).item() for t in want)
    cfg = json.loads((tmp_path / "shadow.json").read_text())
    assert cfg["moe_layers"] == layers and cfg["training"]["train_tokens"] > 0


def test_shadow_fits_kimi_k2_scale():
    n = parameter_count(7168, 384, 60, distance=4, rank=64)
    assert n * 4 < 500e6  # float32 bytes


def test_evaluation_prints_a_table_json_and_a_plot(traced, tmp_path, capsys):
    from mlx_lm_odmoe.research.eval_predictors import main

    folder, _, path, trace = traced("qwen2_moe")
    main([str(folder), "--traces", str(path), "--distance", "2"])
    table = capsys.readouterr().out
    assert "| router-lookahead |" in table and "d=2 @2k" in table
    main(
        [
            str(folder),
            "--traces",
            str(path),
            "--distance",
            "2",
            "--json",
            "--plot",
            str(tmp_path / "r.png"),
        ]
    )
    report = json.loads(capsys.readouterr().out)
    names = set(report["predictors"])
    assert {"router-lookahead", "previous-token", "most-frequent"} <= names
    for r in report["predictors"].values():
        assert set(r) == {f"recall@{trace.top_k}", f"recall@{2 * trace.top_k}", "ms_per_token"}
        assert all(0 <= v <= 1 for v in r[f"recall@{trace.top_k}"].values())
    assert (tmp_path / "r.png").stat().st_size > 1000


@pytest.mark.parametrize("policy", [LRUPolicy, lambda: LFUDecayPolicy(0.9), lambda: LRUKPolicy(2)])
def test_simulator_matches_the_real_store(models, policy):
    """Same requests, same policy: the simulator's counts are the store's."""
    store = CachedStore(
        ShardedFolderReader(models("qwen2_moe", "odmoe")), slots_per_layer=3, policy=policy()
    )
    layers = store.layout.moe_layers
    sim = SimCache({l: 3 for l in layers}, policy())
    rng = np.random.default_rng(0)
    for _ in range(60):
        l = int(rng.choice(layers))
        experts = np.unique(rng.integers(0, store.layout.num_experts, rng.integers(1, 4)))
        store.fetch(l, experts)
        sim.fetch(l, experts)
    s, c = store.telemetry.snapshot(), sim.finish()
    assert (s["hits"], s["misses"], s["evictions"]) == (c.hits, c.misses, c.evictions)
    assert c.misses > 0 and c.evictions > 0
    for l in layers:
        assert set(np.flatnonzero(store._layers[l].expert_slot >= 0)) == sim.resident[l]
    store.close()


@pytest.mark.parametrize("policy", [lambda: LFUDecayPolicy(0.9), lambda: LRUKPolicy(2)])
def test_policies_never_evict_protected_experts(policy):
    p = policy()
    rng = np.random.default_rng(1)
    resident = set()
    for step in range(500):
        e = int(rng.integers(0, 16))
        if e in resident:
            p.touch(0, e)
            continue
        if len(resident) >= 6:
            protected = set(rng.choice(sorted(resident), 3, replace=False).tolist())
            v = p.victim(0, protected)
            assert v in resident and v not in protected
            p.remove(0, v)
            resident.discard(v)
        p.insert(0, e)
        resident.add(e)
    with pytest.raises(RuntimeError):
        p.victim(0, resident)


def test_prefetch_staging_never_evicts_the_working_set(traced):
    _, _, _, trace = traced("kimi_k2")
    layers, k = trace.moe_layers, trace.top_k
    slots = uniform_slots(layers, trace.num_experts, 0.5, k)
    plain = run(trace, slots, LRUPolicy())
    # A perfect predictor: the true experts, one layer ahead.
    staged = np.full(trace.topk.shape, -1)
    staged[1:] = trace.topk[1:]
    ahead = run(trace, slots, LRUPolicy(), staged, staging=k, lead=1)
    assert ahead.requests == plain.requests
    assert ahead.prefetch_hits > 0 and ahead.hit_rate > plain.hit_rate
    assert ahead.prefetch_hits + ahead.wasted <= ahead.prefetches

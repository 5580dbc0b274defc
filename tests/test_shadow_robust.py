"""The shadow model off its training text: online correction, the penalty
on the learned correction, mixed traces and the cross-domain report.

Tiny random models route at random, so accuracy is checked only on made-up
scores; on the models, these tests check agreement, resets and shapes.
"""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_lm_odmoe
from mlx_lm_odmoe.predict import load_predictor
from mlx_lm_odmoe.predict.online import DEFAULTS, OnlineCorrection
from mlx_lm_odmoe.predict.shadow import ShadowModel, save_shadow
from mlx_lm_odmoe.research.traces import Trace, collect, concat, eval_mask
from mlx_lm_odmoe.research.train_shadow import train

E, K = 8, 2


@pytest.fixture(scope="module")
def traced(models):
    folder = models("kimi_k2", "odmoe")
    model, _ = mlx_lm_odmoe.load(folder, expert_cache="100%")
    heldout = np.random.default_rng(1).integers(0, 300, 2000)
    trace = collect(
        model,
        heldout,
        chunks=8,
        chunk_len=16,
        generate=8,
        prompt_len=8,
        max_tokens=8,
        batch=4,
        progress=False,
    )
    trace.source = str(folder)
    return model, trace


def steps(adapt, scores, correction, truth, n=50, cur=None):
    """``n`` tokens of one source layer (0) predicting layer 1."""
    for _ in range(n):
        adapt.remember(0, [1], scores[:, None], correction[:, None], cur)
        adapt.learn(1, truth)


@pytest.mark.parametrize("xp", [np, mx], ids=["numpy", "mlx"])
def test_online_bias_learns_the_experts_the_text_keeps_using(xp):
    adapt = OnlineCorrection(E, 2, xp)
    flat = xp.zeros((1, E), dtype=xp.float32)
    steps(adapt, flat, flat, xp.array([[3, 5]]))
    gate, bias = adapt.terms(0, [1])
    assert set(np.argsort(-np.array(bias[0]))[:K].tolist()) == {3, 5}
    assert np.array(gate).shape == (1, 1)


@pytest.mark.parametrize("xp", [np, mx], ids=["numpy", "mlx"])
def test_online_gate_turns_off_a_correction_that_points_elsewhere(xp):
    adapt = OnlineCorrection(E, 2, xp)
    wrong = np.zeros((1, E), np.float32)
    wrong[0, [0, 1]] = 4.0  # the trained head insists on experts 0 and 1
    wrong = xp.array(wrong)
    steps(adapt, wrong, wrong, xp.array([[6, 7]]), n=30)
    gate, _ = adapt.terms(0, [1])
    assert float(np.array(gate)[0, 0]) < 0.7


@pytest.mark.parametrize("xp", [np, mx], ids=["numpy", "mlx"])
def test_online_pairs_learn_which_experts_follow_which(xp):
    """Expert 2 at layer 0 is followed by 5 at layer 1, expert 3 by 6: no
    single bias can say that."""
    adapt = OnlineCorrection(E, 2, xp, pair_lr=1.0)
    flat = xp.zeros((1, E), dtype=xp.float32)
    for _ in range(40):
        for c, t in ((2, 5), (3, 6)):
            steps(adapt, flat, flat, xp.array([[t, 7]]), n=1, cur=xp.array([[c, 0]]))
    for c, t in ((2, 5), (3, 6)):
        _, bias = adapt.terms(0, [1], xp.array([[c, 0]]))
        best = np.argsort(-np.array(bias[0, 0]))[:K]
        assert set(best.tolist()) == {t, 7}


@pytest.mark.parametrize("pair_lr", [0.0, 0.5])
def test_numpy_and_mlx_corrections_learn_alike(pair_lr):
    rng = np.random.default_rng(0)
    a, b = OnlineCorrection(E, 2, np, pair_lr=pair_lr), OnlineCorrection(E, 2, mx, pair_lr=pair_lr)
    for _ in range(20):
        s, c = rng.normal(size=(2, 1, E)).astype(np.float32)
        truth, cur = (rng.choice(E, (1, K), replace=False) for _ in range(2))
        steps(a, s, c, truth, n=1, cur=cur)
        steps(b, mx.array(s), mx.array(c), mx.array(truth), n=1, cur=mx.array(cur))
    for x, y in zip(a.terms(0, [1], cur), b.terms(0, [1], mx.array(cur))):
        assert np.allclose(x, np.array(y), atol=1e-5)


@pytest.mark.parametrize("pair_lr", [0.0, 0.5])
def test_a_tokens_arrivals_from_every_layer_learn_as_one_at_a_time(pair_lr):
    """numpy learns a decode token's arrivals together when a source next
    needs its values; MLX learns each as it arrives: the same values."""
    rng, layers, d = np.random.default_rng(1), [0, 1, 2, 3, 4], 2
    a, b = OnlineCorrection(E, d, np, pair_lr=pair_lr), OnlineCorrection(E, d, mx, pair_lr=pair_lr)
    for _ in range(12):  # tokens
        for i, layer in enumerate(layers):
            truth = rng.choice(E, (1, K), replace=False)
            a.learn(layer, truth)
            b.learn(layer, mx.array(truth))
            targets = layers[i + 1 : i + 1 + d]
            if not targets:
                continue
            ta, tb = a.terms(layer, targets, truth), b.terms(layer, targets, mx.array(truth))
            for x, y in zip(ta, tb):
                assert np.allclose(x, np.array(y), atol=1e-5), layer
            s, c, look = rng.normal(size=(3, 1, len(targets), E)).astype(np.float32)
            a.remember(layer, targets, s, c, truth, look)
            b.remember(layer, targets, *map(mx.array, (s, c, truth, look)))


def test_a_new_request_starts_from_the_trained_model():
    adapt = OnlineCorrection(E, 2, np)
    steps(adapt, np.zeros((1, E), np.float32), np.ones((1, E), np.float32), np.array([[1, 2]]))
    adapt.reset()
    gate, bias = adapt.terms(0, [1, 2])
    assert (gate == 1).all() and (bias == 0).all()


def test_predictions_for_another_pass_teach_nothing():
    """A prompt's rows do not line up with the decode rows that follow it."""
    adapt = OnlineCorrection(E, 2, np)
    adapt.remember(0, [1], np.zeros((3, 1, E), np.float32), np.zeros((3, 1, E), np.float32))
    adapt.learn(1, np.array([[1, 2]]))
    gate, bias = adapt.terms(0, [1])
    assert (gate == 1).all() and (bias == 0).all()


@pytest.mark.parametrize("pair_lr", [0.0, 0.5])
def test_adapting_host_and_device_steps_guess_alike(traced, tmp_path, pair_lr):
    """The block runs the numpy step for small models and the MLX step for
    large ones; with online correction both learn the same and guess alike."""
    model, trace = traced
    online = {**DEFAULTS, "pair_lr": pair_lr}
    net, _ = train(
        model, trace, distance=2, rank=8, epochs=1, batch=32, online=online, log=lambda *a: None
    )
    save_shadow(net, tmp_path)
    dev, host = load_predictor(model, tmp_path), load_predictor(model, tmp_path)
    assert dev.online == online and host.on_host
    layers = trace.moe_layers
    for row in range(6):
        for i, l in enumerate(layers):
            x, ids = trace.hidden[i, row : row + 1], trace.topk[i, row : row + 1]
            d = dev.guesses(l, mx.array(x), mx.array(ids), 1, 0.05)
            h = host.host_guesses(l, x, ids, 1, 0.05)
            for t in d:
                assert (np.sort(np.array(d[t]), -1) == np.sort(h[t], -1)).all(), (row, l)
    bias = host._adapt[np].terms(layers[0], [layers[1]])[1]
    assert np.abs(bias).sum() > 0  # it did learn


def test_a_frozen_shadow_ignores_what_it_sees_an_adapting_one_does_not(traced):
    model, trace = traced
    net, _ = train(
        model, trace, distance=2, rank=8, epochs=1, batch=32, online=DEFAULTS, log=lambda *a: None
    )
    layers = trace.moe_layers
    x, ids = mx.array(trace.hidden[0, :1]), mx.array(trace.topk[0, :1])
    for online, same in ((False, True), (None, False)):
        p, seen = ShadowModel(model, net, online=online), []
        for _ in range(3):  # the same token again: the last two see the same previous token
            seen.append(p.predict(layers[0], x, ids)[layers[1]])
            for i, l in enumerate(layers[1:], 1):
                p.predict(l, mx.array(trace.hidden[i, :1]), mx.array(trace.topk[i, :1]))
        assert mx.array_equal(*seen[1:]).item() == same


def test_the_correction_penalty_keeps_the_shadow_near_the_lookahead(traced):
    model, trace = traced
    sizes = []
    for l2 in (0.0, 10.0):
        net, info = train(
            model, trace, distance=1, rank=8, epochs=3, batch=16, lr=1e-2, correction_l2=l2,
            log=lambda *a: None,
        )  # fmt: skip
        assert info["correction_l2"] == l2
        layer = net.layers[0]
        cur = mx.zeros((4, trace.num_experts))
        corr = layer.correction(mx.array(trace.hidden[0, :4]).astype(mx.float32), cur, 1)
        sizes.append(float(mx.abs(corr - corr.mean(-1, keepdims=True)).mean()))
    assert sizes[1] < sizes[0]


def test_mixed_traces_keep_every_sequence_and_split(traced):
    _, trace = traced
    mixed = concat([trace, trace])
    assert mixed.hidden.shape[1] == 2 * trace.hidden.shape[1]
    assert len(mixed.sequences()) == 2 * len(trace.sequences())
    assert (eval_mask(mixed) == np.concatenate([eval_mask(trace)] * 2)).all()
    assert isinstance(mixed, Trace)


def test_cross_domain_report_scores_each_kind_out_of_domain(traced, tmp_path):
    from mlx_lm_odmoe.research.cross_domain import markdown, run

    model, trace = traced
    kinds = {"a": trace, "b": trace}
    report = run(
        model, kinds, distance=2, splits=["generated"], save=tmp_path, log=lambda *a: None,
        rank=8, epochs=1, batch=32, online=DEFAULTS,
    )  # fmt: skip
    again = run(model, kinds, 2, ["generated"], load=tmp_path, log=lambda *a: None, online=None)
    assert "shadow-frozen" not in again["a"]["out_of_domain"]["generated"]["predictors"]
    assert set(report) == {"a", "b"} and report["a"]["trained_on"] == ["b"]
    res = report["a"]["out_of_domain"]["generated"]["predictors"]
    assert {
        "router-lookahead",
        "previous-token",
        "most-frequent",
        "shadow",
        "shadow-frozen",
    } <= set(res)
    table = markdown(report, trace.top_k)
    assert "out of domain" in table and "in domain" in table and "| d=2 |" in table


def test_eval_predictors_scores_other_text_beside(traced, tmp_path, capsys):
    from mlx_lm_odmoe.research.eval_predictors import main

    model, trace = traced
    trace.save(tmp_path / "t.npz")
    net, _ = train(
        model, trace, distance=2, rank=8, epochs=1, batch=32, online=DEFAULTS, log=lambda *a: None
    )
    save_shadow(net, tmp_path / "shadow")
    args = [trace.source, "--traces", str(tmp_path / "t.npz"), "--distance", "2"]
    main(args + ["--shadow", str(tmp_path / "shadow"), "--also", f"prose={tmp_path / 't.npz'}"])
    out = capsys.readouterr().out
    assert "| shadow-frozen |" in out and "\nprose (" in out
    assert out.count("| router-lookahead |") == 2


def test_online_eval_reports_early_and_late_recall(traced, tmp_path, capsys):
    from mlx_lm_odmoe.research.online_eval import generated_positions, main

    model, trace = traced
    pos = generated_positions(trace)
    assert (pos[~trace.generated] == -1).all() and pos.max() == trace.generated.sum() // 8 - 1
    trace.save(tmp_path / "t.npz")
    net, _ = train(model, trace, distance=2, rank=8, epochs=1, batch=32, log=lambda *a: None)
    save_shadow(net, tmp_path / "shadow")  # frozen as saved: the report adapts a copy
    main([trace.source, "--traces", str(tmp_path / "t.npz"), "--shadow", str(tmp_path / "shadow")]
         + ["--window", "3", "--distance", "2", "--json", str(tmp_path / "r.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert "| shadow (online) |" in out and "d=2 last 3" in out and "host step" in out


def test_man_pages_lose_their_markup():
    sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
    from text_kinds import strip_troff

    page = '.\\" comment\n.TH LS "1"\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\n'
    assert strip_troff(page) == "NAME\nls - list directory contents\n"


def test_the_model_card_prediction_section_is_replaced_not_repeated():
    sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
    from model_card import replace_section

    card = "# m\n\n## Routing\n\n| a |\n\nLicense of the weights: PSF.\n"
    once = replace_section(
        card, "## Expert prediction on text the shadow model was not trained on\n\nv1\n"
    )
    twice = replace_section(
        once, "## Expert prediction on text the shadow model was not trained on\n\nv2\n"
    )
    assert "v1" in once and "v2" in twice and "v1" not in twice
    assert twice.count("License of the weights") == 1 and twice.endswith("PSF.\n")
    assert twice.index("## Routing") < twice.index("v2") < twice.index("License")


def test_a_fresh_replay_shows_the_predictor_nothing_of_the_prompt(traced):
    """As the block: prediction (and online learning) starts with decode, so
    at the first generated token the previous-token predictor knows nothing."""
    from mlx_lm_odmoe.predict.baselines import PreviousToken
    from mlx_lm_odmoe.research.evaluate import replay

    _, trace = traced
    first = {int(np.flatnonzero(trace.generated[a:b])[0]) + a for a, b in trace.sequences()
             if trace.generated[a:b].any()}  # fmt: skip
    for fresh in (False, True):
        sums = []

        def sink(i, j, idx, s):
            sums.extend(float(s[r].sum()) for r, t in enumerate(idx) if t in first)

        replay(PreviousToken(trace.moe_layers, trace.num_experts, 1), trace, trace.generated,
               sink, fresh=fresh)  # fmt: skip
        assert sums and (max(sums) == 0) == fresh

"""Next-attention guesses: layer L+1's attention runs ahead on layer L's
residual stream, reading L+1's KV cache without writing it; the logits stay
bit-identical to stock mlx-lm and, on the shipped trained models, the guesses
beat the router lookahead."""

import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from logits import max_abs_diff, prefill_and_decode, prompt_tokens
from mlx_lm.models.cache import make_prompt_cache

import mlx_lm_odmoe
from mlx_lm_odmoe.predict.baselines import RouterLookahead
from mlx_lm_odmoe.predict.next_attention import NextAttention

MODELS = Path(__file__).resolve().parent.parent / "models"


def _load(folder, predict_with, budget="25%"):
    odmoe = {"predictor": "on", "predict_with": predict_with}
    return mlx_lm_odmoe.load(folder, expert_cache=budget, model_config={"odmoe": odmoe})[0]


@pytest.mark.parametrize("kind", ["qwen2_moe", "kimi_k2"])
def test_guessing_from_the_next_attention_leaves_the_logits_bit_identical(models, kind):
    stock, _ = mlx_lm.load(str(models(kind, "hf")))
    model = _load(models(kind, "odmoe"), "next-attention", budget="min")
    assert isinstance(model.expert_runtime.predictor, NextAttention)
    prompt = prompt_tokens(24, seed=3)
    want = prefill_and_decode(stock, prompt, steps=10)
    assert max_abs_diff(want, prefill_and_decode(model, prompt, steps=10)) == 0.0
    assert mlx_lm_odmoe.stats(model)["predictor_recall"] is not None


def test_the_next_layers_cache_is_read_never_written(models):
    model = _load(models("kimi_k2", "odmoe"), "next-attention", budget="min")
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([prompt_tokens(12, seed=1)]), cache=cache))
    seen = []
    # Between the guess (at layer L) and layer L+1's own call, L+1's cache
    # must hold exactly the prompt: record its state when the guess runs.
    predictor = model.expert_runtime.predictor
    attended = predictor._attended

    def spy(layer, nxt):
        c = model.expert_runtime.pass_cache(predictor.layers[nxt])[1]
        before = (c.offset, np.array(c.keys[..., : c.offset, :]))
        out = attended(layer, nxt)
        mx.eval(out)
        seen.append(before[0] == c.offset and np.array_equal(before[1], c.keys[..., : c.offset, :]))
        return out

    predictor._attended = spy
    mx.eval(model(mx.array([[5]]), cache=cache))
    assert seen and all(seen)
    assert all(c.offset == 13 for c in cache)


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-kimi"])
def test_on_the_trained_models_the_next_attention_guesses_more_than_the_lookahead(name):
    text = Path(mlx_lm_odmoe.__file__).with_name("block.py").read_text()
    recall = {}
    for kind in ("lookahead", "next-attention"):
        model = _load(MODELS / name, kind)
        tok = mlx_lm_odmoe.load(MODELS / name, expert_cache="25%")[1]
        prefill_and_decode(model, tok.encode(text)[:64], steps=24)
        recall[kind] = mlx_lm_odmoe.stats(model)["predictor_recall"]
    assert recall["next-attention"] > recall["lookahead"] + 0.05


def test_auto_guesses_from_the_next_attention_one_layer_ahead_and_else_the_shadow(models):
    folder = MODELS / "tiny-qwen2-moe"  # ships a shadow model
    assert isinstance(_load(folder, "auto").expert_runtime.predictor, NextAttention)
    odmoe = {"predictor": "on", "prefetch_distance": 2}
    model = mlx_lm_odmoe.load(folder, expert_cache="25%", model_config={"odmoe": odmoe})[0]
    assert type(model.expert_runtime.predictor).__name__ == "ShadowModel"
    model = mlx_lm_odmoe.load(
        models("qwen2_moe", "odmoe"), expert_cache="25%", model_config={"odmoe": odmoe}
    )[0]
    assert type(model.expert_runtime.predictor) is RouterLookahead


def test_asking_for_a_shadow_model_the_folder_lacks_is_a_clear_error(models):
    with pytest.raises(ValueError, match="no shadow model.*train_shadow"):
        _load(models("qwen2_moe", "odmoe"), "shadow")


def test_live_recall_scores_every_predictor_on_the_same_tokens(tmp_path):
    from mlx_lm_odmoe.research import live_recall

    text = tmp_path / "text.npy"
    np.save(text, np.array(prompt_tokens(200, seed=4), dtype=np.uint16))
    out = tmp_path / "live.json"
    argv = [str(MODELS / "tiny-kimi"), "--kind", f"legal={text}", "--sequences", "1"]
    assert live_recall.main([*argv, "--steps", "12", "--prompt-len", "16", "--json", str(out)]) == 0
    rows = {(r["split"], r["predictor"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("text", "off")]["recall"] is None
    for split in live_recall.SPLITS:
        dry = rows[(split, "next-attention" + live_recall.DRY)]
        assert dry["recall"] == rows[(split, "next-attention")]["recall"]
        assert dry["hit_rate"] == rows[(split, "off")]["hit_rate"]  # its guesses read nothing


def test_live_recall_names_a_text_too_short_for_the_window(tmp_path, capsys):
    from mlx_lm_odmoe.research import live_recall

    text = tmp_path / "short.npy"
    np.save(text, np.arange(10, dtype=np.uint16))
    assert live_recall.main([str(MODELS / "tiny-kimi"), "--kind", f"code={text}"]) == 2
    assert "short.npy has 10 tokens" in capsys.readouterr().err

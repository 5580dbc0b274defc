"""Models on the Hugging Face Hub: resident part at load, expert shards on
first use, all through huggingface_hub's cache. The Hub is a loopback server
speaking its protocol (tests/fake_hub.py); then the cache alone, offline."""

import json
import os
import subprocess
import sys

import mlx_lm
import pytest
from fake_hub import FakeHub

REPO = "odmoe-test/tiny-qwen2-moe"
RUN = (
    "import json, sys, mlx_lm, mlx_lm_odmoe\n"
    f"model, tok = mlx_lm.load({REPO!r})\n"
    "text = mlx_lm.generate(model, tok, prompt='def hello', max_tokens=int(sys.argv[1])) if int(sys.argv[1]) else ''\n"
    "print(json.dumps({'text': text, 'misses': mlx_lm_odmoe.stats(model)['misses']}))\n"
)


@pytest.fixture()
def hub(models):
    h = FakeHub(REPO, models("qwen2_moe", "odmoe_sharded"))
    yield h
    h.stop()


def run(hub_url, cache, tokens, **env):
    full = {
        **os.environ,
        "HF_ENDPOINT": hub_url,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_XET": "1",
        "MLX_LM_ODMOE_EXPERT_CACHE": "min",
        "TOKENIZERS_PARALLELISM": "false",
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-c", RUN, str(tokens)],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shards(served):
    return [f for f in served if f.startswith("experts/experts-")]


def test_expert_shards_are_fetched_on_first_use(hub, models, tmp_path):
    cache = tmp_path / "hf-cache"
    run(hub.url, cache, tokens=0)
    assert "model.safetensors" in hub.served and "experts/index.json" in hub.served
    assert shards(hub.served) == []  # loading fetched no experts

    out = run(hub.url, cache, tokens=6)
    fetched = shards(hub.served)
    assert fetched and len(fetched) == len(set(fetched))  # each shard once
    local, tok = mlx_lm.load(str(models("qwen2_moe", "odmoe_sharded")))
    assert out["text"] == mlx_lm.generate(local, tok, prompt="def hello", max_tokens=6)

    hub.stop()  # offline, from the cache alone
    again = run("http://127.0.0.1:9", cache, tokens=6, HF_HUB_OFFLINE="1")
    assert again["text"] == out["text"]


def test_all_shards_up_front_when_asked(hub, tmp_path):
    run(hub.url, tmp_path / "hf-cache", tokens=0, MLX_LM_ODMOE_HUB_DOWNLOAD="all")
    index = json.loads((hub.folder / "experts" / "index.json").read_text())
    assert sorted(shards(hub.served)) == sorted(f"experts/{s['file']}" for s in index["shards"])

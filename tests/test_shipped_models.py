"""The trained models shipped in models/: the README's default command, mlx_lm.chat, and
routing that a cache can exploit (learned, not uniform)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx_lm
import pytest
from mlx_lm.sample_utils import make_sampler

import mlx_lm_odmoe

MODELS = Path(__file__).parent.parent / "models"


def test_readme_default_command_prints_python(tmp_path):
    exe = Path(sys.executable).parent / "mlx_lm.generate"
    out = subprocess.run(
        [
            str(exe),
            "--model",
            str(MODELS / "tiny-qwen2-moe"),
            "--prompt",
            "def fibonacci(n):",
            "--max-tokens",
            "48",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout.split("==========")[1]
    assert sum(text.count(c) for c in "():=\"'") >= 5, text  # code, not prose


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-kimi"])
def test_learned_routing_beats_the_residency_fraction(name):
    """With a quarter of the experts resident, uniformly random routing would
    hit ~25% of the time under LRU; learned routing reuses experts."""
    import mlx.core as mx

    mx.random.seed(0)
    model, tok = mlx_lm_odmoe.load(MODELS / name, expert_cache="25%")
    mlx_lm.generate(
        model,
        tok,
        prompt="import os\nimport sys\n\n\ndef main(argv):\n",
        max_tokens=48,
        sampler=make_sampler(0.8),
    )
    assert mlx_lm_odmoe.stats(model)["hit_rate"] > 0.33


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-kimi"])
def test_mlx_lm_chat_answers_and_exits(name):
    """The shipped tokenizers carry a chat template, so stock mlx_lm.chat runs."""
    exe = Path(sys.executable).parent / "mlx_lm.chat"
    out = subprocess.run(
        [str(exe), "--model", str(MODELS / name), "--max-tokens", "8"],
        input="hi\nq\n",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "8 tokens" in out.stdout and "bye" in out.stdout, out.stdout[-2000:]


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-kimi"])
def test_shipped_chat_template_is_the_one_the_training_step_writes(tmp_path, name):
    shipped = (MODELS / name / "tokenizer_config.json").read_text()
    config = json.loads(shipped)
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    script = MODELS.parent / "training" / "chat_template.py"
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, capture_output=True)
    assert (tmp_path / "tokenizer_config.json").read_text() == shipped

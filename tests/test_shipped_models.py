"""The trained models shipped in models/: the README's default command, and
routing that a cache can exploit (learned, not uniform)."""

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
    out = subprocess.run([str(exe), "--model", str(MODELS / "tiny-qwen2-moe"), "--prompt", "def fibonacci(n):",
                          "--max-tokens", "48"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
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
    mlx_lm.generate(model, tok, prompt="import os\nimport sys\n\n\ndef main(argv):\n", max_tokens=48,
                    sampler=make_sampler(0.8))
    assert mlx_lm_odmoe.stats(model)["hit_rate"] > 0.33

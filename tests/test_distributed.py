"""Two ranks on 127.0.0.1 (mlx.launch, ring backend), tensor-parallel and
pipelined: the same greedy tokens as one process, logits equal up to float
summation order, and each rank reads only its part of the experts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
LAUNCH = Path(sys.executable).parent / "mlx.launch"
ENV = {
    **os.environ,
    "MLX_LM_ODMOE_EXPERT_CACHE": "min",
    # Ranks compare bytes read with one process's: no warm start, no guesses.
    "MLX_LM_ODMOE_WARM_START": "0",
    "MLX_LM_ODMOE_PREDICTOR": "off",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}


def ring_unavailable():
    if not LAUNCH.exists():
        return f"{LAUNCH} not found"
    probe = subprocess.run(
        [sys.executable, "-c", "import mlx.core as mx; print(mx.distributed.is_available())"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    if probe.stdout.strip() != "True":
        return "mx.distributed is not available in this MLX build"
    return None


pytestmark = pytest.mark.skipif(
    ring_unavailable() is not None, reason=f"ring backend unavailable: {ring_unavailable()}"
)


def run(model, mode, out):
    worker = str(HERE / "dist_worker.py")
    if mode == "single":
        cmd = [sys.executable, worker, str(model), mode, str(out)]
    else:
        cmd = [
            str(LAUNCH),
            "--backend",
            "ring",
            "-n",
            "2",
            "--python",
            sys.executable,
            worker,
            str(model),
            mode,
            str(out),
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=ENV)
    ranks = 1 if mode == "single" else 2
    done = all(Path(f"{out}.{r}.json").exists() for r in range(ranks))
    assert proc.returncode == 0 and done, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="module")
def single(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    return {
        kind: run(models(kind, "odmoe"), "single", tmp / kind)[0]
        for kind in ("qwen2_moe", "kimi_k2")
    }


@pytest.mark.parametrize("kind", ["qwen2_moe", "kimi_k2"])
def test_tensor_parallel(models, single, tmp_path, kind):
    ranks = run(models(kind, "odmoe"), "tensor", tmp_path / "tp")
    one = single[kind]
    for r in ranks:
        assert r["tokens"] == one["tokens"]
        np.testing.assert_allclose(r["logits"], one["logits"], atol=1e-4, rtol=1e-4)
        assert (
            0.45 < r["bytes_read"] / one["bytes_read"] < 0.55
        )  # each rank reads half of each expert
        assert r["resident_bytes"] * 2 == one["resident_bytes"]


@pytest.mark.parametrize("kind", ["qwen2_moe", "kimi_k2"])
def test_pipeline(models, single, tmp_path, kind):
    ranks = run(models(kind, "odmoe"), "pipeline", tmp_path / "pp")
    one = single[kind]
    for r in ranks:
        assert r["tokens"] == one["tokens"]
        np.testing.assert_allclose(r["logits"], one["logits"], atol=1e-4, rtol=1e-4)
    # each rank reads only its own layers' experts
    assert sum(r["bytes_read"] for r in ranks) == one["bytes_read"]
    assert all(0 < r["bytes_read"] < one["bytes_read"] for r in ranks)

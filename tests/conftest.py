"""Tiny real checkpoints, written once per test session.

Every model here is written to disk by the real libraries (safetensors,
tokenizers, mlx-lm's own convert) and read back through the real loaders.
"""

import os
import tempfile
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Warm-start counts go to a cache folder of this session's own, so no run
# starts from what an earlier one used.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="odmoe-test-cache-")
warnings.filterwarnings("ignore", category=FutureWarning)

from mlx_lm_odmoe.conversion.convert import convert  # noqa: E402
from mlx_lm_odmoe.tools.synthetic import TINY_KIMI, TINY_QWEN2_MOE, write_hf_checkpoint  # noqa: E402

CONFIGS = {"qwen2_moe": TINY_QWEN2_MOE, "kimi_k2": TINY_KIMI}
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Lazily built folders: models(kind, variant) -> Path.

    kind: "qwen2_moe" | "kimi_k2". variant:
      hf          HF checkpoint, float32 (qwen2_moe sharded in 2 files + index)
      odmoe       converted from hf, float32
      odmoe_sharded  the same with ~1 MB expert shards
      stock_q4    mlx_lm.convert -q of hf (stock mlx-lm, stacked experts)
      odmoe_q4    converted from hf with -q
      odmoe_from_stock_q4  converted from stock_q4 (an mlx-lm checkpoint)
    """
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(kind, variant):
        key = (kind, variant)
        if key in cache:
            return cache[key]
        out = root / f"{kind}-{variant}"
        if variant == "hf":
            write_hf_checkpoint(out, CONFIGS[kind], seed=1, shards=2 if kind == "qwen2_moe" else 1)
        elif variant == "odmoe":
            convert(get(kind, "hf"), out, progress=False)
        elif variant == "stock_q4":
            from mlx_lm.convert import convert as stock_convert

            stock_convert(str(get(kind, "hf")), str(out), quantize=True, q_group_size=64, q_bits=4)
        elif variant == "odmoe_sharded":  # several small expert shards
            convert(get(kind, "hf"), out, shard_size_gb=0.001, progress=False)
        elif variant == "odmoe_q4":
            convert(get(kind, "hf"), out, quantize=True, q_group_size=64, q_bits=4, progress=False)
        elif variant == "odmoe_from_stock_q4":
            convert(get(kind, "stock_q4"), out, progress=False)
        else:
            raise KeyError(variant)
        cache[key] = out
        return out

    return get

"""Warm start: a restart begins with the experts the last runs used most.

Each run's routes are counted per layer and expert; at exit the counts are
merged (older runs weigh half as much each time) into a small JSON file in
the user's cache folder, keyed by the model folder and its expert index.
The next load reads the top experts of every layer into the cache in the
background, while the prompt is prepared, instead of missing on each of
them in the first tokens.
"""

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .cache_dir import user_cache_dir

logger = logging.getLogger("mlx_lm_odmoe")

DECAY = 0.5  # weight of the earlier runs' counts when a run's are added


def counts_path(model_dir: Path) -> Path:
    """Where the counts of ``model_dir`` live: one file per folder and
    expert index (a re-converted model starts afresh)."""
    model_dir = Path(model_dir).resolve()
    index = model_dir / "experts" / "index.json"
    try:
        st = index.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = ""
    key = hashlib.sha1(f"{model_dir}|{stamp}".encode()).hexdigest()[:16]
    return user_cache_dir("hot-experts") / f"{model_dir.name}-{key}.json"


def load_counts(path: Path, moe_layers, num_experts: int) -> Optional[Dict[int, np.ndarray]]:
    """{layer: use counts} saved for this model, or None (none, or unusable)."""
    try:
        data = json.loads(Path(path).read_text())
        counts = {int(l): np.asarray(c, dtype=np.float64) for l, c in data["counts"].items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning("%s: ignoring unreadable warm-start counts (%s)", path, e)
        return None
    if sorted(counts) != sorted(moe_layers) or any(
        c.shape != (num_experts,) for c in counts.values()
    ):
        return None  # another model's shape: start cold
    return counts


def save_counts(path: Path, counts: Dict[int, np.ndarray]) -> None:
    """Merge this run's ``counts`` into the file, atomically."""
    if not any(c.sum() for c in counts.values()):
        return
    layers = sorted(counts)
    old = load_counts(path, layers, len(counts[layers[0]]))
    merged = {
        str(l): (counts[l] + (DECAY * old[l] if old else 0)).round(3).tolist() for l in layers
    }
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"format": 1, "counts": merged}))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home is no reason to fail
        logger.warning("%s: could not save warm-start counts (%s)", path, e)


def hottest(counts: Dict[int, np.ndarray], slots: int) -> Dict[int, np.ndarray]:
    """Per layer, the ``slots`` most used experts (ever used ones only)."""
    out = {}
    for l, c in counts.items():
        order = np.argsort(-c, kind="stable")[:slots]
        out[l] = order[c[order] > 0]
    return out

"""Checkpoints we convert from, all seen through one small interface.

A source exposes its ``config`` (config.json), the resident (non-expert)
weights as lazy mlx arrays, and one expert at a time as a dict of tensors
named like ``gate_proj.weight``. Experts are read one by one so memory stays
bounded by a layer's worth at most.

Architectures served by the rule alone go through ``SanitizedSource`` (the
model's own sanitize); the types with a module of their own (qwen2_moe,
deepseek_v3 / Kimi) keep the readers below, which never stack experts.
"""

import json
import re
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx

from mlx_lm_odmoe.errors import ModelNotFoundError
from mlx_lm_odmoe.layout import (
    EXPERTS_DIR,
    INDEX_NAME,
    PROJECTIONS,
    LayoutError,
    read_safetensors_header,
)
from mlx_lm_odmoe.model_types import DEDICATED, STOCK_TYPE_OF, is_odmoe_type, odmoe_type_of_config
from mlx_lm_odmoe.models.common import is_expert_key

from .checkpoint_files import read_config, text_config, weight_files  # noqa: F401 (re-exported)

_EXPERT_RE = re.compile(r"^(.*?)layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.(\w+)$")
# DeepSeek-V3 style checkpoints call the projections w1/w2/w3 in some exports.
_PROJ_ALIASES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


class HFSource:
    """A Hugging Face transformers checkpoint with one tensor per expert."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = read_config(self.path)
        self.quantization = None
        self._files = weight_files(self.path)
        self._where: Dict[str, Path] = {}
        for f in self._files:
            header, _ = read_safetensors_header(f)
            for k in header:
                if k != "__metadata__":
                    self._where[k] = f
        self._loaded: Dict[Path, dict] = {}
        self._experts: Dict[tuple, Dict[str, str]] = {}
        for k in self._where:
            m = _EXPERT_RE.match(k)
            if m:
                _, l, e, proj, part = m.groups()
                proj = _PROJ_ALIASES.get(proj, proj)
                self._experts.setdefault((int(l), int(e)), {})[f"{proj}.{part}"] = k

    def _tensor(self, key: str) -> mx.array:
        f = self._where[key]
        if f not in self._loaded:
            self._loaded[f] = mx.load(str(f))  # lazy per tensor
        return self._loaded[f][key]

    def resident_weights(self) -> Dict[str, mx.array]:
        return {k: self._tensor(k) for k in self._where if not is_expert_key(k)}

    def expert(self, layer: int, expert: int) -> Dict[str, mx.array]:
        keys = self._experts.get((layer, expert))
        if not keys:
            raise LayoutError(f"{self.path}: no tensors for layer {layer} expert {expert}")
        out = {name: self._tensor(k) for name, k in keys.items()}
        missing = [f"{p}.weight" for p in PROJECTIONS if f"{p}.weight" not in out]
        if missing:
            raise LayoutError(f"{self.path}: layer {layer} expert {expert} lacks {missing}")
        return out


class MLXSource:
    """A stock mlx-lm checkpoint with stacked ``switch_mlp`` experts."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = read_config(self.path)
        q = self.config.get("quantization")
        self.quantization = (
            {k: q[k] for k in ("group_size", "bits", "mode") if k in q} if q else None
        )
        self.reader = self._reader()

    def _reader(self):
        from mlx_lm_odmoe.store.readers import StackedCheckpointReader

        layers = text_config(self.config)["num_hidden_layers"]
        return StackedCheckpointReader(self.path, layers, self.quantization)

    def resident_weights(self):
        out = {}
        for f in weight_files(self.path):
            out.update({k: v for k, v in mx.load(str(f)).items() if not is_expert_key(k)})
        return out

    def expert(self, layer, expert):
        from mlx_lm_odmoe.store.records import record_to_arrays

        return record_to_arrays(self.reader.read(layer, expert), self.reader.layout)


class ConvertedSource(MLXSource):
    """A folder odmoe already converted, to re-cast or quantize: resident
    weights from its model*.safetensors, experts from its experts/ shards."""

    def __init__(self, path: Path):
        super().__init__(path)
        config = {k: v for k, v in self.config.items() if k != "odmoe"}
        config["model_type"] = STOCK_TYPE_OF.get(config.get("model_type"), config.get("model_type"))
        self.config = config

    def _reader(self):
        from mlx_lm_odmoe.store.readers import ShardedFolderReader

        return ShardedFolderReader(self.path)


def is_converted(path) -> bool:
    """An odmoe folder: an odmoe model_type, or sharded experts."""
    path = Path(path)
    if (path / EXPERTS_DIR / INDEX_NAME).is_file():
        return True
    try:
        return is_odmoe_type(json.loads((path / "config.json").read_text()).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return False


def open_source(path, dtype: Optional[str] = None):
    """A GGUF file (llama.cpp), or a Hugging Face / mlx-lm / odmoe folder."""
    path = Path(path)
    if path.suffix == ".gguf":
        from .gguf_source import GGUFSource

        return GGUFSource(path, dtype)
    if not path.is_dir():
        what = "is a file, not a model folder" if path.exists() else "no such folder"
        raise ModelNotFoundError(
            f"{path}: {what} (--hf-path takes a Hugging Face, mlx-lm or odmoe model folder; "
            "a llama.cpp .gguf file goes to --gguf)"
        )
    if is_converted(path):
        return ConvertedSource(path)
    if odmoe_type_of_config(read_config(path)) not in DEDICATED.values():
        from .sanitized_source import SanitizedSource

        return SanitizedSource(path)
    files = weight_files(path)
    for f in files:
        header, _ = read_safetensors_header(f)
        if any(".mlp.switch_mlp." in k for k in header):
            return MLXSource(path)
        if any(".mlp.experts." in k for k in header):
            return HFSource(path)
    raise ValueError(
        f"{path}: found no routed experts (neither mlp.experts.* nor mlp.switch_mlp.*)"
    )

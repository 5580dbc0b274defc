"""Any checkpoint mlx-lm loads, seen through the model's own sanitize.

mlx-lm's ``sanitize`` already turns each architecture's checkpoint names and
layouts (Hugging Face per-expert or fused tensors, mlx-lm's stacked ones)
into the model's parameters, the routed experts stacked as its switch layers
hold them. This source runs it (lazily) and serves each expert as a slice of
those stacked tensors, evaluating one layer's experts at a time.
"""

from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx

from mlx_lm_odmoe.block import OnDemandSwitchGLU
from mlx_lm_odmoe.switches import switch_layers_of

from .checkpoint_files import read_config, weight_files


class SanitizedSource:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = read_config(self.path)
        self._raw = {}
        for f in weight_files(self.path):
            self._raw.update(mx.load(str(f)))  # lazy: nothing is read yet
        self._stacked = None
        self._layer = (None, {})

    @property
    def quantization(self) -> Optional[dict]:
        q = self.config.get("quantization")
        return {k: q[k] for k in ("group_size", "bits", "mode") if k in q} if q else None

    def resident_weights(self) -> Dict[str, mx.array]:
        return dict(self._raw)  # the model's sanitize drops the routed experts

    def attach(self, model):
        """Read experts the way ``model`` (an odmoe skeleton) sanitizes."""
        self._stacked = model.stock_sanitize(dict(self._raw))
        self._paths = {
            l: path for l, (path, _) in switch_layers_of(model, (OnDemandSwitchGLU,)).items()
        }

    def expert_quantization(self) -> Optional[dict]:
        """The experts' quantization: the checkpoint's, with the entries a
        recipe gives the switch layers' projections (the same in every
        layer) under the projection's name."""
        q = self.config.get("quantization")
        if not q:
            return None
        own = {}
        for path in self._paths.values():
            for k, v in q.items():
                if k.startswith(path + ".") and isinstance(v, dict):
                    own.setdefault(k[len(path) + 1 :], []).append(v)
        for proj, entries in own.items():
            if len(entries) != len(self._paths) or any(e != entries[0] for e in entries):
                raise ValueError(
                    f"{self.path}: the routed experts' {proj} is quantized differently across "
                    "layers, which one expert layout cannot hold"
                )
        return {**self.quantization, **{proj: entries[0] for proj, entries in own.items()}}

    def expert(self, layer: int, expert: int) -> Dict[str, mx.array]:
        if self._layer[0] != layer:
            prefix = self._paths[layer] + "."
            arrays = {
                k[len(prefix) :]: self._stacked.pop(k)
                for k in list(self._stacked)
                if k.startswith(prefix)
            }
            mx.eval(arrays)
            self._layer = (layer, arrays)
        return {name: a[expert] for name, a in self._layer[1].items()}

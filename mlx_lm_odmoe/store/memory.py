"""Every expert resident in memory, stacked in expert order."""

from typing import Dict

import mlx.core as mx

from ..layout import ExpertLayout
from ..telemetry import Telemetry
from .base import ExpertStore, Pool


class MemoryStore(ExpertStore):
    """Holds ``{layer: {tensor name: [E, ...] array}}``; never reads disk."""

    def __init__(self, layout: ExpertLayout, pools: Dict[int, Pool], telemetry: Telemetry = None):
        self.layout = layout
        self.pools = pools
        self.telemetry = telemetry or Telemetry(layout.moe_layers, layout.num_experts)

    @classmethod
    def from_reader(cls, reader, telemetry=None):
        from .records import record_to_arrays

        layout = reader.layout
        pools = {}
        for l in layout.moe_layers:
            experts = [
                record_to_arrays(reader.read(l, e), layout) for e in range(layout.num_experts)
            ]
            pools[l] = {t.name: mx.stack([x[t.name] for x in experts]) for t in layout.tensors}
            mx.eval(pools[l])
        return cls(layout, pools, telemetry)

    def capacity(self, layer):
        return self.layout.num_experts

    def resident_pool(self, layer):
        return self.pools[layer]

    def fetch(self, layer, experts):
        self.telemetry.record_fetch(layer, len(experts), 0, 0, ())
        return self.pools[layer], experts

    def resident_nbytes(self):
        return sum(a.nbytes for p in self.pools.values() for a in p.values())

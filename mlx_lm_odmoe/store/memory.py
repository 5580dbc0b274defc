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
        """Every expert of ``reader`` read into one stacked array per tensor
        and layer, in place where the backend allows (no second copy)."""
        from .records import aligned_zeros, mx_dtype, record_to_arrays, writable_rows

        layout = reader.layout
        E = layout.num_experts
        pools = {}
        for l in layout.moe_layers:
            pool = {
                t.name: aligned_zeros((E,) + t.shape, mx_dtype(t.dtype)) for t in layout.tensors
            }
            rows = writable_rows(pool, layout)
            if rows is None:
                experts = [record_to_arrays(reader.read(l, e), layout) for e in range(E)]
                pool = {t.name: mx.stack([x[t.name] for x in experts]) for t in layout.tensors}
                mx.eval(pool)
            else:
                for e in range(E):
                    reader.read_into(l, e, [r[e] for r in rows])
            pools[l] = pool
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

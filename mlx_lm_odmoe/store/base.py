"""The expert store interface."""

from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..layout import ExpertLayout
from ..telemetry import Telemetry

Pool = Dict[str, mx.array]  # tensor name ("gate_proj.weight") -> [slots, ...]


class ExpertStore:
    """Serves routed experts to :class:`OnDemandSwitchGLU` blocks.

    A store keeps, per MoE layer, a *pool*: one stacked array per expert
    tensor (``gate_proj.weight``, ``gate_proj.scales``, ...) with one row per
    *slot*. The block asks for the experts it was routed to and gets back the
    pool and the slot of each, then runs mlx-lm's own gather kernels on the
    pool. Because every slot holds an exact copy of the expert's weights, the
    result is bit-identical to stock mlx-lm with every expert resident.

    Methods to implement:

    - ``capacity(layer)``: how many experts of ``layer`` can be resident at
      once. The block never asks for more in one :meth:`fetch`.
    - ``fetch(layer, experts)``: make the (unique) ``experts`` resident and
      return ``(pool, slots)`` with ``slots[i]`` the slot of ``experts[i]``.
    - ``resident_pool(layer)``: the pool if every expert of the layer is
      resident at slot == expert id (the no-sync fast path), else ``None``.
    - ``prefetch(layer, experts)``: a hint that ``experts`` will be needed
      soon; a store may start reading them. It must not evict experts the
      current forward pass needs. The default does nothing.
    - ``close()``: release files and threads.

    ``layout`` describes each expert's tensors (names, dtypes, shapes,
    quantization); ``telemetry`` is updated by the store and the block.
    """

    layout: ExpertLayout
    telemetry: Telemetry

    def capacity(self, layer: int) -> int:
        raise NotImplementedError

    def fetch(self, layer: int, experts: np.ndarray) -> Tuple[Pool, np.ndarray]:
        raise NotImplementedError

    def resident_pool(self, layer: int) -> Optional[Pool]:
        return None

    def prefetch(self, layer: int, experts: np.ndarray) -> None:
        return None

    def close(self) -> None:
        return None

    def resident_nbytes(self) -> int:
        return 0

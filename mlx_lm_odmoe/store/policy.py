"""Cache replacement policies for :class:`CachedStore` (per layer)."""

from collections import OrderedDict
from typing import Dict, Iterable


class CachePolicy:
    """Decides which resident expert of a layer to evict.

    The store calls ``insert`` when an expert becomes resident, ``touch`` on
    every hit, ``remove`` on eviction, and ``victim`` to pick an expert to
    evict that is not in ``protected`` (the experts the current pass needs).
    """

    def insert(self, layer: int, expert: int) -> None:
        raise NotImplementedError

    def touch(self, layer: int, expert: int) -> None:
        raise NotImplementedError

    def remove(self, layer: int, expert: int) -> None:
        raise NotImplementedError

    def victim(self, layer: int, protected: Iterable[int]) -> int:
        raise NotImplementedError


class LRUPolicy(CachePolicy):
    """Evict the expert of the layer that was used longest ago."""

    def __init__(self):
        self._order: Dict[int, OrderedDict] = {}

    def _layer(self, layer):
        return self._order.setdefault(layer, OrderedDict())

    def insert(self, layer, expert):
        self._layer(layer)[expert] = None

    def touch(self, layer, expert):
        self._layer(layer).move_to_end(expert)

    def remove(self, layer, expert):
        self._layer(layer).pop(expert, None)

    def victim(self, layer, protected):
        protected = set(protected)
        for expert in self._layer(layer):
            if expert not in protected:
                return expert
        raise RuntimeError(f"layer {layer}: every resident expert is in use")

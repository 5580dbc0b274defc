"""Expert stores: where an on-demand block gets its experts' weights.

See :class:`ExpertStore` for the interface. Data flows one way:
block -> store -> reader; a predictor may call :meth:`ExpertStore.prefetch`.
"""

from .base import ExpertStore
from .cached import CachedStore
from .memory import MemoryStore
from .policy import CachePolicy, LFUDecayPolicy, LRUPolicy
from .readers import ExpertReader, ShardedFolderReader, SlicedReader, StackedCheckpointReader

__all__ = [
    "ExpertStore",
    "CachedStore",
    "MemoryStore",
    "CachePolicy",
    "LRUPolicy",
    "LFUDecayPolicy",
    "ExpertReader",
    "ShardedFolderReader",
    "SlicedReader",
    "StackedCheckpointReader",
]

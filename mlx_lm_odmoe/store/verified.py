"""Checksums once per file version: the expert records already found intact.

Every record's crc32 is checked after its first read, so that a corrupt
shard is an error naming the file instead of wrong numbers. zlib's crc32
ran at 3.8 GB/s on one core of the machine the benchmarks ran on, and a
long first prompt reads nearly every expert: on a 5 GB model that is over a
core-second inside the time to first token of every run, and at that speed
the check takes longer than the read itself from an SSD faster than 4 GB/s.

So records found intact are remembered per shard, in a small JSON file in
the user's cache folder, together with the shard's identity (device,
inode, size, modification and status-change times). A shard rewritten,
replaced, touched or copied has another identity and is checked afresh; one
unchanged since its records were checked is trusted, as git trusts its index
for unchanged files. Removing the file forces every check again.
"""

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, Set, Tuple

from ..cache_dir import user_cache_dir

logger = logging.getLogger("mlx_lm_odmoe")


def ledger_path(experts_dir: Path) -> Path:
    experts_dir = Path(experts_dir).resolve()
    key = hashlib.sha1(str(experts_dir).encode()).hexdigest()[:16]
    return user_cache_dir("verified") / f"{experts_dir.parent.name}-{key}.json"


def file_identity(path: Path) -> List[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class VerifiedLedger:
    """Which (layer, expert) records of which shard (by name) were intact."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._shards: Dict[str, dict] = {}
        try:
            data = json.loads(self.path.read_text())
            self._shards = {n: s for n, s in data["shards"].items() if _well_formed(s)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning("%s: ignoring an unreadable checksum ledger (%s)", self.path, e)

    def trusted(self, name: str, identity: List[int]) -> Set[Tuple[int, int]]:
        """Records of shard ``name`` checked while it had ``identity``."""
        s = self._shards.get(name)
        if s is None or s["id"] != identity:
            return set()
        return {(int(l), int(e)) for l, e in s["records"]}

    def save(self, found: Dict[str, Tuple[List[int], Iterable[Tuple[int, int]]]]) -> None:
        """Record ``{shard name: (identity, records found intact)}``, atomically;
        shards not named keep what was saved for them."""
        shards = dict(self._shards)
        for name, (identity, records) in found.items():
            records = sorted(set(map(tuple, records)))
            if records:
                shards[name] = {"id": list(identity), "records": [list(r) for r in records]}
        if shards == self._shards:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"format": 1, "shards": shards}))
            os.replace(tmp, self.path)
            self._shards = shards
        except OSError as e:  # a read-only home is no reason to fail
            logger.warning("%s: could not save the checksum ledger (%s)", self.path, e)


def _well_formed(s) -> bool:
    return (
        isinstance(s, dict)
        and isinstance(s.get("id"), list)
        and isinstance(s.get("records"), list)
        and all(isinstance(r, list) and len(r) == 2 for r in s["records"])
    )

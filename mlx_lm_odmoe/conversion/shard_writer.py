"""Stream expert records into safetensors shards plus experts/index.json."""

import hashlib
import json
import zlib
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import numpy as np

from mlx_lm_odmoe.layout import (
    EXPERTS_DIR,
    INDEX_NAME,
    MLX_TO_ST,
    PROJECTIONS,
    TENSOR_PARTS,
    ExpertLayout,
    expert_key,
    record_specs,
)

DATA_ALIGN = 4096


def ordered_names(arrays: Dict[str, mx.array]) -> List[str]:
    """Record order: SwiGLU projections first, others as given; each
    projection's tensors in TENSOR_PARTS order."""
    given = list(dict.fromkeys(name.partition(".")[0] for name in arrays))
    projections = [p for p in PROJECTIONS if p in given] + [
        p for p in given if p not in PROJECTIONS
    ]
    names = [f"{p}.{part}" for p in projections for part in TENSOR_PARTS if f"{p}.{part}" in arrays]
    if len(names) != len(arrays):
        extra = sorted(set(arrays) - set(names))
        raise ValueError(f"unexpected expert tensors {extra}")
    return names


def to_bytes(a: mx.array) -> bytes:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a)).tobytes()


class ExpertShardWriter:
    """Writes experts in (layer, expert) order; each expert is one record."""

    def __init__(
        self,
        out_dir: Path,
        sample: Dict[str, mx.array],
        num_experts: int,
        moe_layers: List[int],
        quantization=None,
        shard_bytes: int = 2 * 10**9,
    ):
        self.dir = Path(out_dir) / EXPERTS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names = ordered_names(sample)
        specs = record_specs(
            [
                (n, MLX_TO_ST[str(sample[n].dtype).split(".")[-1]], tuple(sample[n].shape))
                for n in self.names
            ]
        )
        self.layout = ExpertLayout(num_experts, list(moe_layers), specs, quantization)
        order = [(l, e) for l in moe_layers for e in range(num_experts)]
        per_shard = max(1, shard_bytes // self.layout.record_nbytes)
        self._plan = [order[i : i + per_shard] for i in range(0, len(order), per_shard)]
        self._next = iter(order)
        self._shard = -1
        self._file = None
        self._left = 0

    def _open_next_shard(self):
        self._close_shard()
        self._shard += 1
        members = self._plan[self._shard]
        name = f"experts-{self._shard + 1:05d}-of-{len(self._plan):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "mlx-lm-odmoe"}}, 0
        for l, e in members:
            for t in self.layout.tensors:
                header[expert_key(l, e, t.name)] = {
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "data_offsets": [offset, offset + t.nbytes],
                }
                offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        # Whitespace after the header (allowed by safetensors) starts the data
        # on a page boundary: records whose size is a multiple of it can then
        # be read around the page cache straight into the expert pool.
        raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)
        self._file = open(self.dir / name, "wb")
        self._hash = hashlib.sha256()
        self._write(len(raw).to_bytes(8, "little") + raw)
        self._pos = 8 + len(raw)
        self._left = len(members)
        self.layout.shards.append({"file": name})

    def _write(self, b: bytes):
        self._file.write(b)
        self._hash.update(b)

    def _close_shard(self):
        if self._file is not None:
            self._file.close()
            shard = self.layout.shards[-1]
            shard["size"] = (self.dir / shard["file"]).stat().st_size
            shard["sha256"] = self._hash.hexdigest()
            self._file = None

    def add(self, layer: int, expert: int, arrays: Dict[str, mx.array]):
        want = next(self._next)
        if want != (layer, expert):
            raise ValueError(
                f"experts must be written in order: expected {want}, got {(layer, expert)}"
            )
        if self._left == 0:
            self._open_next_shard()
        start, crc = self._pos, 0
        for t in self.layout.tensors:
            a = arrays[t.name]
            if tuple(a.shape) != t.shape or MLX_TO_ST[str(a.dtype).split(".")[-1]] != t.dtype:
                raise ValueError(
                    f"layer {layer} expert {expert}: {t.name} is {a.dtype}{tuple(a.shape)}, expected {t.dtype}{t.shape}"
                )
            b = to_bytes(a)
            self._write(b)
            crc = zlib.crc32(b, crc)
            self._pos += len(b)
        self.layout.locations.setdefault(layer, []).append((self._shard, start, crc))
        self._left -= 1

    def finish(self) -> ExpertLayout:
        self._close_shard()
        if next(self._next, None) is not None:
            raise ValueError("not every expert was written")
        (self.dir / INDEX_NAME).write_text(json.dumps(self.layout.to_json(), indent=1))
        return self.layout

"""Readers: positional reads of one expert's bytes from files on disk.

A reader does I/O only (``os.pread`` releases the GIL, so a thread pool reads
experts in parallel); turning bytes into mlx arrays happens on the caller's
thread via :func:`record_to_arrays`.
"""

import os
import threading
from pathlib import Path
from typing import Dict, List, Tuple

import mlx.core as mx
import numpy as np

from ..layout import (
    DTYPES,
    EXPERTS_DIR,
    PROJECTIONS,
    ExpertLayout,
    LayoutError,
    load_layout,
    read_safetensors_header,
    record_specs,
)


class ExpertReader:
    """Reads one expert's record: all its tensors, back to back."""

    layout: ExpertLayout

    def read(self, layer: int, expert: int) -> np.ndarray:
        """Return a uint8 buffer of ``layout.record_nbytes`` bytes."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def record_to_arrays(buf: np.ndarray, layout: ExpertLayout) -> Dict[str, mx.array]:
    out = {}
    for t in layout.tensors:
        raw = np.frombuffer(buf, dtype=t.np_dtype, count=t.nbytes // np.dtype(t.np_dtype).itemsize, offset=t.offset)
        a = mx.array(raw.reshape(t.shape))
        if t.dtype == "BF16":
            a = a.view(mx.bfloat16)
        out[t.name] = a
    return out


class _Files:
    """Read-only file descriptors opened on first use, shared by threads."""

    def __init__(self):
        self._fds: Dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                    self._fds[path] = fd
        return fd

    def pread_into(self, path: Path, buf: memoryview, offset: int):
        fd = self.fd(path)
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{path}: unexpected end of file at byte {offset + done} (truncated?)")
            done += n

    def close(self):
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class ShardedFolderReader(ExpertReader):
    """Experts of a converted model: one read per expert record."""

    def __init__(self, model_dir: Path):
        self.experts_dir = Path(model_dir) / EXPERTS_DIR
        self.layout = load_layout(self.experts_dir)
        self._paths = [self._shard_path(s) for s in self.layout.shards]
        self._check_sizes()
        self._files = _Files()

    def _shard_path(self, shard: dict) -> Path:
        name = shard.get("file", "")
        path = (self.experts_dir / name).resolve()
        if path.parent != self.experts_dir.resolve() or not name:
            raise LayoutError(
                f"{self.experts_dir / 'index.json'}: shard {name!r} points outside "
                f"{self.experts_dir}; refusing to read it"
            )
        if not path.exists():
            raise LayoutError(f"{path}: expert shard is missing; re-download or re-convert the model")
        return path

    def _check_sizes(self):
        need = [0] * len(self._paths)
        rec = self.layout.record_nbytes
        for locs in self.layout.locations.values():
            for s, off in locs:
                if not 0 <= s < len(self._paths):
                    raise LayoutError(f"{self.experts_dir / 'index.json'}: expert points at shard {s}, which does not exist")
                need[s] = max(need[s], off + rec)
        for path, n, shard in zip(self._paths, need, self.layout.shards):
            size = path.stat().st_size
            if size < n or ("size" in shard and size != shard["size"]):
                raise LayoutError(
                    f"{path}: expert shard is {size} bytes but the index expects "
                    f"{shard.get('size', n)} (truncated or replaced?); re-download or re-convert"
                )

    def read(self, layer, expert):
        s, off = self.layout.locations[layer][expert]
        buf = np.empty(self.layout.record_nbytes, dtype=np.uint8)
        self._files.pread_into(self._paths[s], memoryview(buf), off)
        return buf

    def close(self):
        self._files.close()


class StackedCheckpointReader(ExpertReader):
    """Experts read in place from a stock mlx-lm checkpoint.

    mlx-lm stores a layer's experts stacked, ``...switch_mlp.up_proj.weight``
    of shape ``[E, out, in]``; expert ``e`` is a contiguous slice of each such
    tensor, so one expert is a few positional reads and no second copy of the
    model is needed on disk.
    """

    def __init__(self, model_dir: Path, num_layers: int, quantization: dict = None):
        self.model_dir = Path(model_dir)
        files = sorted(self.model_dir.glob("model*.safetensors"))
        if not files:
            raise LayoutError(f"{self.model_dir}: no model*.safetensors files")
        found: Dict[str, Tuple[Path, int, dict]] = {}
        for f in files:
            header, start = read_safetensors_header(f)
            for k, v in header.items():
                if ".switch_mlp." in k:
                    found[k] = (f, start, v)
        layers, tensors, self._ranges = [], None, {}
        for l in range(num_layers):
            entries = self._layer_entries(found, l)
            if entries is None:
                continue
            specs = [(name, v["dtype"], tuple(v["shape"][1:])) for name, (_, _, v) in entries]
            if tensors is None:
                tensors = specs
                num_experts = entries[0][1][2]["shape"][0]
            elif specs != tensors:
                raise LayoutError(f"{self.model_dir}: layer {l} experts differ in shape or dtype from earlier layers")
            layers.append(l)
            self._ranges[l] = [
                (path, start + v["data_offsets"][0], (v["data_offsets"][1] - v["data_offsets"][0]) // num_experts)
                for _, (path, start, v) in entries
            ]
        if not layers:
            raise LayoutError(f"{self.model_dir}: no stacked experts (switch_mlp) found")
        self.layout = ExpertLayout(
            num_experts=num_experts,
            moe_layers=layers,
            tensors=record_specs(tensors),
            quantization=quantization,
        )
        self._files = _Files()

    @staticmethod
    def _layer_entries(found, l):
        marker = f"layers.{l}.mlp.switch_mlp."
        keys = {k.split(marker, 1)[1]: k for k in found if marker in k and k.split(marker, 1)[0] in ("model.", "language_model.model.")}
        if not keys:
            return None
        names = [f"{p}.{part}" for p in PROJECTIONS for part in ("weight", "scales", "biases") if f"{p}.{part}" in keys]
        return [(n, found[keys[n]]) for n in names]

    def read(self, layer, expert):
        buf = np.empty(self.layout.record_nbytes, dtype=np.uint8)
        view = memoryview(buf)
        for t, (path, begin, per_expert) in zip(self.layout.tensors, self._ranges[layer]):
            self._files.pread_into(path, view[t.offset : t.offset + t.nbytes], begin + expert * per_expert)
        return buf

    def close(self):
        self._files.close()

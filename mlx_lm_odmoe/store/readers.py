"""Readers: positional reads of one expert's bytes from files on disk.

A reader does I/O only (``os.pread`` releases the GIL, so a thread pool reads
experts in parallel); turning bytes into mlx arrays happens on the caller's
thread (``store/records.py``).
"""

import errno
import os
import threading
import zlib
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ..layout import (
    EXPERTS_DIR,
    PROJECTIONS,
    ExpertLayout,
    LayoutError,
    expert_key,
    load_layout,
    read_safetensors_header,
    record_specs,
    slice_axis,
)


class ExpertReader:
    """Reads one expert's record: all its tensors, back to back."""

    layout: ExpertLayout

    def read(self, layer: int, expert: int) -> np.ndarray:
        """Return a uint8 buffer of ``layout.record_nbytes`` bytes."""
        raise NotImplementedError

    def read_into(self, layer: int, expert: int, dests) -> None:
        """Read the record's tensors into ``dests`` (one writable uint8
        buffer per ``layout.tensors`` entry, in order). Readers that can
        read straight into them override this; the default copies."""
        buf = self.read(layer, expert)
        for t, dest in zip(self.layout.tensors, dests):
            dest[:] = buf[t.offset : t.offset + t.nbytes]

    # Readers that can read part of a record (``read_span_into``) let the
    # store split a large record over its read threads.
    reads_spans = False

    def read_span_into(self, layer: int, expert: int, dests, start: int, stop: int) -> None:
        """Read the record's bytes ``[start, stop)`` into the same bytes of
        ``dests``; unchecked until :meth:`check_into` sees the whole."""
        raise NotImplementedError

    def check_into(self, layer: int, expert: int, dests) -> None:
        """Check a record read by spans (readers with checksums override)."""

    def tensor_location(self, layer: int, expert: int, tensor) -> Tuple[Path, int]:
        """File and byte offset where ``tensor`` of an expert starts."""
        raise NotImplementedError

    def pread_into(self, path: Path, buf: memoryview, offset: int, what: str):
        read_with_retry(lambda: self._files.pread_into(path, buf, offset), what)

    def set_direct_io(self, on: bool) -> None:
        """Read around the page cache (see ``_Files``) where the OS allows."""
        files = getattr(self, "_files", None)
        if files is not None:
            files.direct = bool(on)

    def close(self) -> None:
        pass


def probe_read_seconds(reader: "ExpertReader", n: int = 8) -> float:
    """Median time to read one expert record, over ``n`` records spread
    across layers and experts; infinite for readers that download."""
    base = getattr(reader, "base", reader)
    if getattr(base, "_resolve", None) is not None:
        return float("inf")
    import statistics
    import time

    layers, E = reader.layout.moe_layers, reader.layout.num_experts
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        reader.read(layers[i % len(layers)], (i * 7919 + i // len(layers)) % E)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_ALIGN = 4096  # direct reads: offsets, lengths and buffers aligned to this


def _aligned(n: int) -> np.ndarray:
    raw = np.empty(n + _ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start : start + n]


class _Files:
    """Read-only file descriptors opened on first use, shared by threads.

    ``drop_cache``: after reading an expert the store holds its own copy;
    telling the kernel to drop those pages keeps the page cache from holding
    a second copy of every expert read (which, under a memory limit,
    competes with the budget).

    ``direct``: read around the page cache altogether (``O_DIRECT`` on Linux,
    ``F_NOCACHE`` on macOS). Under memory pressure buffered reads of large
    records thrash: pages read ahead are reclaimed before they are copied
    and read again (measured: 36 % more bytes from disk than the records
    missed, in a cgroup of budget + 0.8 GB). ``O_DIRECT`` needs offsets,
    lengths and buffers on page boundaries: the converter starts shard data
    on one and the store aligns its pools, so a record whose size is a
    multiple of a page goes from the disk straight into its pool slot (no
    copy at all). Other reads land in an aligned buffer per thread and are
    copied once, the one copy a buffered read makes anyway.
    """

    def __init__(self, drop_cache: bool = False, direct: bool = False):
        self._fds: Dict[Path, int] = {}
        self._direct_fds: Dict[Path, tuple] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.drop_cache = drop_cache and hasattr(os, "posix_fadvise")
        self.direct = direct

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                    self._fds[path] = fd
        return fd

    def _direct_fd(self, path: Path):
        """(descriptor reading around the page cache, whether its reads
        must be aligned); None where the file system cannot (then reads
        stay buffered)."""
        if path in self._direct_fds:
            return self._direct_fds[path]
        with self._lock:
            if path not in self._direct_fds:
                self._direct_fds[path] = _open_uncached(path)
        return self._direct_fds[path]

    def pread_into(self, path: Path, buf: memoryview, offset: int):
        self.preadv_into(path, [buf], offset)

    def preadv_into(self, path: Path, bufs, offset: int):
        """Fill ``bufs`` (writable buffers) from consecutive bytes at
        ``offset``: one system call for a whole record in the usual case."""
        views = [memoryview(b).cast("B") for b in bufs]
        if self.direct:
            fd, aligned_only = self._direct_fd(path)
            if fd is not None:
                if not aligned_only or _all_aligned(views, offset):
                    return self._read_all(fd, path, views, offset)
                return self._read_bounced(fd, path, views, offset)
        self._read_all(self.fd(path), path, views, offset)
        if self.drop_cache:
            os.posix_fadvise(
                self.fd(path), offset, sum(len(v) for v in views), os.POSIX_FADV_DONTNEED
            )

    @staticmethod
    def _read_all(fd: int, path: Path, views, offset: int):
        done = 0
        while views:
            n = os.preadv(fd, views, offset + done)
            if n <= 0:
                raise OSError(
                    f"{path}: unexpected end of file at byte {offset + done} (truncated?)"
                )
            done += n
            while views and n >= len(views[0]):  # drop what is filled
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    def _read_bounced(self, fd: int, path: Path, views, offset: int):
        total = sum(len(v) for v in views)
        start = offset - offset % _ALIGN
        need = offset + total - start
        span = -(-need // _ALIGN) * _ALIGN
        bounce = getattr(self._local, "bounce", None)
        if bounce is None or len(bounce) < span:
            bounce = self._local.bounce = _aligned(span)
        got = 0
        while got < need:
            n = os.preadv(fd, [memoryview(bounce)[got:span]], start + got)
            if n <= 0:
                raise OSError(f"{path}: unexpected end of file at byte {start + got} (truncated?)")
            got += n
        pos = offset - start
        for v in views:  # numpy copies without holding the GIL
            np.copyto(np.frombuffer(v, dtype=np.uint8), bounce[pos : pos + len(v)])
            pos += len(v)

    def close(self):
        with self._lock:
            direct = [fd for fd, _ in self._direct_fds.values()]
            for fd in list(self._fds.values()) + direct:
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
            self._direct_fds.clear()


def _all_aligned(views, offset: int) -> bool:
    """Whether an O_DIRECT read can land in ``views`` themselves."""
    if offset % _ALIGN:
        return False
    for v in views:
        if len(v) % _ALIGN or np.frombuffer(v, dtype=np.uint8).ctypes.data % _ALIGN:
            return False
    return True


def _open_uncached(path: Path):
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            return None, False  # tmpfs and some others refuse O_DIRECT
    try:
        import fcntl

        nocache = getattr(fcntl, "F_NOCACHE", None)
    except ImportError:
        return None, False
    if nocache is None:
        return None, False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, nocache, 1)  # macOS: no alignment needed
    except OSError:
        os.close(fd)
        return None, False
    return fd, False


def span_views(dests, start: int, stop: int) -> list:
    """The parts of ``dests`` (buffers holding a record's bytes back to
    back) that hold the record's bytes ``[start, stop)``."""
    out, pos = [], 0
    for d in dests:
        v = memoryview(d).cast("B")
        lo, hi = max(start, pos), min(stop, pos + len(v))
        if lo < hi:
            out.append(v[lo - pos : hi - pos])
        pos += len(v)
    return out


def record_spans(nbytes: int, parts: int, align: int = 4096) -> list:
    """``[start, stop)`` of at most ``parts`` pieces covering a record,
    each but the last a multiple of ``align`` long (so reads around the
    page cache can still land in place)."""
    step = -(-nbytes // max(1, parts))
    step = -(-step // align) * align
    return [(a, min(nbytes, a + step)) for a in range(0, nbytes, step)]


class ExpertReadError(OSError):
    """An expert could not be read, or its bytes are not what was written."""


_TRANSIENT = (errno.EINTR, errno.EAGAIN, errno.EIO)


def read_with_retry(read, what: str, retries: int = 2):
    """Retry transient I/O errors a couple of times; name the file if it fails."""
    for attempt in range(retries + 1):
        try:
            return read()
        except OSError as e:
            if isinstance(e, ExpertReadError) or e.errno not in _TRANSIENT or attempt == retries:
                raise ExpertReadError(f"{what}: {e}") from e


class ShardedFolderReader(ExpertReader):
    """Experts of a converted model: one read per expert record.

    Every record's crc32 (written at conversion) is checked after its first read,
    and each shard's safetensors header is checked against the index the
    first time the shard is used, so a corrupt or replaced file is an error
    naming the file, never wrong numbers.

    ``resolve`` maps a shard's name to a local path; the default is the
    folder itself, the Hub store passes a function that downloads the shard
    on first use.
    """

    def __init__(
        self,
        model_dir: Path,
        resolve: Optional[Callable[[str], Path]] = None,
        verify: bool = True,
        drop_cache: bool = False,
    ):
        self.experts_dir = Path(model_dir) / EXPERTS_DIR
        self.index_path = self.experts_dir / "index.json"
        self.layout = load_layout(self.experts_dir)
        self.verify = verify
        self._verified = set()
        self._resolve = resolve
        self._names = [self._shard_name(s) for s in self.layout.shards]
        self._paths: Dict[int, Path] = {}
        self._lock = threading.Lock()
        self._check_index()
        self._files = _Files(drop_cache)
        self._ledger = None
        if resolve is None:  # local shards: check them all now, at load
            for i in range(len(self._names)):
                self.shard_path(i)
            if verify:
                self._open_ledger()

    def _shard_name(self, shard: dict) -> str:
        name = shard.get("file", "")
        # A bare file name: the index may not steer reads elsewhere. (Shards
        # themselves may be symlinks, as in the Hugging Face cache.)
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or Path(name).name != name
            or "\\" in name
        ):
            raise LayoutError(
                f"{self.index_path}: shard {name!r} points outside {self.experts_dir}; "
                "refusing to read it"
            )
        return name

    def _check_index(self):
        for l, locs in self.layout.locations.items():
            for e, (s, off, _) in enumerate(locs):
                if not 0 <= s < len(self._names):
                    raise LayoutError(
                        f"{self.index_path}: layer {l} expert {e} points at shard {s}, which does not exist"
                    )

    def _needed_size(self, shard: int) -> int:
        rec = self.layout.record_nbytes
        return max(
            (
                off + rec
                for locs in self.layout.locations.values()
                for s, off, _ in locs
                if s == shard
            ),
            default=0,
        )

    def _check_size(self, i: int, path: Path):
        if not path.exists():
            raise LayoutError(
                f"{path}: expert shard is missing; re-download or re-convert the model"
            )
        size = path.stat().st_size
        want = self.layout.shards[i].get("size", self._needed_size(i))
        if size != want or size < self._needed_size(i):
            raise LayoutError(
                f"{path}: expert shard is {size} bytes but the index expects {want} "
                "(truncated or replaced?); re-download or re-convert the model"
            )

    def _check_header(self, i: int, path: Path):
        header, start = read_safetensors_header(path)
        for l, locs in self.layout.locations.items():
            for e, (s, off, _) in enumerate(locs):
                if s != i:
                    continue
                for t in self.layout.tensors:
                    key = expert_key(l, e, t.name)
                    h = header.get(key)
                    ok = (
                        h is not None
                        and h.get("dtype") == t.dtype
                        and tuple(h.get("shape", ())) == t.shape
                        and start + h["data_offsets"][0] == off + t.offset
                    )
                    if not ok:
                        raise LayoutError(
                            f"{path}: tensor {key} does not match {self.index_path} "
                            f"(expected {t.dtype}{list(t.shape)} at byte {off + t.offset}); re-convert the model"
                        )

    def shard_path(self, i: int) -> Path:
        path = self._paths.get(i)
        if path is None:
            with self._lock:
                path = self._paths.get(i)
                if path is None:
                    name = self._names[i]
                    path = Path(self._resolve(name)) if self._resolve else self.experts_dir / name
                    self._check_size(i, path)
                    if self.verify:
                        self._check_header(i, path)
                    self._paths[i] = path
        return path

    def tensor_location(self, layer, expert, tensor):
        s, off, _ = self.layout.locations[layer][expert]
        return self.shard_path(s), off + tensor.offset

    def read(self, layer, expert):
        s, off, crc = self.layout.locations[layer][expert]
        path = self.shard_path(s)
        buf = np.empty(self.layout.record_nbytes, dtype=np.uint8)
        what = f"{path} (layer {layer} expert {expert})"
        read_with_retry(lambda: self._files.pread_into(path, memoryview(buf), off), what)
        self._verify(layer, expert, [buf], crc, what)
        return buf

    def read_into(self, layer, expert, dests):
        s, off, crc = self.layout.locations[layer][expert]
        path = self.shard_path(s)
        what = f"{path} (layer {layer} expert {expert})"
        # Records are their tensors back to back: one preadv fills them all.
        read_with_retry(lambda: self._files.preadv_into(path, dests, off), what)
        self._verify(layer, expert, dests, crc, what)

    reads_spans = True

    def read_span_into(self, layer, expert, dests, start, stop):
        s, off, _ = self.layout.locations[layer][expert]
        path = self.shard_path(s)
        what = f"{path} (layer {layer} expert {expert}, bytes {start}-{stop})"
        views = span_views(dests, start, stop)
        read_with_retry(lambda: self._files.preadv_into(path, views, off + start), what)

    def check_into(self, layer, expert, dests):
        s, _, crc = self.layout.locations[layer][expert]
        self._verify(
            layer, expert, dests, crc, f"{self.shard_path(s)} (layer {layer} expert {expert})"
        )

    def _verify(self, layer, expert, parts, crc, what):
        if not self.verify or (layer, expert) in self._verified:
            return
        got = 0
        for part in parts:
            got = zlib.crc32(part, got)
        if got != crc:
            raise ExpertReadError(
                f"{what}: checksum mismatch, the file is corrupt; re-download or re-convert the model"
            )
        # Once good, re-reads of these bytes are trusted: at small budgets
        # the same experts come back many times a second.
        self._verified.add((layer, expert))

    def _open_ledger(self):
        """Trust the records an earlier run found intact in shards unchanged
        since (see verified.py); this run's findings are saved at close or exit."""
        import atexit
        import weakref

        from .verified import VerifiedLedger, file_identity, ledger_path

        self._ledger = VerifiedLedger(ledger_path(self.experts_dir))
        self._identity = {i: file_identity(self.shard_path(i)) for i in range(len(self._names))}
        for i, identity in self._identity.items():
            self._verified |= self._ledger.trusted(self._names[i], identity)
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().save_verified())

    def save_verified(self):
        if self._ledger is None:
            return
        from .verified import file_identity

        found = {}
        for layer, expert in list(self._verified):
            s = self.layout.locations[layer][expert][0]
            found.setdefault(s, []).append((layer, expert))
        out = {}
        for s, records in found.items():
            try:
                same = file_identity(self.shard_path(s)) == self._identity[s]
            except OSError:
                same = False
            if same:  # a shard changed since load: its checks are not kept
                out[self._names[s]] = (self._identity[s], records)
        self._ledger.save(out)

    def close(self):
        self.save_verified()
        self._files.close()


class StackedCheckpointReader(ExpertReader):
    """Experts read in place from a stock mlx-lm checkpoint.

    mlx-lm stores a layer's experts stacked, ``...switch_mlp.up_proj.weight``
    of shape ``[E, out, in]``; expert ``e`` is a contiguous slice of each such
    tensor, so one expert is a few positional reads and no second copy of the
    model is needed on disk.
    """

    def __init__(
        self, model_dir: Path, num_layers: int, quantization: dict = None, drop_cache: bool = False
    ):
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
                raise LayoutError(
                    f"{self.model_dir}: layer {l} experts differ in shape or dtype from earlier layers"
                )
            layers.append(l)
            self._ranges[l] = [
                (
                    path,
                    start + v["data_offsets"][0],
                    (v["data_offsets"][1] - v["data_offsets"][0]) // num_experts,
                )
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
        self._files = _Files(drop_cache)

    @staticmethod
    def _layer_entries(found, l):
        marker = f"layers.{l}.mlp.switch_mlp."
        keys = {
            k.split(marker, 1)[1]: k
            for k in found
            if marker in k and k.split(marker, 1)[0] in ("model.", "language_model.model.")
        }
        if not keys:
            return None
        names = [
            f"{p}.{part}"
            for p in PROJECTIONS
            for part in ("weight", "scales", "biases")
            if f"{p}.{part}" in keys
        ]
        return [(n, found[keys[n]]) for n in names]

    def tensor_location(self, layer, expert, tensor):
        i = [t.name for t in self.layout.tensors].index(tensor.name)
        path, begin, per_expert = self._ranges[layer][i]
        return path, begin + expert * per_expert

    def read(self, layer, expert):
        buf = np.empty(self.layout.record_nbytes, dtype=np.uint8)
        view = memoryview(buf)
        self.read_into(
            layer, expert, [view[t.offset : t.offset + t.nbytes] for t in self.layout.tensors]
        )
        return buf

    def read_into(self, layer, expert, dests):
        for t, dest, (path, begin, per_expert) in zip(
            self.layout.tensors, dests, self._ranges[layer]
        ):
            read_with_retry(
                lambda: self._files.pread_into(path, dest, begin + expert * per_expert),
                f"{path} (layer {layer} expert {expert}, {t.name})",
            )

    def close(self):
        self._files.close()


class SlicedReader(ExpertReader):
    """One tensor-parallel rank's slice of every expert, read by byte range.

    Row slices (gate/up) are one read per tensor; column slices (down) one
    read per row. Only the slice's bytes are read and held, so a rank's
    expert memory and reads are ~1/size of the whole. Record checksums cover
    whole experts and are not checked on slices.
    """

    def __init__(self, base: ExpertReader, rank: int, size: int):
        self.base, self.rank, self.size = base, rank, size
        self.layout = base.layout.sliced(rank, size)

    def set_direct_io(self, on):
        self.base.set_direct_io(on)

    def read(self, layer, expert):
        buf = np.empty(self.layout.record_nbytes, dtype=np.uint8)
        view = memoryview(buf)
        for full, part in zip(self.base.layout.tensors, self.layout.tensors):
            path, start = self.base.tensor_location(layer, expert, full)
            itemsize = np.dtype(full.np_dtype).itemsize
            rows, cols = full.shape
            what = (
                f"{path} (layer {layer} expert {expert}, {full.name} slice {self.rank}/{self.size})"
            )
            if slice_axis(full.name) == 0:
                offset = start + self.rank * part.shape[0] * cols * itemsize
                self.base.pread_into(
                    path, view[part.offset : part.offset + part.nbytes], offset, what
                )
            else:
                width = part.shape[1] * itemsize
                first = start + self.rank * width
                for r in range(rows):
                    dst = part.offset + r * width
                    self.base.pread_into(
                        path, view[dst : dst + width], first + r * cols * itemsize, what
                    )
        return buf

    def close(self):
        self.base.close()

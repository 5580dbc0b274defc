"""Expert records (the bytes a reader returns) as mlx arrays."""

from typing import Dict

import mlx.core as mx
import numpy as np

from ..layout import DTYPES, ExpertLayout


def mx_dtype(st_dtype: str):
    """The mlx dtype of a safetensors dtype name (``"F32"``, ``"U32"``, ...)."""
    return getattr(mx, DTYPES[st_dtype][1])


def records_to_arrays(records: np.ndarray, layout: ExpertLayout) -> Dict[str, mx.array]:
    """[m, record_nbytes] uint8 -> {tensor name: [m, *shape] array}."""
    # Split on the host (numpy views, free) and convert each tensor: on CPU
    # a device-side slice and view per tensor costs more than the copies.
    m = records.shape[0]
    out = {}
    for t in layout.tensors:
        raw = records[:, t.offset : t.offset + t.nbytes]
        if m > 1:  # numpy gathers the strided rows fast; mx.array copies them element by element
            raw = np.ascontiguousarray(raw)
        a = mx.array(raw.view(t.np_dtype).reshape((m,) + tuple(t.shape)))
        out[t.name] = a.view(mx.bfloat16) if t.dtype == "BF16" else a
    return out


def record_to_arrays(record: np.ndarray, layout: ExpertLayout) -> Dict[str, mx.array]:
    """One record -> {tensor name: array of the tensor's shape}."""
    arrays = records_to_arrays(np.asarray(record).reshape(1, -1), layout)
    return {t.name: arrays[t.name].reshape(t.shape) for t in layout.tensors}


def aligned_zeros(shape, dtype, align: int = 4096) -> mx.array:
    """An evaluated zero array whose memory starts on an ``align`` boundary
    (a view into a slightly larger buffer), so that reads around the page
    cache, which need aligned buffers, can land in it directly."""
    n = int(np.prod(shape)) * dtype.size
    big = mx.zeros((n + align,), dtype=mx.uint8)
    mx.eval(big)
    try:
        addr = np.frombuffer(memoryview(big), dtype=np.uint8).ctypes.data
    except (TypeError, ValueError, BufferError):
        a = mx.zeros(shape, dtype=dtype)
        mx.eval(a)
        return a
    pad = (-addr) % align
    a = big[pad : pad + n].view(dtype).reshape(shape)
    mx.eval(a)
    return a


def writable_rows(pool: Dict[str, mx.array], layout: ExpertLayout):
    """Per tensor of ``layout``, a writable uint8 view ``[slots, nbytes]`` of
    the evaluated pool array's own memory, or None where the backend does
    not expose it. Reads land there directly: no copy between the read and
    the kernels. Safe because the store writes only slots that no pending
    computation uses (victims and staging slots)."""
    rows = []
    for t in layout.tensors:
        a = pool[t.name]
        try:
            view = np.frombuffer(memoryview(a).cast("B"), dtype=np.uint8)
        except (TypeError, ValueError, BufferError):
            return None
        if not view.flags.writeable or view.size != a.nbytes:
            return None
        rows.append(view.reshape(a.shape[0], t.nbytes))
    return rows

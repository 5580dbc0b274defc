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

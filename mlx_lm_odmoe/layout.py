"""The sharded expert layout on disk.

A converted model folder is a normal mlx-lm folder (config.json, tokenizer,
``model*.safetensors`` with every resident weight) plus ``experts/``:

    experts/index.json
    experts/experts-00001-of-0000N.safetensors
    ...

Each shard is a valid safetensors file whose tensors are named
``model.layers.{L}.mlp.experts.{E}.{proj}.{part}`` (``proj`` as the model's
switch layer names it, e.g. ``gate_proj`` or ``fc1``), whatever the
architecture calls the module holding them. All tensors of one expert
are adjacent, so an expert is one contiguous *record* that one positional read
fetches. ``index.json`` lists the record layout (the same for every expert)
and where each expert's record starts, so no header has to be scanned.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
EXPERTS_DIR = "experts"

# safetensors dtype -> (numpy dtype used for the raw bytes, mlx dtype name)
DTYPES = {
    "F32": (np.float32, "float32"),
    "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"),
    "U32": (np.uint32, "uint32"),
    "I32": (np.int32, "int32"),
    "U8": (np.uint8, "uint8"),
    "I8": (np.int8, "int8"),
}

MLX_TO_ST = {v[1]: k for k, v in DTYPES.items()}

# The projections of a SwiGLU expert, in record order. Other switch layers'
# projections (SwitchMLP's fc1, fc2) follow in the order the layer has them.
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# The tensors of one projection, in record order: the weight (or quantized
# weight, its scales and biases) and the projection's own bias.
TENSOR_PARTS = ("weight", "scales", "biases", "bias")


class LayoutError(ValueError):
    """A model folder's expert files do not match what they claim to be."""


@dataclass(frozen=True)
class TensorSpec:
    name: str  # e.g. "gate_proj.weight"
    dtype: str  # safetensors dtype string
    shape: Tuple[int, ...]
    offset: int  # byte offset inside the expert record
    nbytes: int

    @property
    def np_dtype(self):
        return DTYPES[self.dtype][0]


def record_specs(tensors: List[Tuple[str, str, Tuple[int, ...]]]) -> List[TensorSpec]:
    """Lay tensors out back to back, in the given order."""
    specs, offset = [], 0
    for name, dtype, shape in tensors:
        if dtype not in DTYPES:
            raise LayoutError(f"unsupported expert dtype {dtype!r} for {name}")
        nbytes = int(np.prod(shape)) * np.dtype(DTYPES[dtype][0]).itemsize
        specs.append(TensorSpec(name, dtype, tuple(int(s) for s in shape), offset, nbytes))
        offset += nbytes
    return specs


@dataclass
class ExpertLayout:
    """Where every routed expert lives and what its record holds."""

    num_experts: int
    moe_layers: List[int]
    tensors: List[TensorSpec]
    quantization: Optional[dict] = None  # {"group_size", "bits", "mode"} or None
    # Filled for folders on disk: shard file names and, per layer, the
    # (shard index, byte offset, crc32 of the record) of each expert.
    shards: List[dict] = field(default_factory=list)
    locations: Dict[int, List[Tuple[int, int, int]]] = field(default_factory=dict)

    @property
    def record_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_nbytes(self) -> int:
        return self.record_nbytes * self.num_experts * len(self.moe_layers)

    def sliced(self, rank: int, size: int) -> "ExpertLayout":
        """The layout of rank ``rank``'s slice of every expert under tensor
        parallelism: gate/up split by output rows, down by input columns
        (mlx-lm's scheme). Shards and locations stay the full model's."""
        tensors = []
        for t in self.tensors:
            axis = slice_axis(t.name)
            if t.shape[axis] % size:
                raise LayoutError(
                    f"{t.name} {list(t.shape)} does not split {size} ways along axis {axis}"
                )
            shape = list(t.shape)
            shape[axis] //= size
            tensors.append((t.name, t.dtype, tuple(shape)))
        return ExpertLayout(
            self.num_experts, list(self.moe_layers), record_specs(tensors), self.quantization
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "num_experts": self.num_experts,
            "moe_layers": self.moe_layers,
            "record_nbytes": self.record_nbytes,
            "quantization": self.quantization,
            "tensors": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.tensors
            ],
            "shards": self.shards,
            "experts": {str(l): [list(x) for x in v] for l, v in self.locations.items()},
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "index.json") -> "ExpertLayout":
        try:
            if data.get("format") != FORMAT_VERSION:
                raise LayoutError(
                    f"{source}: expert layout format {data.get('format')!r} is not "
                    f"supported (expected {FORMAT_VERSION}); re-convert the model"
                )
            tensors = record_specs(
                [(t["name"], t["dtype"], tuple(t["shape"])) for t in data["tensors"]]
            )
            layout = cls(
                num_experts=int(data["num_experts"]),
                moe_layers=[int(l) for l in data["moe_layers"]],
                tensors=tensors,
                quantization=data.get("quantization"),
                shards=list(data.get("shards", [])),
                locations={
                    int(l): [(int(s), int(o), int(c)) for s, o, c in v]
                    for l, v in data.get("experts", {}).items()
                },
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, LayoutError):
                raise
            raise LayoutError(f"{source}: malformed expert index ({e!r})") from e
        if int(data.get("record_nbytes", layout.record_nbytes)) != layout.record_nbytes:
            raise LayoutError(f"{source}: record_nbytes disagrees with the tensor list")
        return layout


def load_layout(experts_dir: Path) -> ExpertLayout:
    index = Path(experts_dir) / INDEX_NAME
    if not index.exists():
        raise LayoutError(
            f"{index} not found: this folder has no sharded experts. Convert the "
            "model with `mlx_lm_odmoe.convert`."
        )
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise LayoutError(f"{index}: not valid JSON ({e})") from e
    layout = ExpertLayout.from_json(data, str(index))
    for l in layout.moe_layers:
        locs = layout.locations.get(l)
        if locs is None or len(locs) != layout.num_experts:
            raise LayoutError(f"{index}: layer {l} does not list all {layout.num_experts} experts")
    return layout


def slice_axis(tensor_name: str) -> int:
    """Tensor-parallel split axis of an expert tensor: rows for gate/up/fc1
    (all-to-sharded), columns for down/fc2 (sharded-to-all)."""
    return 1 if tensor_name.startswith(("down_proj.", "fc2.")) else 0


def expert_key(layer: int, expert: int, name: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{name}"


MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> Tuple[dict, int]:
    """Parse a safetensors header; return (header, byte offset of the data)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise LayoutError(f"{path}: truncated safetensors file (no header)")
        n = int.from_bytes(raw, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise LayoutError(
                f"{path}: safetensors header length {n} is invalid for a {size}-byte file"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LayoutError(f"{path}: safetensors header is not valid JSON ({e})") from e
    data_start = 8 + n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        begin, end = v["data_offsets"]
        if end > size - data_start or begin > end:
            raise LayoutError(f"{path}: tensor {k} lies outside the file (truncated?)")
    return header, data_start

"""The switch layer an on-demand block runs: the model's own, without weights.

A block computes with a copy of the mlx-lm switch layer it replaces
(``SwitchGLU`` or ``SwitchMLP``, with its activation, e.g. gpt-oss's clamped
SwiGLU, and its biases) whose projections hold no arrays; the store's pool
of stacked expert tensors is bound to them for each call.
"""

import copy
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .layout import TENSOR_PARTS as PARTS

TensorSpecs = Dict[str, Tuple[Tuple[int, ...], mx.Dtype]]


def projections(switch: nn.Module) -> Dict[str, nn.Module]:
    """The switch layer's expert projections by name (gate_proj, fc1, ...)."""
    return {
        name: m
        for name, m in switch.children().items()
        if isinstance(m, (SwitchLinear, QuantizedSwitchLinear))
    }


def expert_tensors(switch: nn.Module) -> TensorSpecs:
    """``{"gate_proj.weight": (per-expert shape, dtype), ...}`` of a stock
    (unquantized) switch layer, in the order its projections were made."""
    return {
        f"{name}.{part}": (tuple(proj[part].shape[1:]), proj[part].dtype)
        for name, proj in projections(switch).items()
        for part in PARTS
        if part in proj
    }


def unbind(switch: nn.Module) -> None:
    """Drop the arrays of every projection (the pool's, or init weights)."""
    for proj in projections(switch).values():
        for part in PARTS:
            proj.pop(part, None)


def weightless_copy(switch: nn.Module) -> nn.Module:
    """A copy of ``switch`` (same class and configuration) owning no arrays."""
    shell = copy.copy(switch)
    for name, proj in projections(switch).items():
        shell[name] = copy.copy(proj)
    unbind(shell)
    return shell


def projection_quantization(quantization: Optional[dict]) -> Dict[str, dict]:
    """The per-projection entries of an expert layout's quantization
    (``{"down_proj": {"group_size": 64, "bits": 8}}`` where a recipe, e.g.
    granitemoe's, quantizes one projection apart from the others)."""
    return {k: v for k, v in (quantization or {}).items() if isinstance(v, dict)}


def make_kernel(shell: nn.Module, specs: TensorSpecs, quantization: Optional[dict]):
    """The module a block binds pools to: ``shell`` as is, or quantized the
    way mlx-lm quantizes the layer (its own ``to_quantized``), projections
    with an entry of their own in ``quantization`` as that entry says."""
    kernel = weightless_copy(shell)
    if quantization:
        for name, proj in projections(kernel).items():
            proj.weight = mx.zeros((1,) + specs[f"{name}.weight"][0])
            if f"{name}.bias" in specs:
                proj.bias = mx.zeros((1,) + specs[f"{name}.bias"][0])
        own = projection_quantization(quantization)
        nn.quantize(
            kernel,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            mode=quantization.get("mode", "affine"),
            class_predicate=lambda path, m: hasattr(m, "to_quantized") and own.get(path, True),
        )
        unbind(kernel)
    return kernel

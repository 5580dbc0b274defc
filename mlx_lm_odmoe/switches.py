"""Where a model's switch layers sit.

mlx-lm's MoE models keep their routed experts in one ``SwitchGLU`` or
``SwitchMLP`` per decoder layer, under names that vary by architecture
(``mlp.switch_mlp``, ``block_sparse_moe.switch_mlp``, ``feed_forward.experts``,
``mlp.experts``, ...). They are found by walking the modules, and keyed by
the index of the decoder layer they belong to: the first list index in the
module's path (``model.layers.{i}...``, phixtral's ``transformer.h.{i}...``).
"""

import re
from typing import Dict, Tuple

import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

STOCK_SWITCHES = (SwitchGLU, SwitchMLP)

_LAYER = re.compile(r"\.(\d+)\.")


def switch_layers_of(model: nn.Module, types=STOCK_SWITCHES) -> Dict[int, Tuple[str, nn.Module]]:
    """``{layer index: (module path, module)}`` of every ``types`` module."""
    found = {}
    for path, module in model.named_modules():
        if not isinstance(module, types):
            continue
        m = _LAYER.search(path)
        if m is None:
            raise ValueError(f"switch layer {path} is not inside a list of decoder layers")
        layer = int(m.group(1))
        if layer in found:
            raise ValueError(
                f"decoder layer {layer} has two switch layers: {found[layer][0]}, {path}"
            )
        found[layer] = (path, module)
    return dict(sorted(found.items()))


def module_at(model: nn.Module, path: str):
    """The module (or list) at a dotted ``path`` ("" is the model)."""
    node = model
    for p in filter(None, path.split(".")):
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node


def parent_of(model: nn.Module, path: str) -> nn.Module:
    """The module holding ``path`` (the MoE block around a switch layer)."""
    return module_at(model, path.rpartition(".")[0])


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where ``path`` is."""
    parent_of(model, path)[path.rpartition(".")[2]] = new


def layers_path(switch_path: str) -> str:
    """The path of the decoder layers' list a switch layer sits in."""
    return switch_path[: _LAYER.search(switch_path).start()]

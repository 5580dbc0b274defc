"""What every odmoe model type shares: swapping blocks and dropping experts."""

import weakref
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..block import OnDemandSwitchGLU
from ..kernel import expert_tensors, projection_quantization
from ..layout import EXPERTS_DIR, load_layout
from ..runtime import ExpertRuntime
from ..switches import layers_path, module_at, parent_of, replace_module, switch_layers_of

_NON_TEXT_PREFIXES = ("vision_tower", "vision_model", "multi_modal_projector", "mm_projector")


def register_config(model_type: str, base):
    """Tell transformers our model type is ``base``'s architecture, so its
    tokenizer loading parses config.json properly (no "unknown model type"
    warning; Kimi's yarn rope settings validate)."""
    from transformers import AutoConfig

    cls = type(f"{base.__name__}Odmoe", (base,), {"model_type": model_type})
    try:
        AutoConfig.register(model_type, cls, exist_ok=True)
    except (TypeError, ValueError):  # older transformers: no exist_ok
        pass


def is_expert_key(key: str) -> bool:
    return ".mlp.experts." in key or ".mlp.switch_mlp." in key


# Where the routed experts' top-k sits in the ModelArgs of mlx-lm's models.
_TOP_K_FIELDS = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_topk",
    "moe_top_k",
    "moe_k",
    "top_k_experts",
)
# The names mlx-lm's MoE blocks give a shared expert computing on the
# routed experts' input.
_SHARED_EXPERTS = ("shared_expert", "shared_experts")


def top_k_of(args) -> int:
    """Experts routed per token, wherever the architecture's args keep it
    (1 if unknown: the block then runs a token's experts in turns)."""
    for where in (args, getattr(args, "text_config", None)):
        fields = where if isinstance(where, dict) else vars(where) if where is not None else {}
        for name in _TOP_K_FIELDS:
            if isinstance(fields.get(name), int):
                return fields[name]
    return 1


def _expected_layout(switches: dict, model_dir) -> Optional[dict]:
    """What the runtime checks the expert files against: SwiGLU experts
    quantized alike (its check reads one bit width)."""
    switch = next(iter(switches.values()))[1]
    specs = expert_tensors(switch)
    if not {"gate_proj.weight", "up_proj.weight", "down_proj.weight"} <= set(specs):
        return None
    if model_dir is not None and _quantized_per_projection(model_dir):
        return None
    hidden, dims = specs["gate_proj.weight"][0]
    return {
        "num_experts": switch.gate_proj.weight.shape[0],
        "moe_layers": list(switches),
        "hidden_size": dims,
        "moe_intermediate_size": hidden,
    }


def _quantized_per_projection(model_dir) -> bool:
    try:
        layout = load_layout(Path(model_dir) / EXPERTS_DIR)
    except (OSError, ValueError):
        return False  # not converted, or broken: opening the store says so
    return bool(projection_quantization(layout.quantization))


def _shared_expert(moe: nn.Module, input_dims: int) -> Optional[nn.Module]:
    """The MoE block's shared expert if it reads the routed experts' input
    size (not so where experts run in a latent space, as in Kimi K3)."""
    shared = next((moe[n] for n in _SHARED_EXPERTS if isinstance(moe.get(n), nn.Module)), None)
    first = next((shared[n] for n in ("gate_proj", "up_proj", "fc1") if n in (shared or {})), None)
    if isinstance(first, nn.Linear) and first.weight.shape[-1] == input_dims:
        return shared
    return None


def install_on_demand_blocks(model, args) -> ExpertRuntime:
    """Replace every switch layer with an on-demand block, all sharing one
    runtime. Each block takes its switch layer's own configuration."""
    switches = switch_layers_of(model)
    if not switches:
        raise ValueError(f"{type(model).__module__}: the model has no SwitchGLU/SwitchMLP layer")
    num_layers = getattr(args, "num_hidden_layers", None) or max(switches) + 1
    runtime = ExpertRuntime(args.odmoe, top_k_of(args), num_layers)
    runtime.expected = _expected_layout(switches, runtime.model_dir)
    for i, (path, switch) in switches.items():
        block = OnDemandSwitchGLU(runtime, i, switch=switch)
        replace_module(model, path, block)
        shared = _shared_expert(parent_of(model, path), block.dims[0])
        if shared is not None:
            block.start_early(early_start(shared))
    where = layers_path(next(iter(switches.values()))[0])  # "model.layers", ...

    def active_layers():
        # After mlx-lm's pipeline(), other ranks' layers are None or cut off.
        layers = module_at(model, where)
        return {i for i in switches if i < len(layers) and layers[i] is not None}

    runtime.active_layers = active_layers
    runtime.layers_path = where
    runtime.model_ref = weakref.ref(model)
    return runtime


class _EarlyStart:
    """Mixin for a shared expert. Its input is the routed experts' input, so
    the block can start it right after the router's host sync; it then
    computes while the host fetches the routed experts, and the MoE block's
    own call, with the same input, gets that result (the same graph node:
    nothing is computed twice and the numbers cannot differ)."""

    def start(self, x):
        y = super().__call__(x)
        object.__setattr__(self, "_early", (x, y))
        mx.async_eval(y)

    def __call__(self, x):
        early = self.__dict__.pop("_early", None)
        if early is not None and early[0] is x:
            return early[1]
        return super().__call__(x)


def early_start(module: nn.Module) -> nn.Module:
    """Make ``module`` (mlx-lm's own MLP) startable early, in place: its class
    becomes a subclass, its parameters and their names stay as they are."""
    cls = type(module)
    if not issubclass(cls, _EarlyStart):
        module.__class__ = type(f"Early{cls.__name__}", (_EarlyStart, cls), {})
    return module


def strip_experts(weights: dict) -> dict:
    """Drop routed experts (they live in the store) and non-text towers."""
    out = {}
    for k, v in weights.items():
        if k.startswith("language_model."):
            k = k[len("language_model.") :]
        if k.startswith(_NON_TEXT_PREFIXES) or is_expert_key(k):
            continue
        out[k] = v
    return out


def open_at_load(runtime: ExpertRuntime):
    # mlx-lm calls sanitize inside load_model: opening here makes a bad budget
    # or a broken expert folder fail at load, not mid-generation. Under
    # mx.distributed, shard()/pipeline() come after loading, so only check
    # now and read each rank's part on first use.
    if runtime.model_dir is None:
        return
    import mlx.core as mx

    if mx.distributed.init().size() > 1:
        runtime.validate()
    else:
        runtime.open()

"""What both odmoe model types share: swapping blocks and dropping experts."""

import weakref

import mlx.core as mx
import mlx.nn as nn

from ..block import OnDemandSwitchGLU, moe_layers_of
from ..runtime import ExpertRuntime

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


def install_on_demand_blocks(model, args, num_experts: int) -> ExpertRuntime:
    """Give every MoE layer an on-demand block sharing one runtime."""
    moe_layers = moe_layers_of(model)
    expected = {
        "num_experts": num_experts,
        "moe_layers": moe_layers,
        "hidden_size": args.hidden_size,
        "moe_intermediate_size": args.moe_intermediate_size,
    }
    runtime = ExpertRuntime(args.odmoe, args.num_experts_per_tok, args.num_hidden_layers, expected)
    for i in moe_layers:
        mlp = model.model.layers[i].mlp
        mlp.switch_mlp = OnDemandSwitchGLU(
            runtime, i, args.hidden_size, args.moe_intermediate_size, num_experts
        )
        shared = mlp.get("shared_expert", mlp.get("shared_experts"))
        if isinstance(shared, nn.Module):
            mlp.switch_mlp.start_early(early_start(shared))
    inner = model.model

    def active_layers():
        # After mlx-lm's pipeline(), other ranks' layers are None or cut off.
        layers = inner.layers
        return {i for i in moe_layers if i < len(layers) and layers[i] is not None}

    runtime.active_layers = active_layers
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

"""The rule: any mlx-lm MoE architecture ``<base>`` served as ``<base>_odmoe``.

The module is mlx-lm's own ``<base>``, with:

- ``ModelArgs``: its ModelArgs plus the ``odmoe`` section of config.json;
- ``Model``: its Model with every switch layer (SwitchGLU / SwitchMLP,
  wherever it sits) replaced by an on-demand block that runs a weightless
  copy of that layer, and a ``sanitize`` that drops the routed experts (the
  store has them).

Types with extras (qwen2_moe_odmoe, kimi_k2_odmoe) are written as files that
use the same pieces; every other type is built here when first imported
(see ``_bootstrap``).
"""

import dataclasses
import functools
import importlib
import inspect
import types
from typing import Optional

from ..block import OnDemandSwitchGLU
from ..model_types import STOCK_ALIASES
from .common import install_on_demand_blocks, open_at_load, register_config
from .hf_layouts import as_sanitize_reads


def odmoe_args(stock_args: type, module: str) -> type:
    """``stock_args`` with an ``odmoe`` field (the section of config.json)."""

    def from_dict(cls, params):
        args = stock_args.from_dict.__func__(cls, params)
        # Some stock from_dicts build the args themselves (kimi_k3 wraps a
        # flat config as its text_config) and would leave it out.
        args.odmoe = params.get("odmoe")
        return args

    return dataclasses.make_dataclass(
        "ModelArgs",
        [("odmoe", Optional[dict], dataclasses.field(default=None))],
        bases=(stock_args,),
        namespace={"__module__": module, "from_dict": classmethod(from_dict)},
    )


_NOT_GIVEN = object()


@functools.lru_cache(maxsize=None)
def _cache_position(cls) -> int:
    """Where the stock ``Model.__call__`` of ``cls`` takes ``cache``
    positionally (after the inputs: 1 for most models), or -1."""
    params = list(inspect.signature(super(OnDemandModel, cls).__call__).parameters)
    return params.index("cache") - 1 if "cache" in params else -1


def _positional_cache(cls, args):
    i = _cache_position(cls)
    return args[i] if 0 <= i < len(args) else None


class OnDemandModel:
    """Mixin put before a stock mlx-lm ``Model``: on-demand routed experts."""

    def __init__(self, args):
        super().__init__(args)
        self.expert_runtime = install_on_demand_blocks(self, args)

    stock_base = None  # mlx-lm's model type, set by build_module

    def __call__(self, *args, **kwargs):
        # The per-layer caches of this pass, for guesses that read a later
        # layer's cache before that layer runs (predict/next_attention.py).
        if not getattr(self.expert_runtime.predictor, "reads_pass_caches", False):
            return super().__call__(*args, **kwargs)
        cache = kwargs.get("cache", _NOT_GIVEN)
        if cache is _NOT_GIVEN:
            cache = _positional_cache(type(self), args)
        self.expert_runtime.begin_pass(cache, self.layers)
        return super().__call__(*args, **kwargs)

    def stock_sanitize(self, weights: dict) -> dict:
        """mlx-lm's sanitize: checkpoint names and layouts to the model's,
        routed experts stacked (lazily) as the stock switch layers hold them."""
        weights = as_sanitize_reads(self.stock_base, weights)
        return super().sanitize(weights) if hasattr(super(), "sanitize") else weights

    def without_routed(self, weights: dict) -> dict:
        """``weights`` less the routed experts' tensors (the store has them)."""
        routed = tuple(
            f"{path}." for path, m in self.named_modules() if isinstance(m, OnDemandSwitchGLU)
        )
        return {k: v for k, v in weights.items() if not k.startswith(routed)}

    def sanitize(self, weights: dict) -> dict:
        weights = self.without_routed(self.stock_sanitize(weights))
        open_at_load(self.expert_runtime)
        return weights


def build_module(base: str, name: str) -> types.ModuleType:
    """The module ``name`` (``mlx_lm_odmoe.models.<base>_odmoe``) serving
    mlx-lm's ``base``."""
    base = STOCK_ALIASES.get(base, base)
    stock = importlib.import_module(f"mlx_lm.models.{base}")
    module = types.ModuleType(name, f"{name}: mlx-lm's {base} with on-demand routed experts.")
    module.ModelArgs = odmoe_args(stock.ModelArgs, name)
    module.Model = type(
        "Model", (OnDemandModel, stock.Model), {"__module__": name, "stock_base": base}
    )
    if hasattr(stock, "TOKENIZER_DEFAULTS"):
        module.TOKENIZER_DEFAULTS = stock.TOKENIZER_DEFAULTS
    _register_transformers_config(name.rpartition(".")[2], base)
    return module


def _register_transformers_config(model_type: str, base: str):
    try:
        from transformers import CONFIG_MAPPING

        config_class = CONFIG_MAPPING[base]
    except (ImportError, KeyError, ValueError):
        return  # transformers does not know the base either
    register_config(model_type, config_class)

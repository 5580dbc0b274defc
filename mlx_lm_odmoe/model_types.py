"""The one table of model types: which stock mlx-lm types odmoe serves, and
under which name.

Standard library only: the start-up finder (``_bootstrap``) imports it.
"""

from typing import Optional

SUFFIX = "_odmoe"

# Stock mlx-lm model type -> the odmoe type that serves it. Kimi K2 and
# K2.5 are mlx-lm's deepseek_v3 architecture.
ODMOE_TYPE_OF = {
    "qwen2_moe": "qwen2_moe_odmoe",
    "deepseek_v3": "kimi_k2_odmoe",
    "kimi_k2": "kimi_k2_odmoe",
    "kimi_k25": "kimi_k2_odmoe",
}

# odmoe type -> the stock type a folder of it is written as when its experts
# are put back (synthetic models, GGUF export).
STOCK_TYPE_OF = {"qwen2_moe_odmoe": "qwen2_moe", "kimi_k2_odmoe": "kimi_k2"}

ODMOE_TYPES = tuple(STOCK_TYPE_OF)


def is_odmoe_type(model_type: Optional[str]) -> bool:
    return model_type in STOCK_TYPE_OF


def odmoe_type_for(model_type: Optional[str]) -> Optional[str]:
    """The odmoe type serving a stock ``model_type`` (None if there is none)."""
    return ODMOE_TYPE_OF.get(model_type)


def supported_sources() -> list:
    return sorted(ODMOE_TYPE_OF)

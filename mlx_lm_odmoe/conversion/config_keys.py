"""A config.json with every key mlx-lm's ModelArgs read.

Checkpoints saved by transformers 5 hold some of them under other names:
the rope in ``rope_parameters`` (see ``rope_parameters``), and the keys a
config class renamed, which it declares in its ``attribute_map`` (Qwen3-MoE's
``num_experts`` saved as ``num_local_experts``, ...). mlx-lm's args would
take their defaults for these, or fail. The keys they read are the fields
of the model module's args dataclasses (ModelArgs, and TextArgs where a
``text_config`` nests the language model).
"""

import dataclasses
import importlib
from typing import Optional

from mlx_lm_odmoe.model_types import STOCK_ALIASES, STOCK_TYPE_OF

from .rope_parameters import rope_keys


def args_fields(odmoe_type: str) -> set:
    """The config keys read by the args of mlx-lm's module behind ``odmoe_type``."""
    base = STOCK_TYPE_OF[odmoe_type]
    module = importlib.import_module(f"mlx_lm.models.{STOCK_ALIASES.get(base, base)}")
    return {
        f.name
        for cls in vars(module).values()
        if isinstance(cls, type) and dataclasses.is_dataclass(cls)
        for f in dataclasses.fields(cls)
    }


def renamed_keys(config: dict, fields: set) -> dict:
    """The keys among ``fields`` that ``config`` holds only under the name
    its transformers config class maps them to."""
    try:
        from transformers import CONFIG_MAPPING

        renames = CONFIG_MAPPING[config.get("model_type")].attribute_map
    except (ImportError, KeyError, ValueError):
        return {}  # transformers does not know the type: nothing was renamed
    return {
        old: config[new]
        for old, new in renames.items()
        if old in fields and config.get(old) is None and new in config
    }


def missing_keys(config: dict, odmoe_type: str, where: Optional[str] = None) -> dict:
    """What to add to a source ``config`` (its own model_type) so that
    mlx-lm's args of ``odmoe_type`` read every key it holds."""
    fields, where = args_fields(odmoe_type), where or "config.json"

    def missing(cfg):
        return {**renamed_keys(cfg, fields), **rope_keys(cfg, fields, where)}

    found = missing(config)
    text = config.get("text_config")
    if isinstance(text, dict) and missing(text):
        found["text_config"] = {**text, **missing(text)}
    return found

"""The one table of model types: which stock mlx-lm types odmoe serves, and
under which name.

Standard library only: the start-up finder (``_bootstrap``) imports it.
"""

from typing import Optional

SUFFIX = "_odmoe"

# Every mlx-lm model type whose model routes through mlx-lm's SwitchGLU or
# SwitchMLP (mlx_lm.models.switch_layers); each is served as "<base>_odmoe"
# by one rule (models/on_demand.py). A test checks this list against the
# installed mlx-lm.
RULE_BASES = (
    "Klear",
    "afmoe",
    "bailing_hybrid",
    "bailing_moe",
    "bailing_moe_linear",
    "bailing_moe_v3",
    "deepseek",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "deepseek_v41",
    "dots1",
    "ernie4_5_moe",
    "exaone_moe",
    "gemma4_text",
    "glm4_moe",
    "glm4_moe_lite",
    "gpt_oss",
    "granitemoe",
    "granitemoehybrid",
    "hunyuan",
    "jamba",
    "kimi_k3",
    "kimi_linear",
    "laguna",
    "lfm2_moe",
    "llama4",
    "longcat_flash",
    "mellum",
    "mimo_v2_flash",
    "minimax",
    "minimax_m3_vl",
    "mistral4",
    "mixtral",
    "muse_spark",
    "nemotron_h",
    "olmoe",
    "phimoe",
    "phixtral",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "step3p5",
)

# mlx-lm's own aliases (MODEL_REMAPPING) of those bases.
STOCK_ALIASES = {
    "phi-msft": "phixtral",
    "joyai_llm_flash": "deepseek_v3",
    "kimi_k2": "deepseek_v3",
    "minimax_m2": "minimax",
    "deepseek_v41_text": "deepseek_v41",
}

# mlx-lm's (model_type, architecture) remaps (MODEL_ARCHITECTURE_REMAPPING).
STOCK_ARCHITECTURES = {("bailing_hybrid", "BailingMoeV3ForCausalLM"): "bailing_moe_v3"}

# Types with a module of their own in mlx_lm_odmoe/models (the rule plus
# extras), by the stock types they serve. Kimi K2 and K2.5 are mlx-lm's
# deepseek_v3 architecture.
DEDICATED = {
    "qwen2_moe": "qwen2_moe_odmoe",
    "deepseek_v3": "kimi_k2_odmoe",
    "kimi_k2": "kimi_k2_odmoe",
    "kimi_k25": "kimi_k2_odmoe",
}

# Stock mlx-lm model type -> the odmoe type that serves it.
ODMOE_TYPE_OF = {
    **{base: base + SUFFIX for base in RULE_BASES},
    **{alias: base + SUFFIX for alias, base in STOCK_ALIASES.items()},
    **DEDICATED,
}

# odmoe type -> the stock type a folder of it is written as when its experts
# are put back (synthetic models, GGUF export).
STOCK_TYPE_OF = {
    **{base + SUFFIX: base for base in RULE_BASES},
    "qwen2_moe_odmoe": "qwen2_moe",
    "kimi_k2_odmoe": "kimi_k2",
}

ODMOE_TYPES = tuple(STOCK_TYPE_OF)


def is_odmoe_type(model_type: Optional[str]) -> bool:
    return model_type in STOCK_TYPE_OF


def odmoe_type_for(model_type: Optional[str]) -> Optional[str]:
    """The odmoe type serving a stock ``model_type`` (None if there is none)."""
    return ODMOE_TYPE_OF.get(model_type)


def odmoe_type_of_config(config: dict) -> Optional[str]:
    """The odmoe type serving a stock config.json, its architectures
    considered as mlx-lm considers them."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or ()
    for arch in [architectures] if isinstance(architectures, str) else architectures:
        if (model_type, arch) in STOCK_ARCHITECTURES:
            return odmoe_type_for(STOCK_ARCHITECTURES[(model_type, arch)])
    return odmoe_type_for(model_type)


def supported_sources() -> list:
    return sorted(ODMOE_TYPE_OF)

"""``mlx_lm_odmoe.load``: mlx-lm's load with a budget and in-place checkpoints."""

from pathlib import Path

# Stock model types whose stacked experts can be read in place.
IN_PLACE_TYPES = {
    "qwen2_moe": "qwen2_moe_odmoe",
    "deepseek_v3": "kimi_k2_odmoe",
    "kimi_k2": "kimi_k2_odmoe",
    "kimi_k25": "kimi_k2_odmoe",
}
ODMOE_TYPES = ("qwen2_moe_odmoe", "kimi_k2_odmoe")


def odmoe_model_config(model_path: Path, config: dict, expert_cache=None, model_config=None) -> dict:
    """The ``model_config`` overrides that make mlx-lm load ``model_path``
    with on-demand experts."""
    mc = dict(model_config or {})
    odmoe = dict(config.get("odmoe") or {})
    odmoe.update(mc.pop("odmoe", None) or {})
    odmoe["model_path"] = str(model_path)
    if expert_cache is not None:
        odmoe["expert_cache_override"] = expert_cache
    model_type = config.get("model_type")
    if model_type in IN_PLACE_TYPES:
        mc["model_type"] = IN_PLACE_TYPES[model_type]
        odmoe["source"] = "mlx"
        q = config.get("quantization")
        if q:
            odmoe["quantization"] = {k: q[k] for k in ("group_size", "bits", "mode") if k in q}
    elif model_type not in ODMOE_TYPES:
        raise ValueError(
            f"{model_path / 'config.json'}: model_type {model_type!r} is not a MoE type "
            f"odmoe can run (expected one of {sorted(ODMOE_TYPES + tuple(IN_PLACE_TYPES))})"
        )
    mc["odmoe"] = odmoe
    return mc


def load(path_or_hf_repo, expert_cache=None, expert_cache_gb=None, model_config=None, **kwargs):
    import mlx_lm
    from mlx_lm.utils import _download, load_config

    if expert_cache_gb is not None:
        expert_cache = int(float(expert_cache_gb) * 1e9)
    model_path = _download(str(path_or_hf_repo), revision=kwargs.get("revision"))
    config = load_config(model_path)
    mc = odmoe_model_config(model_path, config, expert_cache, model_config)
    return mlx_lm.load(str(model_path), model_config=mc, **kwargs)

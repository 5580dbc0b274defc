"""``mlx_lm_odmoe.load``: mlx-lm's load with a budget and in-place checkpoints."""

from pathlib import Path

from .model_types import is_odmoe_type, odmoe_type_for, supported_sources
from .settings import LOAD_KEY


def odmoe_model_config(model_path: Path, config: dict, expert_cache=None, model_config=None) -> dict:
    """The ``model_config`` overrides that make mlx-lm load ``model_path``
    with on-demand experts."""
    mc = dict(model_config or {})
    # load() arguments (and model_config's odmoe keys) beat the environment.
    given = dict(mc.pop("odmoe", None) or {})
    given["model_path"] = str(model_path)
    if expert_cache is not None:
        given["expert_cache"] = expert_cache
    model_type = config.get("model_type")
    if odmoe_type_for(model_type):
        mc["model_type"] = odmoe_type_for(model_type)
        given["source"] = "mlx"
        q = config.get("quantization")
        if q:
            given["quantization"] = {k: q[k] for k in ("group_size", "bits", "mode") if k in q}
    elif not is_odmoe_type(model_type):
        raise ValueError(
            f"{model_path / 'config.json'}: model_type {model_type!r} is not a MoE type "
            f"odmoe can run (expected an odmoe folder or one of {supported_sources()})"
        )
    mc["odmoe"] = {**(config.get("odmoe") or {}), LOAD_KEY: given}
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

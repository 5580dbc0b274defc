"""``mlx_lm_odmoe.load``: mlx-lm's load with a budget and in-place checkpoints."""

import re
from pathlib import Path

from .errors import BudgetError, ModelNotFoundError
from .model_types import is_odmoe_type, odmoe_type_of_config, supported_sources
from .settings import LOAD_KEY

# What the Hub accepts as a repo id; anything else that is not a folder here
# would only reach huggingface_hub's "Repo id must be in the form ..." error.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def resolve_model_path(path_or_repo, revision=None) -> Path:
    """The local folder of a model: ``path_or_repo`` if it is a folder here,
    else a Hub id (``org/name``) downloaded as ``mlx_lm.load`` does.

    Raises :class:`~mlx_lm_odmoe.errors.ModelNotFoundError` (a
    ``FileNotFoundError``) with a message naming the path and the fix.
    """
    value = str(path_or_repo)
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{value}: no config.json in this folder; not a model folder")
        return path
    if path.exists():
        raise ModelNotFoundError(f"{value}: is a file, not a model folder")
    if not _HUB_ID.fullmatch(value):
        raise ModelNotFoundError(
            f"model folder {value} does not exist (a Hugging Face Hub id has the form org/name)"
        )
    from mlx_lm.utils import _download

    try:
        return Path(_download(value, revision=revision))
    except (OSError, ValueError) as e:  # huggingface_hub's errors derive from these
        raise ModelNotFoundError(
            f"{value}: no such folder here, and the Hugging Face Hub did not provide it ({e})"
        ) from e


def odmoe_model_config(
    model_path: Path, config: dict, expert_cache=None, model_config=None
) -> dict:
    """The ``model_config`` overrides that make mlx-lm load ``model_path``
    with on-demand experts."""
    mc = dict(model_config or {})
    # load() arguments (and model_config's odmoe keys) beat the environment.
    given = dict(mc.pop("odmoe", None) or {})
    given["model_path"] = str(model_path)
    if expert_cache is not None:
        given["expert_cache"] = expert_cache
    model_type = config.get("model_type")
    if odmoe_type_of_config(config):
        from .conversion.config_keys import missing_keys

        mc["model_type"] = odmoe_type_of_config(config)
        # A checkpoint run in place: the keys transformers 5 renamed too.
        mc = {**missing_keys(config, mc["model_type"], str(model_path / "config.json")), **mc}
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
    from mlx_lm.utils import load_config

    if expert_cache_gb is not None:
        expert_cache = _gigabytes(expert_cache_gb)
    model_path = resolve_model_path(path_or_hf_repo, revision=kwargs.get("revision"))
    config = load_config(model_path)
    mc = odmoe_model_config(model_path, config, expert_cache, model_config)
    return mlx_lm.load(str(model_path), model_config=mc, **kwargs)


def _gigabytes(value) -> int:
    try:
        return int(float(value) * 1e9)
    except (TypeError, ValueError):
        raise BudgetError(
            f"cannot read the expert_cache_gb argument = {value!r}: use a number of gigabytes, "
            "or expert_cache= for '8GB', '25%', 'min' or 'all'"
        ) from None

"""transformers 5's ``rope_parameters``, in the keys mlx-lm's ModelArgs read.

transformers 5 saves a model's rope as one ``rope_parameters`` dict
(``rope_theta``, ``rope_type``, yarn's factors, ``partial_rotary_factor``)
where transformers 4 wrote ``rope_theta`` and ``rope_scaling``. Most mlx-lm
ModelArgs read only the old keys and fall back to their defaults without
them: such a config would run with another rope, silently. Which keys to
write is decided from the fields of the ModelArgs, the same way for every
architecture.
"""

import math
from typing import Optional

from mlx_lm_odmoe.errors import ConversionError

# What rope_parameters holds that mlx-lm's args may keep as fields of their own.
_OWN_FIELDS = ("rope_theta", "partial_rotary_factor")
_TYPE_KEYS = ("rope_type", "type")


def rope_keys(config: dict, fields: set, where: str) -> dict:
    """The keys among ``fields`` (a ModelArgs' field names) that ``config``
    holds only inside ``rope_parameters``, with their values. Where it holds
    a key both ways the two must agree, else ConversionError names ``where``
    and the keys."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or not rope or "rope_parameters" in fields:
        return {}  # none, or mlx-lm's args read it themselves
    rope = _one_setting(rope)
    if rope is None:  # differs by layer type: only per-layer fields can hold it
        if "rope_theta" in fields and config.get("rope_theta") is None:
            raise ConversionError(
                f"{where}: rope_parameters differ by layer type and there is no rope_theta, "
                "which this model type's mlx-lm args read"
            )
        return {}
    _check_agreement(config, rope, where)
    found = {k: rope[k] for k in _OWN_FIELDS if k in rope and k in fields}
    if "rope_scaling" in fields:  # a required field in some args (glm4_moe)
        found["rope_scaling"] = _as_rope_scaling(rope) if _rope_type(rope) != "default" else None
    return {k: v for k, v in found.items() if config.get(k) is None}


def _rope_type(settings: dict) -> str:
    return next((settings[k] for k in _TYPE_KEYS if settings.get(k)), "default")


def _as_rope_scaling(rope: dict) -> dict:
    # Both spellings of the type: mlx-lm's rope_utils read either, some
    # ModelArgs (qwen2_moe's check) only "type".
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {**scaling, "type": _rope_type(rope), "rope_type": _rope_type(rope)}


def _one_setting(rope: dict) -> Optional[dict]:
    """The one rope setting of every layer (transformers nests them by layer
    type where they may differ), or None where layers differ."""
    if not all(isinstance(v, dict) for v in rope.values()):
        return rope
    settings = list(rope.values())
    return settings[0] if all(s == settings[0] for s in settings) else None


def _check_agreement(config: dict, rope: dict, where: str):
    for key in _OWN_FIELDS:
        _agree(config.get(key), rope.get(key), key, f"rope_parameters.{key}", where)
    scaling = config.get("rope_scaling")
    if not isinstance(scaling, dict):
        return
    _agree(
        _rope_type(scaling),
        _rope_type(rope),
        "rope_scaling.type",
        "rope_parameters.rope_type",
        where,
    )
    for key, value in scaling.items():
        if key not in _TYPE_KEYS:
            _agree(value, rope.get(key), f"rope_scaling.{key}", f"rope_parameters.{key}", where)


def _agree(old, new, old_name: str, new_name: str, where: str):
    if old is None or new is None or _same(old, new):
        return
    raise ConversionError(
        f"{where}: {old_name} = {old!r} disagrees with {new_name} = {new!r}; correct the wrong one"
    )


def _same(a, b) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b

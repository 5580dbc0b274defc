"""The expert cache budget: parsing and turning bytes into slots."""

import math
import numbers
import os
import re
from typing import Optional, Union

from .errors import BudgetError

ENV_VAR = "MLX_LM_ODMOE_EXPERT_CACHE"

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"([0-9]*\.?[0-9]+)(%|[kmgt]?i?b?)")
_ALL, _MIN = ("all", "full", "100%"), ("min", "minimum")

MINIMUM = -1  # parse_budget's answer to "min": just the selected experts

FORMS = ("a size such as '8GB' or '512MiB', a share of all routed experts such as '25%' "
         "(at most 100%), 'min' (just the selected experts), 'all', or a number of bytes")


def parse_budget(value: Union[int, float, str, None], total_nbytes: int) -> Optional[int]:
    """Bytes from ``8GB``, ``512MiB``, ``25%`` (of ``total_nbytes``),
    a number of bytes, or ``None``. Any size is read; what an expert cache
    accepts is :func:`check_expert_cache`'s to say."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return int(value)
    s = _normal(value)
    if s in _ALL:
        return total_nbytes
    if s in _MIN:
        return MINIMUM
    m = _SIZE.fullmatch(s)
    if not m:
        raise BudgetError(f"cannot read expert cache budget {value!r}: use {FORMS}")
    num, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        return int(total_nbytes * num / 100.0)
    return int(num * _UNITS[unit])


def check_expert_cache(value, where: str):
    """``value`` if an expert cache can have that budget; otherwise a
    :class:`BudgetError` naming ``where`` it came from (``$MLX_LM_ODMOE_EXPERT_CACHE``,
    config.json's ``odmoe.expert_cache``, the ``expert_cache`` argument)
    and the accepted forms. Zero, negative and above-100% budgets are errors."""

    def fail(problem):
        raise BudgetError(f"{where} is {value!r}: {problem}. Use {FORMS}.")

    if value is None or value == "":
        return value
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        fail("not a size")
    if isinstance(value, str):
        s = _normal(value)
        if s in _ALL or s in _MIN:
            return value
        m = _SIZE.fullmatch(s)
        if not m:
            fail("not a budget odmoe can read")
        num, share = float(m.group(1)), m.group(2) == "%"
    else:
        num, share = float(value), False
    if share and num > 100:
        fail("more than all the experts (a share is at most 100%; 'all' keeps every expert)")
    if not num > 0 or math.isinf(num):
        fail("a budget must be positive ('min' holds just the selected experts)")
    return value


def _normal(value) -> str:
    return str(value).strip().lower().replace(" ", "")


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def default_budget(total_nbytes: int) -> int:
    """All experts if they take at most half of physical memory, else half."""
    return min(total_nbytes, physical_memory() // 2)


def resolve_budget(explicit, config_value, total_nbytes: int,
                   where: str = "the expert cache budget") -> int:
    """The first budget given: ``explicit`` (which came from ``where``),
    ``$MLX_LM_ODMOE_EXPERT_CACHE``, config.json's; else :func:`default_budget`."""
    sources = ((explicit, where), (os.environ.get(ENV_VAR), f"${ENV_VAR}"),
               (config_value, "config.json's odmoe.expert_cache"))
    for v, source in sources:
        b = parse_budget(check_expert_cache(v, source), total_nbytes)
        if b is not None:
            return b
    return default_budget(total_nbytes)


def slots_for_budget(budget: int, record_nbytes: int, num_layers: int, num_experts: int, top_k: int) -> int:
    minimum = top_k * record_nbytes * num_layers
    if budget == MINIMUM:
        return min(top_k, num_experts)
    per_layer = budget // max(1, record_nbytes * num_layers)
    if per_layer < top_k:
        raise BudgetError(
            f"expert cache budget of {_fmt(budget)} is too small: each of the "
            f"{num_layers} MoE layers must hold its {top_k} selected experts "
            f"({_fmt(record_nbytes)} each), i.e. at least {_fmt(minimum)}. Raise it with "
            f"expert_cache=..., ${ENV_VAR} or config.json's odmoe.expert_cache."
        )
    return min(per_layer, num_experts)


def _fmt(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"

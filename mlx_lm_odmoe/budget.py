"""The expert cache budget: parsing and turning bytes into slots."""

import os
import re
from typing import Optional, Union

ENV_VAR = "MLX_LM_ODMOE_EXPERT_CACHE"

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


MINIMUM = -1  # parse_budget's answer to "min": just the selected experts


class BudgetError(ValueError):
    pass


def parse_budget(value: Union[int, float, str, None], total_nbytes: int) -> Optional[int]:
    """Bytes from ``8GB``, ``512MiB``, ``25%`` (of all routed experts),
    a number of bytes, or ``None``."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return int(value)
    s = str(value).strip().lower().replace(" ", "")
    if s in ("all", "full", "100%"):
        return total_nbytes
    if s in ("min", "minimum"):
        return MINIMUM
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(%|[kmgt]?i?b?)", s)
    if not m:
        raise BudgetError(
            f"cannot read expert cache budget {value!r}: use e.g. '8GB', '512MiB', '25%' or a byte count"
        )
    num, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        return int(total_nbytes * num / 100.0)
    return int(num * _UNITS[unit])


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def default_budget(total_nbytes: int) -> int:
    """All experts if they take at most half of physical memory, else half."""
    return min(total_nbytes, physical_memory() // 2)


def resolve_budget(explicit, config_value, total_nbytes: int) -> int:
    for v in (explicit, os.environ.get(ENV_VAR), config_value):
        b = parse_budget(v, total_nbytes)
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

"""The expert cache budget: parsing and turning bytes into slots."""

import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

from .errors import BudgetError

ENV_VAR = "MLX_LM_ODMOE_EXPERT_CACHE"  # read in settings.py; named in messages

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"([0-9]*\.?[0-9]+)(%|[kmgt]?i?b?)")
_ALL, _MIN = ("all", "full", "100%"), ("min", "minimum")

MINIMUM = -1  # parse_budget's answer to "min": just the selected experts

FORMS = (
    "a size such as '8GB' or '512MiB', a share of all routed experts such as '25%' "
    "(at most 100%), 'min' (just the selected experts), 'all', or a number of bytes"
)


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
    """This machine's memory, or the memory cgroup's limit if smaller."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    limit = cgroup_memory_limit()
    return min(total, limit) if limit else total


def cgroup_memory_limit() -> Optional[int]:
    """The memory limit of this process's cgroup (Linux, v1 or v2), if any."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            f = f"/sys/fs/cgroup{path}/memory.max"
        elif "memory" in controllers.split(","):
            f = f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"
        else:
            continue
        try:
            value = open(f).read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:
            return int(value)
    return None


def default_budget(total_nbytes: int, memory: Optional[int] = None) -> int:
    """All experts if they take at most half of ``memory`` (default: this
    machine's physical memory), else half."""
    return min(total_nbytes, (physical_memory() if memory is None else memory) // 2)


def resolve_budget(value, total_nbytes: int, where: str = "the expert cache budget") -> int:
    """Bytes of the budget ``value`` (from ``where``: settings.py picks the
    strongest of the load() argument, the environment and config.json);
    :func:`default_budget` if none was given."""
    b = parse_budget(check_expert_cache(value, where), total_nbytes)
    return default_budget(total_nbytes) if b is None else b


@dataclass(frozen=True)
class BudgetPlan:
    """What a budget buys in every MoE layer: slots for cached experts and,
    when a predictor runs, staging slots for its guesses, carved out of the
    budget (speculation never evicts the working set)."""

    budget_bytes: int  # what all slots take: (slots + staging) * record * layers
    slots: int  # cached experts per layer
    staging: int  # prefetch staging slots per layer
    num_experts: int

    @property
    def residency(self) -> float:
        return (self.slots + self.staging) / self.num_experts


def plan_budget(
    budget: int, record_nbytes: int, num_layers: int, num_experts: int, top_k: int, staging: int = 0
) -> BudgetPlan:
    """The one rule from bytes to slots; raises :class:`BudgetError` if a
    layer cannot hold one token's selected experts. ``staging`` slots
    never leave fewer than ``top_k`` cached ones."""
    slots = slots_for_budget(budget, record_nbytes, num_layers, num_experts, top_k)
    staging = max(0, min(staging, slots - top_k))
    return BudgetPlan(slots * record_nbytes * num_layers, slots - staging, staging, num_experts)


def slots_that_fit(budget: int, record_nbytes: int, num_layers: int, num_experts: int) -> int:
    """Experts per layer ``budget`` bytes hold (at most all of them)."""
    return min(num_experts, budget // max(1, record_nbytes * num_layers))


def slots_for_budget(
    budget: int, record_nbytes: int, num_layers: int, num_experts: int, top_k: int
) -> int:
    minimum = top_k * record_nbytes * num_layers
    if budget == MINIMUM:
        return min(top_k, num_experts)
    per_layer = slots_that_fit(budget, record_nbytes, num_layers, num_experts)
    if per_layer < top_k:
        raise BudgetError(
            f"expert cache budget of {_fmt(budget)} is too small: each of the "
            f"{num_layers} MoE layers must hold its {top_k} selected experts "
            f"({_fmt(record_nbytes)} each), i.e. at least {_fmt(minimum)}. Raise it with "
            f"expert_cache=..., ${ENV_VAR} or config.json's odmoe.expert_cache."
        )
    return per_layer


def _fmt(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"

"""Teach stock mlx-lm our model types without importing mlx at startup.

mlx-lm resolves ``config["model_type"]`` with
``importlib.import_module(f"mlx_lm.models.{model_type}")`` and has no plugin
hook. A ``.pth`` file installed next to the package runs :func:`install`, which
appends a ``sys.meta_path`` finder that answers only for our model types and
aliases them to the modules in ``mlx_lm_odmoe.models``. A type without a file
there (``<base>_odmoe`` for any MoE base) is built, when first imported, by
the rule in ``mlx_lm_odmoe.models.on_demand``. The finder is appended (not
prepended) so it can never shadow a module mlx-lm or this package ships, and
it uses only the standard library so interpreter start stays cheap.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from .model_types import ODMOE_TYPES, STOCK_TYPE_OF

_PREFIX = "mlx_lm.models."
_OURS = "mlx_lm_odmoe.models."


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        # Returning the real module makes both names one module object.
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass


class _RuleLoader(importlib.abc.Loader):
    """Builds ``<base>_odmoe`` from mlx-lm's ``<base>`` module."""

    def __init__(self, base: str):
        self.base = base

    def create_module(self, spec):
        rule = importlib.import_module(_OURS + "on_demand")
        return rule.build_module(self.base, spec.name)

    def exec_module(self, module):
        pass


class OdmoeModelFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(_PREFIX):
            name = fullname[len(_PREFIX) :]
            if name in ODMOE_TYPES:
                return importlib.util.spec_from_loader(fullname, _AliasLoader(_OURS + name))
        elif fullname.startswith(_OURS):
            # Reached only when no file of that name exists in our models.
            name = fullname[len(_OURS) :]
            if name in ODMOE_TYPES:
                return importlib.util.spec_from_loader(fullname, _RuleLoader(STOCK_TYPE_OF[name]))
        return None


def install() -> None:
    if not any(isinstance(f, OdmoeModelFinder) for f in sys.meta_path):
        sys.meta_path.append(OdmoeModelFinder())

"""Teach stock mlx-lm our model types without importing mlx at startup.

mlx-lm resolves ``config["model_type"]`` with
``importlib.import_module(f"mlx_lm.models.{model_type}")`` and has no plugin
hook. A ``.pth`` file installed next to the package runs :func:`install`, which
appends a ``sys.meta_path`` finder that answers only for our model types and
aliases them to the modules in ``mlx_lm_odmoe.models``. It is appended (not
prepended) so it can never shadow a module mlx-lm itself ships, and it uses
only the standard library so interpreter start stays cheap.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from .model_types import ODMOE_TYPES

_PREFIX = "mlx_lm.models."


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        # Returning the real module makes both names one module object.
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass


class OdmoeModelFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_PREFIX):
            return None
        name = fullname[len(_PREFIX) :]
        if name not in ODMOE_TYPES:
            return None
        return importlib.util.spec_from_loader(
            fullname, _AliasLoader(f"mlx_lm_odmoe.models.{name}")
        )


def install() -> None:
    if not any(isinstance(f, OdmoeModelFinder) for f in sys.meta_path):
        sys.meta_path.append(OdmoeModelFinder())

"""The user's cache folder for what this package remembers between runs."""

import os
from pathlib import Path

CACHE_ENV = "XDG_CACHE_HOME"


def user_cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/mlx-lm-odmoe/...`` (default ``~/.cache``); not created."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache")
    return root.joinpath("mlx-lm-odmoe", *parts)

"""On-demand Mixture-of-Experts for stock mlx-lm.

Importing this package is cheap: mlx is only imported when a model is built
or :func:`load` is called.
"""

__version__ = "0.1.0"


def load(path_or_hf_repo, expert_cache=None, **kwargs):
    """Load an odmoe model with mlx-lm and return ``(model, tokenizer)``.

    ``expert_cache`` sets the expert memory budget: bytes (int), a size such as
    ``"8GB"`` or a share of all routed experts such as ``"25%"``. It overrides
    the ``MLX_LM_ODMOE_EXPERT_CACHE`` environment variable and the ``odmoe``
    section of config.json. ``expert_cache_gb=`` is accepted as a shorthand.
    Other keyword arguments go to :func:`mlx_lm.load`.
    """
    from .loading import load as _load

    return _load(path_or_hf_repo, expert_cache=expert_cache, **kwargs)


def stats(model):
    """Telemetry of a loaded odmoe model: an :class:`~mlx_lm_odmoe.telemetry.ExpertStats`
    (attributes, ``stats["hits"]`` too, and ``to_dict()`` for JSON)."""
    from .runtime import runtime_of

    return runtime_of(model).stats()

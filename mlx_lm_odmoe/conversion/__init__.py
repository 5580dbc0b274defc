"""Converters into the sharded expert layout (see mlx_lm_odmoe/layout.py)."""

"""What this machine's MLX backend can run, for the converter and the loader.

Without a GPU (Metal or CUDA), MLX computes on its CPU backend, whose
``gather_mm`` (the routed experts' matmul when they are not quantized) is
float32-only, and whose quantized ``gather_qmm`` is several times slower with
16-bit scales than with float32 ones. Stock mlx-lm cannot run an unquantized
16-bit MoE on such a machine at all; odmoe refuses one at load with the
command that fixes it, and converts to float32 there by default.
"""

import logging
from pathlib import Path
from typing import Optional

from .errors import BackendError

logger = logging.getLogger("mlx_lm_odmoe")

_HALF = ("float16", "bfloat16")


def has_gpu() -> bool:
    """Whether MLX has a GPU here (Metal or CUDA): the backend-neutral check."""
    import mlx.core as mx

    return mx.is_available(mx.gpu)


def default_dtype() -> Optional[str]:
    """The converter's float type when none is asked for: float32 where MLX
    has no GPU, else None (keep the source's)."""
    return None if has_gpu() else "float32"


def half_precision_problem(dtype: Optional[str], quantized: bool) -> Optional[str]:
    """Why experts of ``dtype`` (their scales' type when ``quantized``) do
    not run well on this machine, or None if they do."""
    if dtype not in _HALF or has_gpu():
        return None
    if quantized:
        return (
            f"{dtype} scales are several times slower than float32 ones on this "
            "machine's MLX CPU backend (it has no GPU)"
        )
    return (
        f"{dtype} experts will not run on this machine's MLX CPU backend (it has no GPU, "
        "and its gather_mm, the experts' matmul, is float32-only)"
    )


def expert_float_dtype(layout) -> str:
    """The experts' float type: their weights', or their scales' if quantized."""
    from .layout import DTYPES

    part = "scales" if layout.quantization else "weight"
    spec = next(t for t in layout.tensors if t.name.endswith(f".{part}"))
    return DTYPES[spec.dtype][1]


def recast_command(model_dir) -> str:
    name = Path(model_dir).name
    return f"mlx_lm_odmoe.convert --hf-path {model_dir} --mlx-path {name}-float32 --dtype float32"


def check_experts_run_here(layout, model_dir) -> None:
    """Refuse, at load, experts this machine's MLX cannot multiply; warn
    about ones it multiplies slowly. Both messages give the fix."""
    problem = half_precision_problem(expert_float_dtype(layout), bool(layout.quantization))
    if problem is None:
        return
    fix = f"convert the model to float32 once and load that folder: {recast_command(model_dir)}"
    if layout.quantization:
        logger.warning("%s: its %s; for full speed, %s", model_dir, problem, fix)
        return
    raise BackendError(f"{model_dir}: its {problem}. To run it here, {fix}")

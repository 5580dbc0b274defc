"""Predicting the experts of later layers, so the store can read them ahead."""

from pathlib import Path
from typing import Optional

from .base import ExpertPredictor

__all__ = ["ExpertPredictor", "load_predictor"]


def load_predictor(model, model_dir) -> Optional[ExpertPredictor]:
    """The shadow model saved next to the model (``shadow.safetensors`` and
    ``shadow.json`` in ``model_dir``), or None if there is none.

    Raises ``ValueError`` when the saved shadow model was trained for a model
    of another shape.
    """
    from .shadow import CONFIG_NAME, WEIGHTS_NAME, load_shadow

    folder = Path(model_dir)
    if not ((folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()):
        return None
    predictor = load_shadow(model, folder)
    _check_matches(predictor, model, folder)
    return predictor


def _check_matches(predictor, model, folder):
    from ..block import moe_layers_of
    from .routers import gate_of
    from .shadow import CONFIG_NAME

    cfg = predictor.net.config
    layers = moe_layers_of(model)
    gate = gate_of(model, layers[0])
    num_experts = gate.weight.shape[0]
    if cfg["moe_layers"] != layers or cfg["num_experts"] != num_experts:
        raise ValueError(
            f"{folder / CONFIG_NAME}: shadow model is for MoE layers {cfg['moe_layers']} with "
            f"{cfg['num_experts']} experts, the model has {layers} with {num_experts}; retrain it "
            "(mlx_lm_odmoe.train_shadow)"
        )

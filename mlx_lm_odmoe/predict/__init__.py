"""Predicting the experts of later layers, so the store can read them ahead."""

from .base import ExpertPredictor

__all__ = ["ExpertPredictor"]

"""qwen2_moe_odmoe: mlx-lm's qwen2_moe with on-demand routed experts."""

from dataclasses import dataclass
from typing import Optional

from mlx_lm.models import qwen2_moe

from .common import install_on_demand_blocks, open_at_load, strip_experts


@dataclass
class ModelArgs(qwen2_moe.ModelArgs):
    odmoe: Optional[dict] = None


class Model(qwen2_moe.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.expert_runtime = install_on_demand_blocks(self, args, args.num_experts)

    def sanitize(self, weights):
        weights = super().sanitize(strip_experts(weights))
        open_at_load(self.expert_runtime)
        return weights

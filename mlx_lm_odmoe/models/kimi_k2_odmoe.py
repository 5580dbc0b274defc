"""kimi_k2_odmoe: mlx-lm's deepseek_v3 (Kimi K2) with on-demand routed experts.

MLA attention, sigmoid ``noaux_tc`` routing with ``e_score_correction_bias``,
grouped top-k, ``routed_scaling_factor``, the shared expert and the dense
first layers are all mlx-lm's own; only ``switch_mlp`` is replaced. Kimi
K2.5's nested ``text_config`` is accepted as well as flat K2 configs.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
from mlx_lm.models import deepseek_v3
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config

from .common import install_on_demand_blocks, open_at_load, register_config, strip_experts

_KEEP_TOP_LEVEL = ("model_type", "odmoe", "quantization")


register_config("kimi_k2_odmoe", DeepseekV3Config)


@dataclass
class ModelArgs(deepseek_v3.ModelArgs):
    odmoe: Optional[dict] = None

    @classmethod
    def from_dict(cls, params):
        text = params.get("text_config")
        if isinstance(text, dict):
            params = {**text, **{k: params[k] for k in _KEEP_TOP_LEVEL if k in params}}
        return super().from_dict(params)


class Model(deepseek_v3.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.expert_runtime = install_on_demand_blocks(self, args, args.n_routed_experts)

    def sanitize(self, weights):
        weights = super().sanitize(strip_experts(weights))
        open_at_load(self.expert_runtime)
        return weights

    def shard(self, group: Optional[mx.distributed.Group] = None):
        # mlx-lm's scheme; shard_inplace on our parameter-free switch_mlp is
        # a no-op, the store reads each rank's slices instead.
        group = group or mx.distributed.init()
        super().shard(group)
        self.expert_runtime.shard(group.rank(), group.size())

"""kimi_k2_odmoe: mlx-lm's deepseek_v3 (Kimi K2) with on-demand routed experts.

The rule of ``on_demand`` applied to deepseek_v3: MLA attention, sigmoid
``noaux_tc`` routing with ``e_score_correction_bias``, grouped top-k,
``routed_scaling_factor``, the shared expert and the dense first layers are
all mlx-lm's own; only ``switch_mlp`` is replaced. The extras: Kimi K2.5's
nested ``text_config`` is accepted as well as flat K2 configs, and its
``language_model.`` weights and vision towers are sorted out.
"""

from typing import Optional

import mlx.core as mx
from mlx_lm.models import deepseek_v3
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config

from .common import register_config, strip_experts
from .on_demand import OnDemandModel, odmoe_args

_KEEP_TOP_LEVEL = ("model_type", "odmoe", "quantization")


register_config("kimi_k2_odmoe", DeepseekV3Config)


class ModelArgs(odmoe_args(deepseek_v3.ModelArgs, __name__)):
    @classmethod
    def from_dict(cls, params):
        text = params.get("text_config")
        if isinstance(text, dict):
            params = {**text, **{k: params[k] for k in _KEEP_TOP_LEVEL if k in params}}
        return super().from_dict(params)


class Model(OnDemandModel, deepseek_v3.Model):
    def stock_sanitize(self, weights):
        # K2.5 checkpoints: the text model's weights under language_model.
        return super().stock_sanitize(strip_experts(weights))

    def shard(self, group: Optional[mx.distributed.Group] = None):
        # mlx-lm's scheme; shard_inplace on our parameter-free switch_mlp is
        # a no-op, the store reads each rank's slices instead.
        group = group or mx.distributed.init()
        super().shard(group)
        self.expert_runtime.shard(group.rank(), group.size())

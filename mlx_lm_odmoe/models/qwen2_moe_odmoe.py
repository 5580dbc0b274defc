"""qwen2_moe_odmoe: mlx-lm's qwen2_moe with on-demand routed experts.

The rule of ``on_demand`` (qwen2_moe's ModelArgs and Model with on-demand
switch layers) plus distributed support, which mlx-lm's qwen2_moe lacks:
mlx-lm's tensor-parallel scheme (``shard``) and layer pipelining
(``pipeline``), the same ones mlx-lm implements for deepseek_v3 and
qwen3_moe.
"""

from typing import Optional

import mlx.core as mx
from mlx.nn.layers.distributed import shard_inplace, shard_linear, sum_gradients
from mlx_lm.models import qwen2_moe
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.pipeline import PipelineMixin
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig

from .common import register_config
from .on_demand import OnDemandModel, odmoe_args

register_config("qwen2_moe_odmoe", Qwen2MoeConfig)

ModelArgs = odmoe_args(qwen2_moe.ModelArgs, __name__)


class ShardableMoeBlock(qwen2_moe.Qwen2MoeSparseMoeBlock):
    """The stock block; when sharded, it sums the ranks' partial outputs."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.sharding_group = None

    def __call__(self, x):
        if self.sharding_group is None:
            return super().__call__(x)
        x = sum_gradients(self.sharding_group)(x)
        return mx.distributed.all_sum(super().__call__(x), group=self.sharding_group)


class PipelinedModel(qwen2_moe.Qwen2MoeModel):
    """Qwen2MoeModel that can run a slice of its layers (mlx-lm's pipeline)."""

    pipeline = PipelineMixin.pipeline
    pipeline_layers = PipelineMixin.pipeline_layers

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.pipeline_rank, self.pipeline_size = 0, 1
        self.start_idx, self.end_idx = 0, None
        for layer in self.layers:
            layer.mlp = ShardableMoeBlock(args)

    def __call__(self, inputs: mx.array, cache=None):
        h = self.embed_tokens(inputs)
        layers = self.pipeline_layers
        cache = cache if cache is not None else [None] * len(layers)
        mask = create_attention_mask(h, cache[0])
        rank, size = self.pipeline_rank, self.pipeline_size
        if rank < size - 1:  # the previous stage is the next rank
            h = mx.distributed.recv_like(h, rank + 1)
        for layer, c in zip(layers, cache):
            h = layer(h, mask, c)
        if rank != 0:
            h = mx.distributed.send(h, (rank - 1) % size)
            if cache[-1] is not None:
                cache[-1].keys = mx.depends(cache[-1].keys, h)
        if size > 1:  # every rank returns the last stage's output
            h = mx.distributed.all_gather(h)[: h.shape[0]]
        return self.norm(h)


class PipelinedQwen2Moe(qwen2_moe.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.model = PipelinedModel(args)


class Model(OnDemandModel, PipelinedQwen2Moe):
    def shard(self, group: Optional[mx.distributed.Group] = None):
        group = group or mx.distributed.init()
        N = group.size()
        for layer in self.model.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(
                    attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group)
                )
            attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
            attn.n_heads //= N
            attn.n_kv_heads //= N
            # The routed experts' slices come from the store; the router and
            # the shared expert's gate stay replicated.
            mlp = layer.mlp
            mlp.sharding_group = group
            shard_inplace(mlp.shared_expert.gate_proj, "all-to-sharded", group=group)
            shard_inplace(mlp.shared_expert.up_proj, "all-to-sharded", group=group)
            shard_inplace(mlp.shared_expert.down_proj, "sharded-to-all", group=group)
        self.expert_runtime.shard(group.rank(), N)

    @property
    def layers(self):
        return self.model.pipeline_layers

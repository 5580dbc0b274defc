"""One rank of a distributed run (started by mlx.launch), or a single process.

Loads the model the way mlx-lm's distributed entry points do (sharded_load),
runs a prompt and greedy decoding, and writes what it saw to OUT.RANK.json.
"""

import json
import sys

import mlx.core as mx
import mlx_lm
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import sharded_load

import mlx_lm_odmoe

model_dir, mode, out = sys.argv[1:4]
group = mx.distributed.init()
if mode == "single":
    model, tok = mlx_lm.load(model_dir)
else:
    pipeline, tensor = (group, None) if mode == "pipeline" else (None, group)
    model, tok = sharded_load(model_dir, pipeline_group=pipeline, tensor_group=tensor)

prompt = tok.encode("def distributed(x):\n    return")
logits = model(mx.array([prompt]))[0, -1]
mx.eval(logits)  # every rank evaluates collectives in the same order
no_eos = lambda tokens, l: l.at[..., list(tok.eos_token_ids)].add(-1e9)  # noqa: E731
tokens = [
    r.token
    for r in mlx_lm.stream_generate(
        model, tok, prompt, max_tokens=12, sampler=make_sampler(0.0), logits_processors=[no_eos]
    )
]
stats = mlx_lm_odmoe.stats(model)
with open(f"{out}.{group.rank()}.json", "w") as f:
    json.dump(
        {
            "rank": group.rank(),
            "size": group.size(),
            "tokens": tokens,
            "logits": logits.tolist(),
            "bytes_read": stats["bytes_read"],
            "resident_bytes": stats["resident_bytes"],
        },
        f,
    )

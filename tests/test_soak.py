"""A long-ish generation at the minimum budget: every token misses and reads
experts, and memory stays flat (the pools are updated in place)."""

import mlx_lm
from mlx_lm.sample_utils import make_sampler

import mlx_lm_odmoe


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024


def test_rss_stays_flat_while_experts_stream_through(models):
    model, tok = mlx_lm_odmoe.load(models("kimi_k2", "odmoe"), expert_cache="min")
    no_eos = lambda tokens, logits: logits.at[..., list(tok.eos_token_ids)].add(-1e9)  # noqa: E731
    samples = []
    for i, _ in enumerate(
        mlx_lm.stream_generate(
            model,
            tok,
            "def soak(x):",
            max_tokens=500,
            sampler=make_sampler(1.0),
            logits_processors=[no_eos],
        )
    ):
        if i % 50 == 49:
            samples.append(rss_mb())
    stats = mlx_lm_odmoe.stats(model)
    assert len(samples) == 10 and stats["misses"] > 1000 and stats["evictions"] > 1000
    assert max(samples[1:]) - samples[1] < 32, samples  # MB; the KV cache grows a little

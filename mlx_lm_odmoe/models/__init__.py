"""Model types registered with mlx-lm: qwen2_moe_odmoe, kimi_k2_odmoe."""

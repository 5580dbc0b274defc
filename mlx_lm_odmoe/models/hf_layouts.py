"""Hugging Face layouts mlx-lm's sanitize does not read, put as it reads them.

gpt-oss: transformers saves unquantized experts fused and multiplied as
``x @ W`` (``experts.gate_up_proj`` [E, hidden, 2 * intermediate], gate and up
interleaved on the last axis; ``experts.down_proj`` [E, intermediate,
hidden]). mlx-lm's sanitize reads OpenAI's release layout, the same tensors
as [E, out, in] (``*_blocks`` in MXFP4). Transposed and named ``.weight``,
transformers' tensors go through that sanitize, which splits gate and up.
"""

_GPT_OSS_FUSED = (".experts.gate_up_proj", ".experts.down_proj")


def _gpt_oss(weights: dict) -> dict:
    return {
        (k + ".weight" if k.endswith(_GPT_OSS_FUSED) else k): (
            v.swapaxes(-1, -2) if k.endswith(_GPT_OSS_FUSED) else v
        )
        for k, v in weights.items()
    }


_ADAPTERS = {"gpt_oss": _gpt_oss}


def as_sanitize_reads(base: str, weights: dict) -> dict:
    """``weights`` of a checkpoint of mlx-lm's ``base``, in names and layouts
    its sanitize reads."""
    adapt = _ADAPTERS.get(base)
    return adapt(weights) if adapt else weights

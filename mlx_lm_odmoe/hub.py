"""Experts of a Hugging Face Hub repo, fetched shard by shard on first use.

``mlx_lm.load("org/repo")`` downloads only mlx-lm's allow patterns (config,
``model*.safetensors``, tokenizer, ``*.json`` — so ``experts/index.json`` too)
into the Hugging Face cache. The model folder it hands us is then a cache
snapshot, ``.../models--org--repo/snapshots/<commit>``; from that we know the
repo and the exact commit, and fetch ``experts/*.safetensors`` through
``huggingface_hub`` (its cache, its progress bars) when a shard is first
needed — or all of them at load with ``odmoe.hub_download = "all"`` /
``MLX_LM_ODMOE_HUB_DOWNLOAD=all``.
"""

from pathlib import Path
from typing import Callable, NamedTuple, Optional

from .layout import EXPERTS_DIR


class HubSnapshot(NamedTuple):
    repo_id: str
    revision: str
    cache_dir: Path


def hub_snapshot(model_dir: Path) -> Optional[HubSnapshot]:
    """The repo, commit and cache of a Hugging Face cache snapshot folder."""
    p = Path(model_dir)
    repo_dir = p.parent.parent
    if p.parent.name != "snapshots" or not repo_dir.name.startswith("models--"):
        return None
    repo_id = repo_dir.name[len("models--") :].replace("--", "/")
    return HubSnapshot(repo_id, p.name, repo_dir.parent)


def shard_resolver(snapshot: HubSnapshot) -> Callable[[str], Path]:
    def resolve(name: str) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(
            hf_hub_download(
                snapshot.repo_id,
                f"{EXPERTS_DIR}/{name}",
                revision=snapshot.revision,
                cache_dir=snapshot.cache_dir,
            )
        )

    return resolve

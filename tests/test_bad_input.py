"""Bad files give clear errors naming the file and the fix; never wrong numbers."""

import json
import shutil

import mlx_lm
import pytest

import mlx_lm_odmoe
from mlx_lm_odmoe.layout import LayoutError
from mlx_lm_odmoe.store.readers import ExpertReadError


@pytest.fixture()
def folder(models, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(models("qwen2_moe", "odmoe"), out)
    return out


def shard_of(folder):
    return next((folder / "experts").glob("experts-*.safetensors"))


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_truncated_shard_is_named_at_load(folder):
    shard = shard_of(folder)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(LayoutError, match=f"{shard.name}.*truncated"):
        mlx_lm_odmoe.load(folder)


def test_corrupt_expert_bytes_fail_the_checksum(folder):
    shard = shard_of(folder)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the last expert's record
    shard.write_bytes(bytes(data))
    with pytest.raises(ExpertReadError, match=f"{shard.name}.*layer 2 expert 7.*checksum"):
        mlx_lm_odmoe.load(folder, expert_cache="100%")  # reads every expert at load
    model, tok = mlx_lm_odmoe.load(folder, expert_cache="min")  # on demand: fails when used
    with pytest.raises(ExpertReadError, match="checksum"):
        for e in range(8):
            model.expert_runtime.store.fetch(2, __import__("numpy").array([e]))


def test_index_pointing_outside_the_folder_is_refused(folder):
    edit_json(folder / "experts" / "index.json", lambda d: d["shards"][0].update(file="../../etc/passwd"))
    with pytest.raises(LayoutError, match="outside"):
        mlx_lm_odmoe.load(folder)


def test_missing_expert_in_the_index(folder):
    edit_json(folder / "experts" / "index.json", lambda d: d["experts"]["1"].pop())
    with pytest.raises(LayoutError, match="layer 1 does not list all 8 experts"):
        mlx_lm_odmoe.load(folder)


def test_malformed_index(folder):
    (folder / "experts" / "index.json").write_text("{not json")
    with pytest.raises(LayoutError, match="index.json: not valid JSON"):
        mlx_lm_odmoe.load(folder)


def test_missing_shard(folder):
    shard = shard_of(folder)
    shard.unlink()
    with pytest.raises(LayoutError, match=f"{shard.name}: expert shard is missing"):
        mlx_lm_odmoe.load(folder)


@pytest.mark.parametrize("field,value,message", [
    ("num_experts", 16, "8 experts per layer, config says 16"),
    ("moe_intermediate_size", 32, "gate_proj.weight is F32\\[64, 128\\], expected 32x128"),
    ("num_hidden_layers", 2, "MoE layers"),
])
def test_config_and_index_disagree(folder, field, value, message):
    edit_json(folder / "config.json", lambda d: d.update({field: value}))
    with pytest.raises(LayoutError, match=message):
        mlx_lm.load(str(folder))


def test_index_disagrees_with_the_shard_header(folder):
    def swap(d):
        d["tensors"][0]["dtype"] = "F16"
        d["tensors"][0]["shape"] = [64, 256]  # same bytes, different dtype
    edit_json(folder / "experts" / "index.json", swap)
    with pytest.raises(LayoutError, match="does not match"):
        mlx_lm_odmoe.load(folder, expert_cache="min")


def test_oversized_or_malformed_safetensors_header(folder):
    shard = shard_of(folder)
    data = bytearray(shard.read_bytes())
    data[:8] = (1 << 40).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    with pytest.raises(LayoutError, match=f"{shard.name}: safetensors header length"):
        mlx_lm_odmoe.load(folder, expert_cache="min")
    data[:8] = (100).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    with pytest.raises(LayoutError, match=f"{shard.name}: safetensors header is not valid JSON"):
        mlx_lm_odmoe.load(folder, expert_cache="min")

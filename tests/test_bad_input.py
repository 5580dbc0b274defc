"""Bad files, paths, options and settings give clear errors naming the file,
option or variable and the fix; never wrong numbers, and no tracebacks from
console commands."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx_lm
import numpy as np
import pytest

import mlx_lm_odmoe
from mlx_lm_odmoe.errors import BudgetError, ModelNotFoundError
from mlx_lm_odmoe.layout import LayoutError
from mlx_lm_odmoe.loading import resolve_model_path
from mlx_lm_odmoe.settings import Settings
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
    edit_json(
        folder / "experts" / "index.json", lambda d: d["shards"][0].update(file="../../etc/passwd")
    )
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


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_experts", 16, "8 experts per layer, config says 16"),
        ("moe_intermediate_size", 32, "gate_proj.weight is F32\\[64, 128\\], expected 32x128"),
        ("num_hidden_layers", 2, "MoE layers"),
    ],
)
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


# -- console commands and settings: clear errors, exit status 2, no traceback --------------

BIN = Path(sys.executable).parent
SHIPPED = Path(__file__).parent.parent / "models" / "tiny-qwen2-moe"
BUDGET_FORMS = "Use a size such as '8GB' or '512MiB', a share of all routed experts such as '25%'"
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("MLX_LM_ODMOE_")}


def command(name, *args, **env):
    """Run an installed console command as a user would, in a fresh interpreter."""
    full = {**CLEAN_ENV, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run(
        [str(BIN / name), *map(str, args)], capture_output=True, text=True, timeout=300, env=full
    )


def assert_usage_error(proc, *messages):
    """Exit status 2, ``error: ...`` on stderr, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "error: " in proc.stderr, proc.stderr[-3000:]
    for m in messages:
        assert m in proc.stderr, proc.stderr[-3000:]


# Item: a model path that does not exist.


def test_a_missing_model_folder_is_named_not_sent_to_the_hub(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(
        ModelNotFoundError,
        match=re.escape(f"model folder {missing} does not exist")
        + r".*Hub id has the form org/name",
    ):
        mlx_lm_odmoe.load(missing)
    assert issubclass(ModelNotFoundError, FileNotFoundError)


def test_a_file_or_a_folder_without_config_json_is_not_a_model(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file, not a model folder"):
        resolve_model_path(tmp_path / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match="no config.json in this folder"):
        resolve_model_path(tmp_path)


def test_collect_names_a_missing_model_folder(tmp_path):
    proc = command("mlx_lm_odmoe.collect", tmp_path / "nope" / "model", "--out", tmp_path / "t")
    missing = tmp_path / "nope" / "model"
    assert_usage_error(proc, f"model folder {missing} does not exist", "org/name")


def test_a_hub_id_still_goes_to_the_hub(models, tmp_path):
    from fake_hub import FakeHub

    hub = FakeHub("odmoe-test/tiny", models("qwen2_moe", "odmoe"))
    code = (
        "import json\nfrom mlx_lm_odmoe.loading import resolve_model_path\n"
        "fetched = str(resolve_model_path('odmoe-test/tiny'))\n"
        "try:\n    resolve_model_path('odmoe-test/not-there')\n"
        "except FileNotFoundError as e:\n    print(json.dumps([fetched, str(e)]))\n"
    )
    env = {
        **CLEAN_ENV,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_XET": "1",
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
        )
    finally:
        hub.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    fetched, missing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (Path(fetched) / "config.json").is_file() and str(tmp_path / "hf") in fetched
    assert missing.startswith("odmoe-test/not-there: no such folder here, and the Hugging Face Hub")


# Item: too few held-out tokens for collect.


def test_collect_with_too_few_heldout_tokens_names_the_options_and_numbers(tmp_path):
    np.save(tmp_path / "tokens.npy", np.arange(6000))
    proc = command(
        "mlx_lm_odmoe.collect",
        SHIPPED,
        "--out",
        tmp_path / "t.npz",
        "--heldout",
        tmp_path / "tokens.npy",
    )
    assert_usage_error(
        proc,
        "has 6000 tokens",
        "--chunks 32 + --generate 16 = 48 pieces of 256 tokens",
        "12288 needed",
        "--chunks + --generate to at most 23",
        "--chunk-len to at most 125",
    )
    assert not (tmp_path / "t.npz").exists()


# Item: train_shadow's output folder.


@pytest.fixture(scope="module")
def shipped_copy_and_trace(tmp_path_factory):
    """A copy of the shipped model (with its trained shadow model) and a small trace of it."""
    from mlx_lm_odmoe.research.traces import collect

    root = tmp_path_factory.mktemp("shadow")
    folder = root / "tiny-qwen2-moe"
    shutil.copytree(SHIPPED, folder)
    model, _ = mlx_lm_odmoe.load(folder, expert_cache="100%")
    heldout = np.random.default_rng(0).integers(0, 4096, 2000)
    trace = collect(
        model,
        heldout,
        chunks=12,
        chunk_len=16,
        generate=4,
        prompt_len=8,
        max_tokens=8,
        batch=4,
        progress=False,
    )
    trace.save(root / "trace.npz")
    return folder, root / "trace.npz"


TRAIN_FAST = ("--epochs", "1", "--rank", "8", "--distance", "1")


def test_train_shadow_creates_a_missing_out_folder(shipped_copy_and_trace, tmp_path):
    folder, trace = shipped_copy_and_trace
    out = tmp_path / "new" / "dir"
    proc = command(
        "mlx_lm_odmoe.train_shadow", folder, "--traces", trace, "--out", out, *TRAIN_FAST
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "shadow.json").is_file() and (out / "shadow.safetensors").is_file()


def test_train_shadow_replaces_a_shipped_shadow_model_only_with_force_and_keeps_a_backup(
    shipped_copy_and_trace,
):
    folder, trace = shipped_copy_and_trace
    old = {n: (folder / n).read_bytes() for n in ("shadow.json", "shadow.safetensors")}
    proc = command("mlx_lm_odmoe.train_shadow", folder, "--traces", trace, *TRAIN_FAST)
    assert_usage_error(proc, f"{folder} already has a shadow model", "--force")
    assert {n: (folder / n).read_bytes() for n in old} == old

    proc = command("mlx_lm_odmoe.train_shadow", folder, "--traces", trace, "--force", *TRAIN_FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {n: (folder / f"{n}.bak").read_bytes() for n in old} == old
    assert json.loads((folder / "shadow.json").read_text())["training"]["epochs"] == 1


# Item: the expert cache budget names where a bad value came from.

BUDGET_SOURCES = {
    "environment": (
        lambda v: Settings.build({}, environ={"MLX_LM_ODMOE_EXPERT_CACHE": v}),
        r"\$MLX_LM_ODMOE_EXPERT_CACHE is ",
    ),
    "config.json": (
        lambda v: Settings.build({"expert_cache": v}, environ={}),
        r"config.json's odmoe.expert_cache is ",
    ),
    "argument": (
        lambda v: Settings.build({}, {"expert_cache": v}, environ={}),
        r"the expert_cache= argument is ",
    ),
}


@pytest.mark.parametrize("source", BUDGET_SOURCES)
@pytest.mark.parametrize(
    "value,problem",
    [
        ("150%", "more than all the experts"),
        ("lots", "not a budget odmoe can read"),
        ("0GB", "a budget must be positive"),
        ("0%", "a budget must be positive"),
    ],
)
def test_a_bad_budget_names_its_source_and_the_accepted_forms(source, value, problem):
    build, named = BUDGET_SOURCES[source]
    with pytest.raises(
        BudgetError,
        match=named + re.escape(f"{value!r}: {problem}") + ".*" + re.escape(BUDGET_FORMS),
    ):
        build(value)


def test_a_negative_budget_is_an_error_not_the_minimum(folder):
    with pytest.raises(BudgetError, match="the expert_cache= argument is -1: a budget must be"):
        mlx_lm_odmoe.load(folder, expert_cache=-1)


def test_a_bad_budget_in_config_json_fails_the_load_naming_it(folder):
    edit_json(folder / "config.json", lambda d: d["odmoe"].update(expert_cache="200%"))
    with pytest.raises(BudgetError, match="config.json's odmoe.expert_cache is '200%'"):
        mlx_lm.load(str(folder))


def test_mlx_lm_generate_ends_with_the_budget_message(tmp_path):
    proc = command(
        "mlx_lm.generate",
        "--model",
        SHIPPED,
        "--prompt",
        "def f",
        "--max-tokens",
        "2",
        MLX_LM_ODMOE_EXPERT_CACHE="150%",
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "$MLX_LM_ODMOE_EXPERT_CACHE is '150%': more than all" in last, proc.stderr[-3000:]


def test_our_commands_print_the_budget_message_without_a_traceback(tmp_path):
    proc = command(
        "mlx_lm_odmoe.collect",
        SHIPPED,
        "--out",
        tmp_path / "t.npz",
        MLX_LM_ODMOE_EXPERT_CACHE="lots",
    )
    assert_usage_error(proc, "$MLX_LM_ODMOE_EXPERT_CACHE is 'lots'", BUDGET_FORMS)


# Item: the log interval under a command that configures no logging.


def test_log_interval_summaries_appear_under_mlx_lm_generate():
    proc = command(
        "mlx_lm.generate",
        "--model",
        SHIPPED,
        "--prompt",
        "def f",
        "--max-tokens",
        "16",
        MLX_LM_ODMOE_LOG_INTERVAL="0.000001",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[mlx_lm_odmoe] experts: hit rate 1.000" in proc.stderr, proc.stderr[-3000:]


def test_corrupt_bytes_read_in_pieces_fail_the_checksum(folder):
    """A record read in pieces is checked once all of it is in."""
    shard = shard_of(folder)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the last expert's record
    shard.write_bytes(bytes(data))
    model, _ = mlx_lm_odmoe.load(folder, expert_cache="min")
    store = model.expert_runtime.store
    store.inline_read_s, store.split_bytes = -1, 4096
    with pytest.raises(ExpertReadError, match=f"{shard.name}.*layer 2 expert 7.*checksum"):
        for e in range(8):
            store.fetch(2, __import__("numpy").array([e]))


# Item: checksums once per file version (store/verified.py).


def _crc_calls(monkeypatch):
    from mlx_lm_odmoe.store import readers

    calls, crc32 = [], readers.zlib.crc32
    monkeypatch.setattr(readers.zlib, "crc32", lambda *a: calls.append(1) or crc32(*a))
    return calls


def test_records_found_intact_are_trusted_while_their_shard_is_unchanged(folder, monkeypatch):
    from mlx_lm_odmoe.store import ShardedFolderReader

    first = ShardedFolderReader(folder)
    first.read(2, 7)
    first.close()  # saves what it found intact
    calls = _crc_calls(monkeypatch)
    again = ShardedFolderReader(folder)
    again.read(2, 7)
    assert not calls  # checked by the earlier run
    again.read(2, 6)
    assert calls  # never checked yet


def test_a_shard_changed_since_its_records_were_checked_is_checked_again(folder):
    from mlx_lm_odmoe.store import ShardedFolderReader

    first = ShardedFolderReader(folder)
    for e in range(8):
        first.read(2, e)
    first.close()
    shard = shard_of(folder)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the last expert's record, same size
    shard.write_bytes(bytes(data))
    again = ShardedFolderReader(folder)
    with pytest.raises(ExpertReadError, match=f"{shard.name}.*layer 2 expert 7.*checksum"):
        again.read(2, 7)

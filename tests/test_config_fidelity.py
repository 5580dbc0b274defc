"""A config.json saved by transformers 5 converts to the model its original means.

transformers 5 writes the rope as ``rope_parameters`` and renames keys its
config classes map (``attribute_map``); mlx-lm's ModelArgs read the old
keys. Each tiny architecture config (tests/data/archs) is saved by
transformers' own config class, converted, and must build the model its
original config builds in stock mlx-lm: the same parameters and the same
rope.
"""

import copy
import json
from pathlib import Path

import mlx_lm.models.mixtral as stock_mixtral
import pytest
from mlx.utils import tree_flatten

from mlx_lm_odmoe.conversion.config_keys import args_fields
from mlx_lm_odmoe.conversion.convert import odmoe_config
from mlx_lm_odmoe.errors import ConversionError
from mlx_lm_odmoe.loading import odmoe_model_config
from mlx_lm_odmoe.model_types import STOCK_TYPE_OF

ARCHS_DIR = Path(__file__).parent / "data" / "archs"
ARCHS = sorted(p.stem for p in ARCHS_DIR.glob("*.json"))
# Where transformers 5 restructures a config beyond renames and rope, so
# mlx-lm's args of the type cannot read what it saves.
RESTRUCTURED = {
    "bailing_hybrid": "head_dim is saved as the rope's head size, mlx-lm reads the attention's",
    "bailing_moe_v3": "saved as bailing_hybrid's config (head_dim is the rope's head size)",
    "gemma4_text": "global_head_dim and num_global_key_value_heads move into per_layer_config",
    "granitemoehybrid": "layer_types become linear_attention/full_attention, mlx-lm reads mamba/attention",
    "step3p5": "saved as Step3p7's config: moe_layers_enum becomes mlp_layer_types",
}


def _transformers_saved(config: dict, tmp_path) -> dict:
    transformers = pytest.importorskip("transformers")
    try:
        saved = transformers.AutoConfig.for_model(
            config["model_type"],
            **copy.deepcopy({k: v for k, v in config.items() if k != "model_type"}),
        )
    except ValueError:
        pytest.skip(f"transformers has no config class for {config['model_type']}")
    saved.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def _stock_model(config: dict):
    """Stock mlx-lm's model and args for what ``odmoe_config`` wrote."""
    import mlx_lm.utils

    stock = {**config, "model_type": STOCK_TYPE_OF[config["model_type"]]}
    model_class, args_class = mlx_lm.utils._get_classes(stock)
    args = args_class.from_dict(stock)
    return model_class(args), args


def _rope(args) -> dict:
    text = getattr(args, "text_config", None)
    where = vars(text) if hasattr(text, "__dict__") else vars(args)
    scaling = where.get("rope_scaling") or {}
    kind = scaling.get("type") or scaling.get("rope_type") or "default"
    return {
        "rope_theta": where.get("rope_theta"),
        "partial_rotary_factor": where.get("partial_rotary_factor"),
        "rope_scaling": (
            kind,
            {k: v for k, v in scaling.items() if k not in ("type", "rope_type")},
        ),
        "rope_parameters": where.get("rope_parameters"),
    }


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param(a, marks=pytest.mark.xfail(reason=RESTRUCTURED[a], strict=True))
        if a in RESTRUCTURED
        else a
        for a in ARCHS
    ],
)
def test_transformers_5_config_builds_the_same_model(arch, tmp_path):
    original = json.loads((ARCHS_DIR / f"{arch}.json").read_text())
    saved = _transformers_saved(original, tmp_path)
    want_model, want_args = _stock_model(odmoe_config(original))
    got_model, got_args = _stock_model(odmoe_config(saved))
    # transformers may add defaults (muse_spark's vision tower): none lost.
    got_shapes = {k: v.shape for k, v in tree_flatten(got_model.parameters())}
    assert {
        k: v.shape for k, v in tree_flatten(want_model.parameters())
    }.items() <= got_shapes.items()
    want, got = _rope(want_args), _rope(got_args)
    scaling_keys = want["rope_scaling"][1].keys() - {"rope_theta"}
    assert got["rope_scaling"][0] == want["rope_scaling"][0]
    assert {k: got["rope_scaling"][1].get(k) for k in scaling_keys} == {
        k: want["rope_scaling"][1][k] for k in scaling_keys
    }
    assert got["rope_theta"] == want["rope_theta"]
    assert got["partial_rotary_factor"] == want["partial_rotary_factor"]


QWEN3_MOE_5 = {
    "model_type": "qwen3_moe",
    "num_local_experts": 8,
    "rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"},
}


def test_rope_parameters_become_the_keys_mlx_lm_reads():
    config = odmoe_config(QWEN3_MOE_5)
    assert config["rope_theta"] == 50000.0
    assert config["num_experts"] == 8  # transformers 5's name: num_local_experts
    assert "rope_scaling" in args_fields(config["model_type"])
    assert config["rope_scaling"] is None  # default rope: nothing to scale


def test_yarn_rope_parameters_become_rope_scaling():
    config = odmoe_config(
        {
            "model_type": "deepseek_v3",
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e4, "factor": 4.0},
        }
    )
    assert config["rope_theta"] == 5e4
    assert config["rope_scaling"] == {"factor": 4.0, "type": "yarn", "rope_type": "yarn"}


def test_args_that_read_rope_parameters_get_them_as_they_are():
    rope = {"rope_type": "yarn", "rope_theta": 5e4, "factor": 4.0}
    config = odmoe_config({"model_type": "mistral4", "rope_parameters": rope})
    assert config["rope_parameters"] == rope and "rope_scaling" not in config


def test_disagreeing_rope_keys_name_the_file_and_both_keys():
    config = {**QWEN3_MOE_5, "rope_theta": 1e6}
    with pytest.raises(ConversionError, match=r"m/config.json: rope_theta = 1000000.0 disagrees "):
        odmoe_config(config, where="m/config.json")
    yarn = {"model_type": "deepseek_v3", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ConversionError, match=r"rope_scaling.factor = 8.0 disagrees with "):
        odmoe_config({**yarn, "rope_scaling": {"type": "yarn", "factor": 8.0}})
    with pytest.raises(ConversionError, match=r"rope_scaling.type = 'linear' disagrees with "):
        odmoe_config({**yarn, "rope_scaling": {"type": "linear", "factor": 4.0}})


def test_agreeing_keys_in_both_styles_convert():
    config = odmoe_config({**QWEN3_MOE_5, "rope_theta": 5e4, "rope_scaling": None})
    assert config["rope_theta"] == 5e4


def test_in_place_loading_reads_them_too(tmp_path):
    mc = odmoe_model_config(tmp_path, QWEN3_MOE_5)
    assert mc["rope_theta"] == 50000.0 and mc["num_experts"] == 8
    assert mc["model_type"] == "qwen3_moe_odmoe"


def test_stock_mlx_lm_args_ignore_rope_parameters():
    """Why this matters: stock mlx-lm's args take their default theta."""
    config = json.loads((ARCHS_DIR / "mixtral.json").read_text())
    config = {k: v for k, v in config.items() if k != "rope_theta"}
    args = stock_mixtral.ModelArgs.from_dict({**config, "rope_parameters": {"rope_theta": 5e4}})
    assert args.rope_theta == 1e6
    assert odmoe_config({**config, "rope_parameters": {"rope_theta": 5e4}})["rope_theta"] == 5e4

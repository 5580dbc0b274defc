"""Every mlx-lm MoE architecture runs on demand, bit-identical to stock mlx-lm.

For each architecture a tiny random model (tests/data/archs/<arch>.json, a
real config with shrunken sizes) is built by mlx-lm's own classes and saved
by mlx-lm's own functions, float32 and 4-bit (mlx-lm's quantize_model, with
the architecture's own recipe), then converted. Its logits at budgets 100%,
50% and the minimum, over a short and a long prompt and greedy decode steps
through mlx-lm's cache for that model, equal stock mlx-lm's exactly.
"""

import importlib
import json
import re
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from logits import prefill_and_decode, prompt_tokens

import mlx_lm_odmoe
from mlx_lm_odmoe.block import OnDemandSwitchGLU, moe_layers_of
from mlx_lm_odmoe.conversion.convert import convert
from mlx_lm_odmoe.model_types import ODMOE_TYPE_OF, RULE_BASES
from mlx_lm_odmoe.tools.synthetic import write_stock_checkpoint

ARCHS_DIR = Path(__file__).parent / "data" / "archs"
ARCHS = sorted(p.stem for p in ARCHS_DIR.glob("*.json"))
# Stock mlx-lm runs these only with a Metal GPU (custom kernels).
NEEDS_METAL = {"muse_spark"}
BUDGETS = ["100%", "50%", "min"]
PROMPTS = [7, 48]


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory):
    """arch_models(arch, precision) -> (stock mlx-lm model, converted folder)."""
    root = tmp_path_factory.mktemp("archs")
    cache = {}

    def get(arch, precision):
        key = (arch, precision)
        if key not in cache:
            config = json.loads((ARCHS_DIR / f"{arch}.json").read_text())
            bits = 4 if precision == "q4" else None
            stock = write_stock_checkpoint(root / f"{arch}-{precision}", config, 1, bits)
            folder = convert(stock, root / f"{arch}-{precision}-odmoe", progress=False)
            cache[key] = (mlx_lm.load(str(stock))[0], folder)
        return cache[key]

    return get


def _same(want, got) -> bool:
    return all(mx.array_equal(w, g).item() for w, g in zip(want, got))


@pytest.mark.parametrize("precision", ["f32", "q4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_bit_identical_to_stock(arch_models, arch, precision):
    if arch in NEEDS_METAL and not mx.metal.is_available():
        pytest.skip(f"stock mlx-lm's {arch} needs Metal")
    stock, folder = arch_models(arch, precision)
    for budget in BUDGETS:
        model, _ = mlx_lm_odmoe.load(folder, expert_cache=budget)
        assert moe_layers_of(model) == moe_layers_of(stock)
        for length in PROMPTS:
            prompt = prompt_tokens(length, seed=length)
            assert _same(prefill_and_decode(stock, prompt), prefill_and_decode(model, prompt)), (
                budget,
                length,
            )
        if budget != "100%":
            assert mlx_lm_odmoe.stats(model)["misses"] > 0


def test_rule_bases_are_the_installed_mlx_lm_moe_architectures():
    """RULE_BASES lists exactly the mlx-lm model modules that build a
    SwitchGLU or SwitchMLP (read from their source, as the finder cannot
    import mlx at start-up)."""
    models = Path(mlx_lm.__file__).parent / "models"
    uses_switch = re.compile(r"\bSwitch(GLU|MLP)\(")
    found = {
        f.stem
        for f in models.glob("*.py")
        if f.stem != "switch_layers" and uses_switch.search(f.read_text())
    }
    assert set(RULE_BASES) == found


def test_readme_table_lists_every_architecture():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("## Architectures", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"^\| `(\w+)` \|", table, re.M)) == set(RULE_BASES)


def test_every_architecture_has_a_tiny_config():
    assert set(ARCHS) == set(RULE_BASES)


@pytest.mark.parametrize("base", RULE_BASES)
def test_every_base_resolves_as_an_odmoe_type(base):
    module = importlib.import_module(f"mlx_lm.models.{ODMOE_TYPE_OF[base]}")
    stock = importlib.import_module(f"mlx_lm.models.{base}")
    assert issubclass(module.Model, stock.Model)
    assert "odmoe" in module.ModelArgs.__dataclass_fields__


def test_every_switch_layer_is_replaced():
    config = json.loads((ARCHS_DIR / "glm4_moe.json").read_text())
    module = importlib.import_module("mlx_lm.models.glm4_moe_odmoe")
    model = module.Model(module.ModelArgs.from_dict({**config, "odmoe": {"resolve": False}}))
    blocks = [m for _, m in model.named_modules() if isinstance(m, OnDemandSwitchGLU)]
    assert len(blocks) == len(moe_layers_of(model)) == 2  # layer 0 is dense
    assert not any(k.endswith(".switch_mlp.gate_proj.weight") for k, _ in _flat(model))


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())

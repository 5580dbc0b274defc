"""Settings: one typed object from load() arguments, the environment and
config.json's odmoe section; nothing unknown passes silently."""

import json
import shutil

import pytest

import mlx_lm_odmoe
from mlx_lm_odmoe.errors import OdmoeError, SettingsError
from mlx_lm_odmoe.settings import Settings


def test_load_arguments_beat_the_environment_which_beats_config():
    env = {"MLX_LM_ODMOE_EXPERT_CACHE": "50%", "MLX_LM_ODMOE_POLICY": "lru"}
    s = Settings.build({"expert_cache": "25%", "policy": "lfu-decay"}, environ=env)
    assert (s.expert_cache, s.expert_cache_source, s.policy) == (
        "50%",
        "$MLX_LM_ODMOE_EXPERT_CACHE",
        "lru",
    )
    s = Settings.build({"expert_cache": "25%"}, {"expert_cache": "8GB"}, environ=env)
    assert (s.expert_cache, s.expert_cache_source) == ("8GB", "the expert_cache= argument")
    assert Settings.build({}, environ={}).expert_cache_source == "default"


def test_environment_strings_become_typed_values():
    s = Settings.build(
        {}, environ={"MLX_LM_ODMOE_LOG_INTERVAL": "2.5", "MLX_LM_ODMOE_DROP_PAGE_CACHE": "1"}
    )
    assert s.log_interval == 2.5 and s.drop_page_cache is True


def test_an_unknown_key_names_itself_the_closest_valid_one_and_the_list():
    with pytest.raises(
        SettingsError,
        match=r"'expert_cach'.*Did you mean 'expert_cache'\?.*Valid settings:.*policy",
    ):
        Settings.build({"expert_cach": "25%"}, environ={})


def test_a_bad_environment_value_names_the_variable_and_the_choices():
    with pytest.raises(SettingsError, match=r"\$MLX_LM_ODMOE_POLICY = 'fifo'.*lfu-decay, lru"):
        Settings.build({}, environ={"MLX_LM_ODMOE_POLICY": "fifo"})
    with pytest.raises(SettingsError, match=r"read_threads.*'many'"):
        Settings.build({"read_threads": "many"}, environ={})


def test_settings_errors_are_value_errors_and_odmoe_errors():
    assert issubclass(SettingsError, ValueError) and issubclass(SettingsError, OdmoeError)


def test_an_unknown_key_in_config_json_fails_the_load(models, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(models("qwen2_moe", "odmoe"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["odmoe"]["prefetch_distanse"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SettingsError, match="prefetch_distanse.*prefetch_distance"):
        mlx_lm_odmoe.load(folder)


def test_an_unknown_environment_variable_value_fails_the_load(models, monkeypatch):
    monkeypatch.setenv("MLX_LM_ODMOE_PREDICTOR", "sometimes")
    with pytest.raises(SettingsError, match=r"\$MLX_LM_ODMOE_PREDICTOR = 'sometimes'"):
        mlx_lm_odmoe.load(models("qwen2_moe", "odmoe"))


def test_a_misspelled_environment_variable_is_an_error():
    with pytest.raises(
        SettingsError,
        match=r"\$MLX_LM_ODMOE_EXPERT_CACH\b.*Did you mean \$MLX_LM_ODMOE_EXPERT_CACHE",
    ):
        Settings.build({}, environ={"MLX_LM_ODMOE_EXPERT_CACH": "25%"})


def test_one_budget_plan_carves_staging_out_of_the_budget():
    from mlx_lm_odmoe.budget import plan_budget

    plan = plan_budget(
        10 * 100 * 3, record_nbytes=100, num_layers=3, num_experts=16, top_k=2, staging=4
    )
    assert (plan.slots, plan.staging, plan.budget_bytes) == (6, 4, 3000)
    assert (
        plan_budget(3 * 100 * 3, 100, 3, 16, 2, staging=4).staging == 1
    )  # never below top_k cached

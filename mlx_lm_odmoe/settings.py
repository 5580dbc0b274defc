"""Every odmoe setting, built once per model from its three sources.

Order of precedence: ``load()`` arguments, then ``MLX_LM_ODMOE_*``
environment variables, then config.json's ``odmoe`` section, then the
defaults below. An unknown key or a value of the wrong kind is an error that
names where it came from and what is accepted; nothing is silently ignored.
"""

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .budget import check_expert_cache
from .errors import SettingsError

ENV_PREFIX = "MLX_LM_ODMOE_"
LOAD_KEY = "load"  # ModelArgs.odmoe[LOAD_KEY]: load() arguments, stronger than the environment

# Keys a converter writes to describe the folder; read by tools, not settings.
INFO_KEYS = ("format", "expert_bytes", "experts_total_bytes", "inflated_from")

CHOICES = {
    "source": ("sharded", "mlx"),
    "policy": ("lfu-decay", "lru"),
    "predictor": ("auto", "on", "off"),
    "predict_with": ("auto", "next-attention", "shadow", "lookahead"),
    "hub_download": ("lazy", "all"),
    "direct_io": ("auto", "on", "off"),
    "prefetch_into": ("cache", "staging"),
}


def _env(name: str) -> dict:
    return {"env": ENV_PREFIX + name.upper()}


@dataclass(frozen=True)
class Settings:
    # Expert memory budget: bytes, "8GB", "25%", "min" or "all" (see budget.py).
    expert_cache: Any = field(default=None, metadata=_env("expert_cache"))
    # Where expert_cache came from, for error messages.
    expert_cache_source: str = "default"
    # The model folder; mlx-lm does not tell the model where it was loaded from.
    model_path: Optional[str] = field(default=None, metadata=_env("model_path"))
    # False: never look for the folder (the caller attaches a store).
    resolve: bool = True
    # "sharded": experts/ written by the converter; "mlx": stacked tensors read in place.
    source: str = "sharded"
    checkpoint: Optional[str] = None  # source "mlx": folder of the stacked tensors
    quantization: Optional[dict] = None  # source "mlx": the checkpoint's quantization
    policy: str = field(default="lfu-decay", metadata=_env("policy"))
    predictor: str = field(default="auto", metadata=_env("predictor"))
    # What guesses: "next-attention" runs the next layer's attention ahead
    # (predict/next_attention.py), "shadow" the folder's trained shadow
    # model, "lookahead" the later routers on this layer's input. "auto":
    # next-attention one layer ahead (where the decoder layers allow it),
    # else the shadow model if the folder has one, else the lookahead.
    predict_with: str = field(default="auto", metadata=_env("predict_with"))
    # Prefetch chosen on the trained models: one layer ahead, guesses with
    # p >= 0.125 (benchmarks/results/predict; in the I/O-bound benchmark
    # 0.0625 hid no more and read 0.3-0.4 bytes of unused guesses per
    # missed byte), 4 staging slots per layer taken out of the budget, only
    # when a read takes >= 0.5 ms.
    prefetch_distance: int = 1
    prefetch_min_prob: float = 0.125
    prefetch_stride: int = 1
    prefetch_staging: int = 4
    # Where guesses land: "cache" over the policy's victim (the cache keeps
    # all its slots), or "staging" slots taken out of the budget, which
    # never evict (measured in the I/O-bound regime: benchmarks/io_bound.py).
    prefetch_into: str = "cache"
    prefetch_min_read_ms: float = 0.5
    read_threads: int = 4
    preload: bool = True  # read every expert at load when all fit
    log_interval: Optional[float] = field(default=None, metadata=_env("log_interval"))
    hub_download: str = field(default="lazy", metadata=_env("hub_download"))
    drop_page_cache: bool = field(default=False, metadata=_env("drop_page_cache"))
    # Read experts around the page cache: "auto" does where the page cache
    # could not keep the experts anyway (they and the budget exceed memory).
    direct_io: str = field(default="auto", metadata=_env("direct_io"))
    # Start with the experts earlier runs used most (counts saved at exit in
    # the user's cache folder, or in warm_start_file).
    warm_start: bool = field(default=True, metadata=_env("warm_start"))
    warm_start_file: Optional[str] = field(default=None, metadata=_env("warm_start_file"))

    @classmethod
    def build(
        cls,
        config_section: Optional[Mapping] = None,
        overrides: Optional[Mapping] = None,
        environ: Optional[Mapping] = None,
        where: str = "config.json",
    ) -> "Settings":
        """Settings from config.json's ``odmoe`` section, the environment and
        ``load()`` overrides (e.g. ``{"expert_cache": "25%"}``)."""
        environ = os.environ if environ is None else environ
        values, sources = {}, {}
        for source, section in ((f"{where}'s odmoe section", config_section),):
            for key, value in (section or {}).items():
                if key in INFO_KEYS:
                    continue
                values[key] = _check_key(key, value, source)
                sources[key] = f"{where}'s odmoe.{key}"
                _check_value(key, values[key], sources[key])
        _check_environment(environ)
        for f in dataclasses.fields(cls):
            var = f.metadata.get("env")
            if var and environ.get(var, "") != "":
                values[f.name] = _convert(f, environ[var], f"${var}")
                sources[f.name] = f"${var}"
                _check_value(f.name, values[f.name], sources[f.name])
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            values[key] = _check_key(key, value, "load() arguments")
            sources[key] = f"the {key}= argument"
            _check_value(key, values[key], sources[key])
        values["expert_cache_source"] = sources.get("expert_cache", "default")
        return cls(**values)

    @classmethod
    def from_model_args(cls, odmoe: Optional[Mapping]) -> "Settings":
        """From ``ModelArgs.odmoe``: config.json's section, with what
        ``mlx_lm_odmoe.load()`` was given under its ``"load"`` key."""
        if isinstance(odmoe, Settings):
            return odmoe
        section = dict(odmoe or {})
        overrides = section.pop(LOAD_KEY, None)
        return cls.build(section, overrides)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.name != "expert_cache_source"}


ENV_VARS = tuple(f.metadata["env"] for f in dataclasses.fields(Settings) if "env" in f.metadata)


def _check_environment(environ: Mapping):
    """A misspelled variable would otherwise be ignored without a word."""
    for var in environ:
        if var.startswith(ENV_PREFIX) and var not in ENV_VARS:
            close = difflib.get_close_matches(var, ENV_VARS, n=1)
            hint = f" Did you mean ${close[0]}?" if close else ""
            raise SettingsError(
                f"unknown environment variable ${var}.{hint} odmoe reads: {', '.join(ENV_VARS)}"
            )


def _check_key(key: str, value, source: str):
    f = _FIELDS.get(key)
    if f is None:
        close = difflib.get_close_matches(key, _FIELDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SettingsError(
            f"unknown odmoe setting {key!r} in {source}.{hint} Valid settings: {', '.join(sorted(_FIELDS))}"
        )
    return _convert(f, value, f"{source} ({key})")


def _check_value(key: str, value, source: str):
    """Settings whose values have a grammar of their own are read here, at
    load, so that the error names where the value came from."""
    if key == "expert_cache":
        check_expert_cache(value, source)


def _convert(f, value, where: str):
    """``value`` as the field's type; strings (the environment) parsed."""
    kind = {bool: "bool", int: "int", float: "float", Optional[float]: "float"}.get(f.type)
    try:
        if f.name in CHOICES:
            value = str(value)
            if value not in CHOICES[f.name]:
                raise ValueError(f"use one of {', '.join(CHOICES[f.name])}")
        elif kind == "bool":
            value = _as_bool(value)
        elif kind == "int":
            value = int(value)
        elif kind == "float":
            value = None if value is None else float(value)
    except (TypeError, ValueError) as e:
        raise SettingsError(f"cannot read {where} = {value!r}: {e}") from None
    return value


def _as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("use true/false or 1/0")

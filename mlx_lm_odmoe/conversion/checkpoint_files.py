"""A checkpoint folder's config.json and weight files, with clear errors."""

import json
from pathlib import Path


def read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{cfg} not found: is {path} a model folder?")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from e


def text_config(config: dict) -> dict:
    """K2.5-style configs nest the language model under text_config."""
    text = config.get("text_config")
    if isinstance(text, dict) and "hidden_size" in text:
        return {**text, "model_type": text.get("model_type", config.get("model_type"))}
    return dict(config)


def weight_files(path: Path):
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: malformed index ({e!r})") from e
        files = [path / n for n in names]
        for f in files:
            if f.resolve().parent != path.resolve():
                raise ValueError(f"{index}: {f.name} points outside {path}")
            if not f.exists():
                raise FileNotFoundError(f"{f} is listed in {index.name} but missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weight files")
    return files

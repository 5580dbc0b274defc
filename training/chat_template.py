"""The chat template of the shipped models, and the step that writes it.

The models are base models (trained on Python sources and docs), so the
template is plain: ChatML-style role-tagged turns and, when asked, an
assistant header to continue from. It lives in ``tokenizer_config.json``
(``chat_template``), where mlx-lm and transformers read it; prepare_data.py
writes it there for new tokenizers, and this script adds it to an existing
tokenizer or model folder:

    python training/chat_template.py models/tiny-qwen2-moe models/tiny-kimi
"""

import argparse
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_chat_template(folder) -> Path:
    """Put CHAT_TEMPLATE into ``folder``/tokenizer_config.json, formatted as
    transformers writes it. A ``chat_template.jinja`` (where recent
    transformers saves templates) is folded in, so there is one template."""
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    (Path(folder) / "chat_template.jinja").unlink(missing_ok=True)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="folders holding a tokenizer_config.json")
    for folder in ap.parse_args().folders:
        print(f"wrote {write_chat_template(folder)}")


if __name__ == "__main__":
    main()

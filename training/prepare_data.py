"""Build the training corpus and a byte-level BPE tokenizer.

Corpus (all PSF licensed, available offline on Debian):
  * the Python 3.11 standard library sources in /usr/lib/python3.11
  * the reStructuredText sources of the Python 3.11 documentation
    (Debian package ``python3.11-doc``, /usr/share/doc/python3.11/html/_sources)

Files are collected in sorted order; any file mentioning the GPL is skipped.
A file goes to the held-out split when the first byte of the SHA-256 of its
relative path (prefixed with the source name) is below ``--heldout-threshold``
(default 8/256, about 3%). Documents are joined with ``<|endoftext|>``.

Outputs in ``--out`` (default artifacts/data):
  tokenizer/            tokenizer.json, tokenizer_config.json, special_tokens_map.json
  train.npy, heldout.npy  uint16 token ids
  files.json            the exact file lists of both splits
  meta.json             sizes and settings

Usage:
  python training/prepare_data.py --out artifacts/data
"""

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chat_template import write_chat_template  # noqa: E402

SOURCES = [
    ("stdlib", "/usr/lib/python3.11", (".py",)),
    ("docs", "/usr/share/doc/python3.11/html/_sources", (".txt",)),
]
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
SKIP_DIR_PREFIXES = ("config-3.",)
EXCLUDE_MARKERS = ("GPL", "GNU General Public", "GNU GENERAL PUBLIC", "GNU Lesser")
MAX_FILE_BYTES = 400_000

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]


def collect_files():
    files = []
    for name, root, exts in SOURCES:
        if not os.path.isdir(root):
            sys.exit(f"missing corpus source {root} (apt-get install python3.11-doc?)")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d for d in dirnames if d not in SKIP_DIRS and not d.startswith(SKIP_DIR_PREFIXES)
            )
            for fn in sorted(filenames):
                if fn.endswith(exts):
                    path = os.path.join(dirpath, fn)
                    if os.path.islink(path):
                        continue
                    rel = os.path.relpath(path, root)
                    files.append((name, rel, path))
    files.sort()
    return files


def read_text(path):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) > MAX_FILE_BYTES or len(data) == 0:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(m in text for m in EXCLUDE_MARKERS):
        return None
    return text.replace("\r\n", "\n")


def is_heldout(name, rel, threshold):
    h = hashlib.sha256(f"{name}/{rel}".encode()).digest()
    return h[0] < threshold


def train_tokenizer(texts, vocab_size, out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    write_chat_template(out_dir)  # into tokenizer_config.json, where the shipped folders have it
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="artifacts/data")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--heldout-threshold", type=int, default=8)
    args = ap.parse_args()

    # The BPE trainer is deterministic for a fixed input order; pin the
    # thread pool anyway so runs are byte-identical.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    train_docs, heldout_docs = [], []
    train_files, heldout_files, skipped = [], [], []
    for name, rel, path in collect_files():
        text = read_text(path)
        if text is None:
            skipped.append(f"{name}/{rel}")
            continue
        if is_heldout(name, rel, args.heldout_threshold):
            heldout_docs.append(text)
            heldout_files.append(f"{name}/{rel}")
        else:
            train_docs.append(text)
            train_files.append(f"{name}/{rel}")
    print(
        f"files: train {len(train_files)}, heldout {len(heldout_files)}, skipped {len(skipped)}",
        flush=True,
    )

    tok_dir = os.path.join(args.out, "tokenizer")
    tok = train_tokenizer(train_docs, args.vocab_size, tok_dir)
    eot_id = tok.token_to_id(EOT)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, eot id {eot_id}", flush=True)

    def encode(docs):
        ids = []
        for enc in tok.encode_batch(docs, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eot_id)
        return np.asarray(ids, dtype=np.uint16)

    train_ids = encode(train_docs)
    heldout_ids = encode(heldout_docs)
    np.save(os.path.join(args.out, "train.npy"), train_ids)
    np.save(os.path.join(args.out, "heldout.npy"), heldout_ids)

    n_chars_train = sum(len(d) for d in train_docs)
    meta = {
        "vocab_size": tok.get_vocab_size(),
        "eot_id": eot_id,
        "train_tokens": int(train_ids.size),
        "heldout_tokens": int(heldout_ids.size),
        "train_chars": n_chars_train,
        "heldout_chars": sum(len(d) for d in heldout_docs),
        "chars_per_token_train": n_chars_train / max(train_ids.size, 1),
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "skipped_files": len(skipped),
        "heldout_threshold": args.heldout_threshold,
        "sources": [s[1] for s in SOURCES],
        "train_sha256": hashlib.sha256(train_ids.tobytes()).hexdigest(),
        "heldout_sha256": hashlib.sha256(heldout_ids.tobytes()).hexdigest(),
    }
    with open(os.path.join(args.out, "files.json"), "w") as f:
        json.dump(
            {"train": train_files, "heldout": heldout_files, "skipped": skipped},
            f,
            indent=1,
        )
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(json.dumps(meta, indent=2))
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()

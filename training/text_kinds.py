"""Small corpora of three kinds of text, for cross-domain predictor tests.

Each kind comes from files every Debian system with Python 3.11 has:

  code   Python 3.11 standard library sources in the tiny models' held-out
         split (prepare_data.py's hash rule): code they never trained on
  man    the GNU coreutils manual pages (/usr/share/man/man1, troff markup
         stripped): technical prose about commands and options
  legal  the license texts of /usr/share/common-licenses (package
         base-files): plain English prose of another register

Files are read in sorted order and joined with ``<|endoftext|>``; the
outputs are token ids of the shipped models' tokenizer (both share one):

  <out>/<kind>.npy   uint16 token ids
  <out>/kinds.json   per kind: files, characters, tokens, sha256 of the ids

Usage:
  python training/text_kinds.py --tokenizer models/tiny-qwen2-moe --out artifacts/kinds
"""

import argparse
import gzip
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_data import EOT, SKIP_DIR_PREFIXES, SKIP_DIRS, is_heldout  # noqa: E402

STDLIB = "/usr/lib/python3.11"
MAN1 = "/usr/share/man/man1"
LICENSES = "/usr/share/common-licenses"
MAX_FILE_BYTES = 400_000


def code_files():
    """The stdlib sources prepare_data.py holds out from the tiny models."""
    out = []
    for dirpath, dirnames, filenames in os.walk(STDLIB):
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not d.startswith(SKIP_DIR_PREFIXES)
        )
        for fn in sorted(filenames):
            path = os.path.join(dirpath, fn)
            rel = os.path.relpath(path, STDLIB)
            if fn.endswith(".py") and not os.path.islink(path) and is_heldout("stdlib", rel, 8):
                out.append(path)
    return sorted(out)


def man_files():
    """coreutils' section-1 pages (help2man marks them "GNU coreutils")."""
    out = []
    for path in sorted(Path(MAN1).glob("*.1.gz")):
        if path.is_symlink():
            continue
        with gzip.open(path, "rt", errors="replace") as f:
            head = f.read(400)
        if "GNU coreutils" in head:
            out.append(str(path))
    return out


def legal_files():
    """Each license text once (GPL is a link to GPL-3, and so on)."""
    return sorted(str(p) for p in Path(LICENSES).iterdir() if p.is_file() and not p.is_symlink())


KINDS = {"code": code_files, "man": man_files, "legal": legal_files}


def read(path: str) -> str:
    data = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
    if len(data) > MAX_FILE_BYTES:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return strip_troff(text) if path.endswith(".gz") else text


_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\[,/&]"), ""),  # spacing hints
    (re.compile(r"\\\(aq"), "'"),
    (re.compile(r"\\\(dq"), '"'),
    (re.compile(r"\\\((em|en)"), "--"),
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\e"), "\\\\"),
]


def strip_troff(text: str) -> str:
    """The words of a man page: comments and layout requests dropped, a
    request's arguments kept as text (``.SH NAME`` -> ``NAME``)."""
    lines = []
    for line in text.split("\n"):
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            parts = line[1:].split(None, 1)
            if not parts or parts[0] in {"TH", "PP", "TP", "IP", "LP", "P", "br", "sp", "ad", "na"}:
                continue
            line = parts[1].strip('"') if len(parts) > 1 else ""
            if not line:
                continue
        for pattern, repl in _ESCAPES:
            line = pattern.sub(repl, line)
        lines.append(line)
    return "\n".join(lines)


def build(kind: str, tokenizer, eot_id: int):
    files, docs = [], []
    for path in KINDS[kind]():
        text = read(path)
        if text.strip():
            files.append(path)
            docs.append(text)
    ids = []
    for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot_id)
    ids = np.asarray(ids, dtype=np.uint16)
    info = {
        "files": files,
        "chars": sum(len(d) for d in docs),
        "tokens": int(ids.size),
        "sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
    }
    return ids, info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json")
    ap.add_argument("--out", default="artifacts/kinds")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    args = ap.parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for kind in args.kinds:
        ids, info = build(kind, tok, tok.token_to_id(EOT))
        np.save(out / f"{kind}.npy", ids)
        manifest[kind] = info
        print(f"{kind}: {len(info['files'])} files, {info['tokens']} tokens", flush=True)
    (out / "kinds.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()

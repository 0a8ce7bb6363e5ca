"""Derive CLIP's tokenizer files (vocab.json, merges.txt) from OpenAI's BPE list, offline.

The model hub is out of reach, but the PyPI wheel of open_clip_torch carries `bpe_simple_vocab_16e6.txt.gz`,
the list OpenAI's SimpleTokenizer builds CLIP's vocabulary from. We rebuild that vocabulary the same way — the
256 byte-unicode characters, the same with `</w>`, one token per merge for the first 48894 merges, then the two
special tokens — and write it in the layout transformers' CLIPTokenizer reads (49408 entries).

    python -m gen.train.clip_tokenizer open_clip_torch-3.3.0-py3-none-any.whl OUT_DIR
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

BPE_NAME = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary size minus bytes and special tokens, as in SimpleTokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def read_bpe(source: Path) -> list[str]:
    """The merge lines from the .txt.gz itself or from an open_clip_torch wheel holding it."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            data = wheel.read(BPE_NAME)
    else:
        data = source.read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return lines[1 : NUM_MERGES + 1]  # the first line is a version header


def build(merges: list[str]) -> tuple[dict[str, int], list[str]]:
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def write(source: Path, out: Path) -> Path:
    vocab, merges = build(read_bpe(source))
    if len(vocab) != 49408:
        raise ValueError(f"{source}: expected 49408 tokens, derived {len(vocab)}; is this CLIP's BPE list?")
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    from transformers import CLIPTokenizer

    # Saving through CLIPTokenizer writes the special-token and config files diffusers folders carry.
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(out)
    # tokenizer.json (3.6 MB) is rebuilt from vocab + merges at load time, faster than it is read.
    (out / "tokenizer.json").unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="bpe_simple_vocab_16e6.txt.gz or an open_clip_torch wheel")
    parser.add_argument("out", type=Path, help="folder to write the tokenizer files to")
    args = parser.parse_args(argv)
    print(write(args.source, args.out))


if __name__ == "__main__":
    main()

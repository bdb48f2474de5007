"""Derive the shipped CLIP tokenizer files (vocab.json, merges.txt) from OpenAI's BPE table.

Not used at runtime: the derived files are committed next to this script. Re-run it only to
regenerate them:

    pip download --no-deps -d /tmp/oc open-clip-torch
    unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python nodes/models/tokenizer/derive.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

The source table (MIT-licensed, from OpenAI CLIP, also shipped by open_clip) has a header line
followed by BPE merges. CLIP uses the first 49152 - 256 - 2 = 48894 of them; the vocabulary is
built in a fixed order so token ids match the ones the text encoders were trained with:
    256 byte symbols, the same 256 with an end-of-word marker, one token per merge, then the
    two special tokens. Total 49408.
Byte symbols use the usual printable-byte remapping (bytes_to_unicode) that GPT-2 style BPE
tokenizers share, so the files read back with transformers' CLIPTokenizer.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (printable ASCII/Latin-1 map to themselves)."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, int] = {b: b for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + extra
            extra += 1
    # Order matters for the vocabulary: kept bytes first (ascending), then the remapped ones.
    order = keep + [b for b in range(256) if b not in keep]
    return {b: chr(mapping[b]) for b in order}


def derive(bpe_gz: Path, out_dir: Path) -> None:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    assert len(merges) == N_MERGES and all(len(m) == 2 for m in merges)

    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL)
    assert len(vocab_list) == VOCAB_SIZE and len(set(vocab_list)) == VOCAB_SIZE
    vocab = {tok: i for i, tok in enumerate(vocab_list)}

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # The "#version" header line is skipped by the readers, like in the original file.
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")


if __name__ == "__main__":
    derive(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent)

"""The CLIP BPE tokenizer, from files shipped in this folder (see derive.py for their origin).

All Stable Diffusion text encoders share one vocabulary; they differ only in the padding token:
OpenAI CLIP-L (SD1, SDXL's first encoder) pads with <|endoftext|>, the OpenCLIP encoders
(SD2's H, SDXL's G) pad with id 0, the "!" token.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported on first use: it is slow to import
    from transformers import CLIPTokenizer

TOKENIZER_DIR = Path(__file__).parent
MAX_LENGTH = 77
PAD_TOKENS = {"l": "<|endoftext|>", "g": "!", "h": "!"}


@cache
def _bpe_data() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines if line and not line.startswith("#version"))
    return vocab, merges  # type: ignore[return-value]


def load_tokenizer(kind: str = "l") -> CLIPTokenizer:
    """A new CLIPTokenizer for text encoder `kind` ("l", "g" or "h"), fully offline."""
    if kind not in PAD_TOKENS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(PAD_TOKENS)}")
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_data()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),  # type: ignore[arg-type]  # hinted list[str]; its BPE takes (a, b) pairs as well
        pad_token=PAD_TOKENS[kind], model_max_length=MAX_LENGTH,
    )

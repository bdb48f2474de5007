"""The shipped T5 tokenizer (nodes/models/tokenizer/t5) is the standard T5 v1.1 / T5-XXL one and is
the one a real-sized T5-XXL encoder gets, offline."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import T5Config, T5EncoderModel

from nodes.models.sd3_handles import T5_TOKENIZER_DIR, T5_TOKENS, t5_tokenizer_for


@pytest.fixture(scope="module")
def t5xxl_tokenizer():
    # T5-XXL's shapes (google/t5-v1_1-xxl); built on the meta device, so no memory is spent on weights.
    cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                   feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = T5EncoderModel(cfg)
    return t5_tokenizer_for(model)


def test_shipped_file_is_the_t5_unigram_vocabulary():
    data = json.loads((T5_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"]["type"] == "Unigram"
    assert len(data["model"]["vocab"]) == 32100  # 32000 SentencePiece pieces + 100 <extra_id_*>


def test_real_sized_encoder_gets_the_shipped_tokenizer(t5xxl_tokenizer):
    tok = t5xxl_tokenizer
    assert len(tok) == 32100
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([32099, 32000]) == ["<extra_id_0>", "<extra_id_99>"]


@pytest.mark.parametrize(("text", "ids"), [
    # Ids published with T5 (transformers' T5 documentation and model card examples).
    ("translate English to German: The house is wonderful.", [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1]),
    ("Hello world", [8774, 296, 1]),
    ("", [1]),
])
def test_known_token_ids(t5xxl_tokenizer, text, ids):
    assert t5xxl_tokenizer(text).input_ids == ids


def test_sd3_t5_tokens_are_padded_to_77_and_never_cut(t5xxl_tokenizer):
    """SD3's T5 tokens with the shipped tokenizer, as ComfyUI's SD3 tokenizer makes them: the prompt, the end
    token (1), then padding (0) up to 77; a longer prompt is kept whole."""
    from types import SimpleNamespace

    from nodes.models.sd3_handles import SD3ClipHandle

    owner = SimpleNamespace(t5_tokenizer=t5xxl_tokenizer, t5_eos=lambda: 1)   # what _t5_chunk reads

    def t5_ids(text: str) -> list[int]:
        return SD3ClipHandle._t5_chunk(owner, text).ids  # type: ignore[arg-type]

    short = t5_ids("a photo of a cat")
    assert len(short) == T5_TOKENS
    assert short[:8] == [3, 9, 1202, 13, 3, 9, 1712, 1]
    assert set(short[8:]) == {0}
    long_prompt = ", ".join(["a highly detailed painting of a lighthouse on a cliff at sunset"] * 20)
    long = t5_ids(long_prompt)
    assert len(long) > 200 and long == t5xxl_tokenizer(long_prompt).input_ids   # word by word = whole string
    assert t5_ids("a (photo:1.3) of a cat") == short                              # emphasis is syntax


def test_readme_says_where_the_t5_tokenizer_came_from_and_under_which_licence():
    """Issue 14: the README names the shipped file, its source on the registry, how to rebuild it and the
    licences; its model list names SD3 and SD3.5."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = " ".join((root / "README.md").read_text(encoding="utf-8").split())
    for phrase in ("nodes/models/tokenizer/t5/tokenizer.json", "Apache-2.0", "stable-diffusion-cpp-python",
                   "nodes/models/tokenizer/derive_t5.py", "SD3 Medium", "SD3.5 Medium (MMDiT-X)",
                   "SD3.5 Large / Large Turbo"):
        assert phrase in readme, phrase
    assert (root / "nodes" / "models" / "tokenizer" / "derive_t5.py").is_file()
    assert (T5_TOKENIZER_DIR / "tokenizer.json").is_file()
    licence = (T5_TOKENIZER_DIR / "LICENSE.txt").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0" in licence and "END OF TERMS AND CONDITIONS" in licence

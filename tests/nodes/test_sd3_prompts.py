"""SD3 prompts longer than one CLIP chunk, and (text:weight) emphasis, as ComfyUI's SD3 encoder makes them
(issue 14): every 77-token CLIP chunk is encoded and kept, T5 gets the whole prompt (never cut at 77), and
T5's weighted tokens move away from the empty prompt's encoding as the CLIPs' do. Tiny random-weight
encoders from the real single-file layout; nothing mocked."""
from __future__ import annotations

import pytest
import torch

from nodes.models import sd3
from nodes.models.sd3_handles import SD3ClipHandle
from nodes.models.tiny_sd3 import CLIP_WIDTH, tiny_t5_tokenizer, write_tiny_sd3_checkpoint
from nodes.models.tokenizer import load_tokenizer

W_LG = CLIP_WIDTH["l"] + CLIP_WIDTH["g"]
# 40 words of two CLIP tokens or more: three 77-token CLIP chunks, and well over 77 T5 tokens
LONG = " ".join(["a watercolor painting of a lighthouse on a rocky shore at dusk, seagulls overhead"] * 10)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = write_tiny_sd3_checkpoint(tmp_path_factory.mktemp("sd3p") / "tiny_sd35.safetensors", sd35=True)
    ck = sd3.load_sd3_checkpoint(path)
    tokenizers = {"l": load_tokenizer("l"), "g": load_tokenizer("g"), "t5": tiny_t5_tokenizer()}
    return SD3ClipHandle(ck.text_encoders, tokenizers, device="cpu"), ck.text_encoders["t5"]


def test_a_long_prompt_keeps_every_clip_chunk_and_all_of_t5(clip):
    handle, t5 = clip
    [[cond, opts]] = handle.encode_text(LONG)
    clip_cond, clip_pooled = handle.clip.encode(handle.clip.tokenize(LONG))   # the SDXL-style CLIP pair
    chunks = clip_cond.shape[1] // 77
    assert chunks >= 2
    ids = tiny_t5_tokenizer()(LONG).input_ids            # whole prompt, end token; no padding needed
    assert len(ids) > 77
    assert cond.shape == (1, 77 * chunks + len(ids), t5.config.d_model)
    torch.testing.assert_close(cond[:, : 77 * chunks, :W_LG], clip_cond, rtol=0, atol=0)
    assert not cond[:, : 77 * chunks, W_LG:].any()
    with torch.no_grad():
        want_t5 = t5(input_ids=torch.tensor([ids])).last_hidden_state.float()
    torch.testing.assert_close(cond[:, 77 * chunks:], want_t5, rtol=0, atol=1e-6)
    # pooled (CLIP-L ++ CLIP-G): the first chunk's projected end tokens; G's part is SDXL's pooled vector
    first = handle.tokenize(LONG)
    first.chunks.update({k: first.chunks[k][:1] for k in ("l", "g")})
    torch.testing.assert_close(opts["pooled_output"], handle.encode(first)[1], rtol=0, atol=1e-6)  # batch of 1 vs 3
    torch.testing.assert_close(opts["pooled_output"][:, CLIP_WIDTH["l"]:], clip_pooled, rtol=0, atol=0)


def test_a_short_prompt_pads_t5_to_77(clip):
    handle, t5 = clip
    [[cond, _]] = handle.encode_text("a red house")
    ids = tiny_t5_tokenizer()("a red house", padding="max_length", max_length=77).input_ids
    assert cond.shape == (1, 154, t5.config.d_model)
    with torch.no_grad():
        want = t5(input_ids=torch.tensor([ids])).last_hidden_state.float()
    torch.testing.assert_close(cond[:, 77:], want, rtol=0, atol=1e-6)


def test_t5_takes_the_prompts_emphasis(clip):
    """"a (red:1.5) house": T5 sees "a red house" (the brackets are syntax) and the tokens of "red" are
    z_empty + (z - z_empty) * 1.5, z_empty being the empty prompt (end token, padding) at that position."""
    handle, t5 = clip
    tok = tiny_t5_tokenizer()
    [[cond, _]] = handle.encode_text("a (red:1.5) house")
    ids = tok("a red house", padding="max_length", max_length=77).input_ids
    empty = tok("", padding="max_length", max_length=77).input_ids
    with torch.no_grad():
        z, z_empty = t5(input_ids=torch.tensor([ids, empty])).last_hidden_state.float().split(1)
    n_a = len(tok.encode("a", add_special_tokens=False))
    n_red = len(tok.encode("red", add_special_tokens=False))
    weights = torch.ones(77)
    weights[n_a : n_a + n_red] = 1.5
    want = torch.where(weights.view(1, -1, 1) != 1.0, z_empty + (z - z_empty) * weights.view(1, -1, 1), z)
    torch.testing.assert_close(cond[:, 77:], want, rtol=0, atol=1e-5)
    [[plain, _]] = handle.encode_text("a red house")
    assert not torch.allclose(cond[:, 77:], plain[:, 77:], atol=1e-4)

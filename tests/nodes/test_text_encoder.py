"""ClipHandle on tiny real CLIP models: tokenizing, weighting, embeddings, layer choice, cache."""
from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from nodes.models.text_encoder import BOS_ID, EOS_ID, MAX_LENGTH, ClipHandle, chunk_groups
from nodes.models.tiny import tiny_checkpoint_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sd1():
    return tiny_checkpoint_models("sd1", seed=1)


@pytest.fixture(scope="module")
def sd2():
    return tiny_checkpoint_models("sd2", seed=2)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_checkpoint_models("sdxl", seed=3)


def handle(ckpt, embedding_dirs=None) -> ClipHandle:
    return ClipHandle.from_checkpoint(ckpt, embedding_dirs=embedding_dirs, device="cpu")


def ids_of(clip: ClipHandle, word: str, key: str = "l") -> list[int]:
    return clip.tokenizers[key].encode(word, add_special_tokens=False)


def reference_hidden(model, ids: list[int], layer: int | None, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent computation with transformers directly: (hidden [1,77,D], pooled [1,P])."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    inner = getattr(model, "text_model", model)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    if layer is None:
        return out.last_hidden_state, pooled
    h = out.hidden_states[layer]
    return (inner.final_layer_norm(h) if norm else h), pooled


# ---------------------------------------------------------------- tokenizing

def test_chunking_moves_short_groups_and_splits_long_ones() -> None:
    pad = EOS_ID
    # 74 tokens, then a 3-token word that does not fit: it moves whole to the next chunk.
    chunks = chunk_groups([[(1, 1.0)] * 74, [(2, 1.0)] * 3], pad)
    assert len(chunks) == 2
    assert chunks[0].ids[:1] == [BOS_ID] and chunks[0].ids[75] == EOS_ID
    assert chunks[0].ids[76] == pad and 2 not in chunks[0].ids
    assert chunks[1].ids[:5] == [BOS_ID, 2, 2, 2, EOS_ID]
    # A 10-token group is "large": it is split at the boundary instead.
    chunks = chunk_groups([[(1, 1.0)] * 74, [(2, 1.0)] * 10], pad)
    assert chunks[0].ids[75] == 2 and chunks[0].ids[76] == EOS_ID
    assert chunks[1].ids[1:10] == [2] * 9 and chunks[1].ids[10] == EOS_ID
    for c in chunks:
        assert len(c.ids) == len(c.weights) == MAX_LENGTH


def test_tokenize_sd1_layout_and_weights(sd1) -> None:
    clip = handle(sd1)
    tok = clip.tokenize("a (cat:1.5)")
    [chunk] = tok.chunks["l"]
    a, cat = ids_of(clip, "a"), ids_of(clip, "cat")
    assert chunk.ids[: 2 + len(a) + len(cat)] == [BOS_ID, *a, *cat, EOS_ID]
    assert set(chunk.ids[2 + len(a) + len(cat) :]) == {EOS_ID}  # CLIP-L pads with EOS
    assert chunk.weights[1 + len(a)] == 1.5 and chunk.weights[1] == 1.0
    assert tok.has_weights()


def test_tokenize_long_prompt_makes_more_chunks(sd1) -> None:
    clip = handle(sd1)
    tok = clip.tokenize("photo " * 100)
    assert tok.num_chunks() == 2
    cond, _ = clip.encode(tok)
    assert cond.shape == (1, 2 * MAX_LENGTH, 32)


def test_word_that_does_not_fit_starts_the_next_chunk(sd1) -> None:
    clip = handle(sd1)
    photo, word = ids_of(clip, "photograph"), ids_of(clip, "extraordinarily")
    assert len(photo) == 1 and 1 < len(word) < 8  # 74 + 2 tokens overflow the 75-token chunk
    for text, weight in (("photograph " * 74 + "extraordinarily", 1.0),
                         ("(" + "photograph\n" * 74 + "extraordinarily:1.3)", 1.3)):
        c0, c1 = clip.tokenize(text).chunks["l"]
        # Chunk 0: BOS, the 74 photographs, then EOS padding where the word would have been cut.
        assert c0.ids[:75] == [BOS_ID] + photo * 74 and set(c0.ids[75:]) == {EOS_ID}
        assert c0.weights[1:75] == [weight] * 74 and c0.weights[0] == c0.weights[75] == 1.0
        # Chunk 1 starts with the whole word, each of its tokens carrying the segment's weight.
        assert c1.ids[: 2 + len(word)] == [BOS_ID, *word, EOS_ID]
        assert c1.weights[1 : 1 + len(word)] == [weight] * len(word)
        assert c1.weights[0] == c1.weights[1 + len(word)] == 1.0


def test_words_are_split_on_spaces_and_newlines(sd1) -> None:
    clip = handle(sd1)
    tok = clip.tokenize("  a\n\ncat  ")
    a, cat = ids_of(clip, "a"), ids_of(clip, "cat")
    assert tok.chunks["l"][0].ids[: 2 + len(a) + len(cat)] == [BOS_ID, *a, *cat, EOS_ID]


def test_openclip_pads_with_zero(sd2, sdxl) -> None:
    [chunk] = handle(sd2).tokenize("cat").chunks["h"]
    assert chunk.ids[-1] == 0
    tok = handle(sdxl).tokenize("cat")
    assert tok.chunks["l"][0].ids[-1] == EOS_ID and tok.chunks["g"][0].ids[-1] == 0


# ---------------------------------------------------------------- encoding semantics

def test_sd1_encode_matches_last_normed_layer(sd1) -> None:
    clip = handle(sd1)
    tok = clip.tokenize("a photo of a cat")
    cond, pooled = clip.encode(tok)
    ref, ref_pooled = reference_hidden(sd1.text_encoders["l"], tok.chunks["l"][0].ids, None, True)
    assert cond.shape == (1, 77, 32) and pooled.shape == (1, 32)
    torch.testing.assert_close(cond, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)


def test_sd2_uses_penultimate_normed(sd2) -> None:
    clip = handle(sd2)
    tok = clip.tokenize("a photo of a cat")
    cond, _ = clip.encode(tok)
    ref, _ = reference_hidden(sd2.text_encoders["h"], tok.chunks["h"][0].ids, -2, True)
    torch.testing.assert_close(cond, ref, atol=1e-5, rtol=1e-5)
    assert clip.last_layer == -2 and clip.clip_skip == 2


def test_sdxl_concatenates_both_encoders_and_pools_from_g(sdxl) -> None:
    clip = handle(sdxl)
    tok = clip.tokenize("a photo of a cat")
    cond, pooled = clip.encode(tok)
    ref_l, _ = reference_hidden(sdxl.text_encoders["l"], tok.chunks["l"][0].ids, -2, False)
    ref_g, ref_pooled = reference_hidden(sdxl.text_encoders["g"], tok.chunks["g"][0].ids, -2, False)
    assert cond.shape == (1, 77, 64) and pooled is not None and pooled.shape == (1, 32)
    torch.testing.assert_close(cond, torch.cat([ref_l, ref_g], dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)
    conditioning = clip.encode_text("a photo of a cat")
    assert len(conditioning) == 1 and conditioning[0][0].shape == (1, 77, 64)
    torch.testing.assert_close(conditioning[0][1]["pooled_output"], pooled)


def test_weight_one_everywhere_equals_plain(sd1, sdxl) -> None:
    for ckpt in (sd1, sdxl):
        clip = handle(ckpt)
        plain, plain_pooled = clip.encode(clip.tokenize("a cat on a mat"))
        weighted, weighted_pooled = clip.encode(clip.tokenize("(a cat:1.0) on (a mat:1)"))
        torch.testing.assert_close(weighted, plain, rtol=0, atol=0)
        torch.testing.assert_close(weighted_pooled, plain_pooled, rtol=0, atol=0)


def test_weight_moves_only_weighted_positions_along_the_formula(sd1) -> None:
    clip = handle(sd1)
    plain, plain_pooled = clip.encode(clip.tokenize("a cat"))
    empty, _ = clip.encode(clip.tokenize(""))
    weighted, weighted_pooled = clip.encode(clip.tokenize("a (cat:1.5)"))
    cat_pos = 1 + len(ids_of(clip, "a"))
    others = [i for i in range(77) if i != cat_pos]
    torch.testing.assert_close(weighted[:, others], plain[:, others], atol=1e-5, rtol=1e-5)
    expected = empty[:, cat_pos] + (plain[:, cat_pos] - empty[:, cat_pos]) * 1.5
    torch.testing.assert_close(weighted[:, cat_pos], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(weighted[:, cat_pos], plain[:, cat_pos])
    # The pooled vector is the unweighted first chunk's.
    torch.testing.assert_close(weighted_pooled, plain_pooled, atol=1e-5, rtol=1e-5)


def test_weights_apply_to_every_encoder_in_sdxl(sdxl) -> None:
    clip = handle(sdxl)
    plain, _ = clip.encode(clip.tokenize("a cat"))
    weighted, _ = clip.encode(clip.tokenize("a (cat:0.5)"))
    cat_pos = 1 + len(ids_of(clip, "a"))
    diff = (weighted - plain).abs()[0, cat_pos]
    assert diff[:32].max() > 1e-4 and diff[32:].max() > 1e-4  # L half and G half both moved
    untouched = [i for i in range(77) if i != cat_pos]
    assert (weighted - plain).abs()[0, untouched].max() < 1e-5


# ---------------------------------------------------------------- layers

def test_set_last_layer_changes_output_and_clone_is_independent(sd1) -> None:
    clip = handle(sd1)
    base, _ = clip.encode(clip.tokenize("a cat"))
    skipped = clip.clone()
    skipped.set_last_layer(-2)
    assert clip.last_layer == -1 and skipped.clip_skip == 2
    out, _ = skipped.encode(skipped.tokenize("a cat"))
    assert not torch.allclose(out, base)
    tok = clip.tokenize("a cat")
    ref, _ = reference_hidden(sd1.text_encoders["l"], tok.chunks["l"][0].ids, -2, True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The original's cached result is untouched by the clone's setting.
    again, _ = clip.encode(clip.tokenize("a cat"))
    torch.testing.assert_close(again, base, rtol=0, atol=0)
    # Beyond the encoder's depth means the normed last layer (ComfyUI), i.e. the SD1 default.
    deep = clip.clone()
    deep.set_last_layer(-24)
    torch.testing.assert_close(deep.encode(deep.tokenize("a cat"))[0], base, atol=1e-6, rtol=1e-6)


def test_sdxl_last_layer_minus_one_differs_from_default(sdxl) -> None:
    clip = handle(sdxl)
    default, _ = clip.encode(clip.tokenize("a cat"))
    last = clip.clone()
    last.set_last_layer(-1)
    out, _ = last.encode(last.tokenize("a cat"))
    assert out.shape == default.shape and not torch.allclose(out, default)


# ---------------------------------------------------------------- embeddings

def _dog_vector(clip: ClipHandle, key: str = "l") -> torch.Tensor:
    [dog] = ids_of(clip, "dog", key)
    model = clip.text_encoders[key]
    return model.get_input_embeddings().weight[dog].detach().clone()


def test_embedding_vectors_are_injected(sd1, tmp_path) -> None:
    emb_dir = tmp_path / "embeddings"
    emb_dir.mkdir()
    clip = handle(sd1, [emb_dir])
    # An embedding whose only vector is the input embedding of "dog" must encode exactly like "dog".
    save_file({"emb_params": _dog_vector(clip).unsqueeze(0)}, str(emb_dir / "doggy.safetensors"))
    with_embedding, _ = clip.encode(clip.tokenize("a embedding:doggy cat"))
    as_word, _ = clip.encode(clip.tokenize("a dog cat"))
    without, _ = clip.encode(clip.tokenize("a cat"))
    torch.testing.assert_close(with_embedding, as_word, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_embedding, without)
    # Explicit extension and weighting work on embeddings too.
    weighted, _ = clip.encode(clip.tokenize("a (embedding:doggy.safetensors:1.3) cat"))
    assert not torch.allclose(weighted, with_embedding)


def test_multi_vector_pt_embedding(sd1, tmp_path) -> None:
    clip = handle(sd1, [tmp_path])
    vectors = torch.randn(3, 32)
    torch.save({"string_to_param": {"*": torch.nn.Parameter(vectors)}, "name": "style", "step": 100},
               tmp_path / "style.pt")
    tok = clip.tokenize("embedding:style, cat")
    chunk = tok.chunks["l"][0]
    assert sorted(chunk.vectors) == [1, 2, 3]
    torch.testing.assert_close(chunk.vectors[2], vectors[1])
    assert chunk.ids[4:6] == [*ids_of(clip, ","), *ids_of(clip, "cat")]


def test_sdxl_embedding_uses_per_encoder_keys(sdxl, tmp_path) -> None:
    clip = handle(sdxl, [tmp_path])
    vl, vg = torch.randn(2, 32), torch.randn(2, 32)
    save_file({"clip_l": vl, "clip_g": vg}, str(tmp_path / "xl.safetensors"))
    tok = clip.tokenize("embedding:xl")
    torch.testing.assert_close(tok.chunks["l"][0].vectors[1], vl[0])
    torch.testing.assert_close(tok.chunks["g"][0].vectors[2], vg[1])
    cond, pooled = clip.encode(tok)
    assert cond.shape == (1, 77, 64) and pooled is not None


def test_unknown_embedding_is_ignored_with_a_warning(sd1, tmp_path, caplog) -> None:
    clip = handle(sd1, [tmp_path])
    with caplog.at_level(logging.WARNING):
        out, _ = clip.encode(clip.tokenize("a embedding:nothere cat"))
    assert "nothere" in caplog.text
    plain, _ = clip.encode(clip.tokenize("a cat"))
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


def test_embedding_names_cannot_leave_the_folder(sd1, tmp_path, caplog) -> None:
    inside = tmp_path / "embeddings"
    inside.mkdir()
    clip = handle(sd1, [inside])
    save_file({"emb_params": _dog_vector(clip).unsqueeze(0)}, str(tmp_path / "secret.safetensors"))
    plain, _ = clip.encode(clip.tokenize("a cat"))
    for hostile in ("../secret", "../secret.safetensors", str(tmp_path / "secret")):
        tok = clip.tokenize(f"a embedding:{hostile} cat")
        assert not tok.chunks["l"][0].vectors
        torch.testing.assert_close(clip.encode(tok)[0], plain, rtol=0, atol=0)


def test_without_embedding_dirs_the_reference_is_plain_text(sd1) -> None:
    clip = handle(sd1)  # no embedding folders configured (like ComfyUI's embedding_directory=None)
    tok = clip.tokenize("embedding:foo")
    assert not tok.chunks["l"][0].vectors
    assert len([i for i in tok.chunks["l"][0].ids if i not in (BOS_ID, EOS_ID)]) > 1


# ---------------------------------------------------------------- cache, clone, memory

def test_encode_is_cached_and_results_are_private_copies(sd1) -> None:
    clip = handle(sd1)
    first, _ = clip.encode(clip.tokenize("a cached prompt"))
    assert len(clip._cache) == 1
    first.zero_()  # callers may mutate what they get back
    second, _ = clip.encode(clip.tokenize("a cached prompt"))
    assert len(clip._cache) == 1 and second.abs().sum() > 0
    clip.encode(clip.tokenize("another prompt"))
    assert len(clip._cache) == 2


def test_cache_is_bounded(sd1) -> None:
    clip = ClipHandle.from_checkpoint(sd1, device="cpu")
    clip.cache_size = 3
    for i in range(6):
        clip.encode(clip.tokenize(f"prompt {i}"))
    assert len(clip._cache) == 3


def test_footprint_and_device_protocol(sd1) -> None:
    clip = handle(sd1)
    fp = clip.footprint()
    n_bytes = sum(p.numel() * p.element_size() for p in sd1.text_encoders["l"].parameters())
    assert set(fp) == {"cpu"} and fp["cpu"] >= n_bytes
    twin = clip.clone()
    assert twin.weights_key() == clip.weights_key() and twin.footprint() == fp
    clip.to_device("cpu")  # a no-op move must keep things working
    assert clip.encode_text("x")[0][0].shape == (1, 77, 32)


def test_with_text_encoders_replaces_weights_only_on_the_copy(sd1) -> None:
    clip = handle(sd1)
    base, _ = clip.encode(clip.tokenize("a cat"))
    copies = {k: copy.deepcopy(m) for k, m in clip.text_encoders.items()}
    with torch.no_grad():
        for p in copies["l"].parameters():
            p.mul_(1.05)
    patched = clip.with_text_encoders(copies)
    assert patched.weights_key() != clip.weights_key()
    assert not torch.allclose(patched.encode(patched.tokenize("a cat"))[0], base)
    torch.testing.assert_close(clip.encode(clip.tokenize("a cat"))[0], base, rtol=0, atol=0)


class _NotAllowed:
    """Pickling an instance needs a global that weights_only loading refuses."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_unsafe_pickle_embedding_is_not_loaded(sd1, tmp_path, caplog) -> None:
    clip = handle(sd1, [tmp_path])
    torch.save({"emb_params": torch.randn(1, 32), "payload": _NotAllowed()}, tmp_path / "evil.pt")
    with caplog.at_level(logging.WARNING):
        tok = clip.tokenize("embedding:evil cat")
    assert not tok.chunks["l"][0].vectors and "evil" in caplog.text


def test_embedding_dirs_may_be_a_callable(sd1, tmp_path) -> None:
    dirs: list = []
    clip = handle(sd1, lambda: dirs)
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "late.safetensors"))
    assert not clip.tokenize("embedding:late").chunks["l"][0].vectors
    dirs.append(tmp_path)  # e.g. an extra paths YAML loaded after the checkpoint
    assert len(clip.tokenize("embedding:late").chunks["l"][0].vectors) == 2

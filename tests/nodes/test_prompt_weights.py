"""ComfyUI prompt-weighting syntax: the parser must weigh prompts exactly like ComfyUI does."""
from __future__ import annotations

import pytest

from nodes.models.prompt_weights import (
    PromptSegment,
    embedding_names,
    parse_prompt,
    parse_prompt_weights,
    split_embeddings,
)

W11 = 1.1
W121 = 1.1 * 1.1

CASES: list[tuple[str, list[tuple[str, float]]]] = [
    ("", []),
    ("a cat", [("a cat", 1.0)]),
    ("a (cat)", [("a ", 1.0), ("cat", W11)]),
    ("a ((cat))", [("a ", 1.0), ("cat", W121)]),
    ("(((cat)))", [("cat", 1.1 * 1.1 * 1.1)]),
    ("a (cat:1.5) sat", [("a ", 1.0), ("cat", 1.5), (" sat", 1.0)]),
    ("(cat:0.5)", [("cat", 0.5)]),
    ("(cat:-1)", [("cat", -1.0)]),
    ("(cat: 1.25 )", [("cat", 1.25)]),
    # The weight is absolute, not multiplied by the enclosing level.
    ("((cat:1.5))", [("cat", 1.5)]),
    # An outer explicit weight multiplies an inner bare group.
    ("((cat) dog:1.5)", [("cat", 1.5 * 1.1), (" dog", 1.5)]),
    ("(a (b) c)", [("a ", W11), ("b", W121), (" c", W11)]),
    # Only the last colon counts; what does not parse stays text with the 1.1 factor.
    ("(a:b:1.2)", [("a:b", 1.2)]),
    # ComfyUI reads any trailing number as the weight, even where it was meant as text.
    ("(ratio 16:9)", [("ratio 16", 9.0)]),
    ("(ratio 16:9 wide)", [("ratio 16:9 wide", W11)]),
    ("(:1.3)", [(":1.3", W11)]),
    ("(cat:)", [("cat:", W11)]),
    ("(cat:nan)", [("cat:nan", W11)]),
    ("(cat:inf)", [("cat:inf", W11)]),
    # Escaped parentheses are literal (backslash dropped) and never open a group.
    (r"\(cat\)", [("(cat)", 1.0)]),
    (r"a \(b\) (c)", [("a (b) ", 1.0), ("c", W11)]),
    (r"(smile \(happy\):1.2)", [("smile (happy)", 1.2)]),
    # Unbalanced parentheses never raise.
    ("(cat", [("(cat", 1.0)]),
    ("cat)", [("cat)", 1.0)]),
    ("a) (b", [("a) (b", 1.0)]),
    ("(a))b(c)", [("a", W11), (")b(c)", 1.0)]),
    ("((a)", [("(a", W11)]),
    ("()", []),
    ("a () b", [("a ", 1.0), (" b", 1.0)]),
    # Newlines and other characters pass through.
    ("line1\n(line2)", [("line1\n", 1.0), ("line2", W11)]),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_weight_table(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_prompt_weights(text)
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_explicit_weights_are_exact_floats() -> None:
    assert parse_prompt_weights("(x:1.3)") == [("x", 1.3)]


def test_embedding_at_start_and_after_space() -> None:
    segs = parse_prompt("embedding:easyneg, a cat embedding:sub/style.safetensors")
    assert segs == [
        PromptSegment("embedding:easyneg", 1.0, "easyneg"),
        PromptSegment(", a cat ", 1.0),
        PromptSegment("embedding:sub/style.safetensors", 1.0, "sub/style.safetensors"),
    ]


def test_embedding_inside_weighted_group_gets_the_weight() -> None:
    segs = parse_prompt("a (embedding:foo:1.4) b")
    assert [s.embedding for s in segs] == [None, "foo", None]
    assert segs[1].weight == pytest.approx(1.4)
    assert segs[0].weight == 1.0 and segs[2].weight == 1.0


def test_embedding_after_newline_and_trailing_commas() -> None:
    segs = parse_prompt("cat\nembedding:bar,,, dog")
    assert [(s.text, s.embedding) for s in segs] == [
        ("cat\n", None),
        ("embedding:bar", "bar"),
        (",,, dog", None),
    ]


def test_embedding_must_start_a_word() -> None:
    # Glued to a previous word it is plain text (ComfyUI only splits at spaces/newlines).
    assert all(s.embedding is None for s in parse_prompt("cat,embedding:bar"))
    assert all(s.embedding is None for s in parse_prompt("embedding: bar"))
    assert all(s.embedding is None for s in parse_prompt("embedding:,"))


def test_split_embeddings_keeps_all_text() -> None:
    text = "x embedding:a y embedding:b"
    segs = split_embeddings(text, 0.7)
    assert "".join(s.text for s in segs) == text
    assert all(s.weight == 0.7 for s in segs)


def test_embedding_names_deduplicated_in_order() -> None:
    assert embedding_names("embedding:b (embedding:a) embedding:b") == ["b", "a"]

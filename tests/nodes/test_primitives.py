"""Primitive and string nodes (ComfyUI core), called directly and through the executor."""
from __future__ import annotations

import pytest

from nodes import primitives as P, strings as S


def test_primitives_pass_their_value_through_with_comfyui_schemas(sd_env):
    registry, _ = sd_env
    assert P.primitive_int(-5) == -5 and P.primitive_float(2.5) == 2.5 and P.primitive_boolean(True) is True
    assert P.primitive_string("a") == "a" and P.primitive_string_multiline("a\nb") == "a\nb"
    info = registry.node_info("PrimitiveInt")
    assert info["input"]["required"]["value"][1]["control_after_generate"] is True
    assert info["display_name"] == "Int" and info["category"] == "utils/primitive" and info["output"] == ["INT"]
    assert registry.node_info("PrimitiveStringMultiline")["input"]["required"]["value"][1]["multiline"] is True
    assert registry.node_info("StringLength")["output"] == ["INT"]
    assert registry.node_info("RegexMatch")["output"] == ["BOOLEAN"]
    assert registry.node_info("RegexReplace")["input_order"] == {
        "required": ["string", "regex_pattern", "replace"],
        "optional": ["case_insensitive", "multiline", "dotall", "count"]}


def test_string_basics():
    assert S.string_concatenate("a", "b", ", ") == "a, b"
    assert S.string_substring("hello world", 0, 5) == "hello" and S.string_substring("hello", -3, 5) == "llo"
    assert S.string_length("héllo") == 5
    assert [S.case_converter("hello wORLD", m) for m in ("UPPERCASE", "lowercase", "Capitalize", "Title Case")] == [
        "HELLO WORLD", "hello world", "Hello world", "Hello World"]
    assert [S.string_trim("  x  ", m) for m in ("Both", "Left", "Right")] == ["x", "x  ", "  x"]
    assert S.string_replace("a-b-c", "-", "+") == "a+b+c" and S.string_replace("abc", "", "-") == "-a-b-c-"
    assert S.string_contains("Hello", "hell", False) and not S.string_contains("Hello", "hell", True)
    assert S.string_compare("Hello", "he", "Starts With", False)
    assert not S.string_compare("Hello", "he", "Starts With", True)
    assert S.string_compare("Hello", "LO", "Ends With", False) and S.string_compare("a", "a", "Equal", True)


def test_regex_nodes():
    assert S.regex_match("Cat", "^cat$", True, False, False)
    assert not S.regex_match("Cat", "^cat$", False, False, False)
    assert S.regex_match("a\nb", "^b", False, True, False) and not S.regex_match("a\nb", "a.b", False, False, False)
    assert S.regex_match("a\nb", "a.b", False, False, True)
    text = "w=512 h=768 w=1024"
    assert S.regex_extract(text, r"w=(\d+)", "First Match", True, False, False, 1) == "w=512"
    assert S.regex_extract(text, r"w=\d+", "All Matches", True, False, False, 1) == "w=512\nw=1024"
    # with groups, ComfyUI lists each match's first group
    assert S.regex_extract(text, r"(w)=(\d+)", "All Matches", True, False, False, 1) == "w\nw"
    assert S.regex_extract(text, r"w=(\d+)", "First Group", True, False, False, 1) == "512"
    assert S.regex_extract(text, r"w=(\d+)", "All Groups", True, False, False, 1) == "512\n1024"
    assert S.regex_extract(text, r"w=(\d+)", "First Group", True, False, False, 5) == ""
    assert S.regex_extract(text, r"z", "First Match", True, False, False, 1) == ""
    assert S.regex_replace("a1b22", r"\d+", "#", True, False, False, 0) == "a#b#"
    assert S.regex_replace("a1b22", r"\d+", "#", True, False, False, 1) == "a#b22"
    assert S.regex_replace("w=512", r"w=(\d+)", r"width \1", True, False, False, 0) == "width 512"
    assert S.regex_replace("A a", "a", "b") == "b b"  # the optional flags default to case-insensitive


def test_bad_patterns_are_reported_against_their_input():
    with pytest.raises(ValueError, match=r"regex_pattern: invalid regular expression '\(unclosed'"):
        S.regex_match("x", "(unclosed", True, False, False)
    with pytest.raises(ValueError, match=r"replace: invalid group reference"):
        S.regex_replace("x", "x", r"\3", True, False, False, 0)

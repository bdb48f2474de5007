"""String nodes (ComfyUI's comfy_extras/nodes_string.py): concatenation, slicing, case, trimming,
search and regular expressions. A bad pattern is reported against its input, not as a traceback."""
from __future__ import annotations

import re
from typing import Annotated

from engine.inputs import Boolean, Combo, Int, String, StringSpec
from engine.node import node

CATEGORY = "utils/string"


def _text(multiline: bool = True, default: str = "") -> StringSpec:
    return String(default, multiline=multiline)


@node("StringConcatenate", category=CATEGORY, display_name="Concatenate")
def string_concatenate(string_a: Annotated[str, _text()], string_b: Annotated[str, _text()],
                       delimiter: Annotated[str, String("", multiline=False)]) -> str:
    return delimiter.join((string_a, string_b))


@node("StringSubstring", category=CATEGORY, display_name="Substring")
def string_substring(string: Annotated[str, _text()], start: Annotated[int, Int(0)],
                     end: Annotated[int, Int(0)]) -> str:
    """Python slicing: negative positions count from the end."""
    return string[start:end]


@node("StringLength", category=CATEGORY, display_name="Length", output_names=["length"])
def string_length(string: Annotated[str, _text()]) -> int:
    return len(string)


@node("CaseConverter", category=CATEGORY, display_name="Case Converter")
def case_converter(string: Annotated[str, _text()],
                   mode: Annotated[str, Combo(["UPPERCASE", "lowercase", "Capitalize", "Title Case"])]) -> str:
    return {"UPPERCASE": str.upper, "lowercase": str.lower, "Capitalize": str.capitalize,
            "Title Case": str.title}[mode](string)


@node("StringTrim", category=CATEGORY, display_name="Trim")
def string_trim(string: Annotated[str, _text()], mode: Annotated[str, Combo(["Both", "Left", "Right"])]) -> str:
    return {"Both": str.strip, "Left": str.lstrip, "Right": str.rstrip}[mode](string)


@node("StringReplace", category=CATEGORY, display_name="Replace")
def string_replace(string: Annotated[str, _text()], find: Annotated[str, _text()],
                   replace: Annotated[str, _text()]) -> str:
    return string.replace(find, replace)


@node("StringContains", category=CATEGORY, display_name="Contains", output_names=["contains"])
def string_contains(string: Annotated[str, _text()], substring: Annotated[str, _text()],
                    case_sensitive: Annotated[bool, Boolean(True)]) -> bool:
    if case_sensitive:
        return substring in string
    return substring.lower() in string.lower()


@node("StringCompare", category=CATEGORY, display_name="Compare")
def string_compare(string_a: Annotated[str, _text()], string_b: Annotated[str, _text()],
                   mode: Annotated[str, Combo(["Starts With", "Ends With", "Equal"])],
                   case_sensitive: Annotated[bool, Boolean(True)]) -> bool:
    if not case_sensitive:
        string_a, string_b = string_a.lower(), string_b.lower()
    if mode == "Starts With":
        return string_a.startswith(string_b)
    if mode == "Ends With":
        return string_a.endswith(string_b)
    return string_a == string_b


def _compile(pattern: str, case_insensitive: bool, multiline: bool, dotall: bool) -> re.Pattern:
    flags = (re.IGNORECASE if case_insensitive else 0) | (re.MULTILINE if multiline else 0) | (
        re.DOTALL if dotall else 0)
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"regex_pattern: invalid regular expression {pattern!r}: {exc}") from None




@node("RegexMatch", category=CATEGORY, display_name="Regex Match", output_names=["matches"])
def regex_match(string: Annotated[str, _text()], regex_pattern: Annotated[str, _text()],
                case_insensitive: Annotated[bool, Boolean(True)], multiline: Annotated[bool, Boolean(False)],
                dotall: Annotated[bool, Boolean(False)]) -> bool:
    """True when the pattern matches anywhere in the string."""
    return _compile(regex_pattern, case_insensitive, multiline, dotall).search(string) is not None


@node("RegexExtract", category=CATEGORY, display_name="Regex Extract")
def regex_extract(string: Annotated[str, _text()], regex_pattern: Annotated[str, _text()],
                  mode: Annotated[str, Combo(["First Match", "All Matches", "First Group", "All Groups"])],
                  case_insensitive: Annotated[bool, Boolean(True)], multiline: Annotated[bool, Boolean(False)],
                  dotall: Annotated[bool, Boolean(False)],
                  group_index: Annotated[int, Int(1, min=0, max=100)]) -> str:
    """The first match, all matches (one per line; with groups in the pattern, each match's first group),
    or group `group_index` of the first / every match; empty when nothing matches."""
    rx = _compile(regex_pattern, case_insensitive, multiline, dotall)
    if mode == "First Match":
        m = rx.search(string)
        return m.group(0) if m else ""
    if mode == "All Matches":
        return "\n".join(m.group(1 if rx.groups else 0) or "" for m in rx.finditer(string))
    if mode == "First Group":
        m = rx.search(string)
        return (m.group(group_index) or "") if m and rx.groups >= group_index else ""
    if not rx.groups or rx.groups < group_index:
        return ""
    return "\n".join(m.group(group_index) or "" for m in rx.finditer(string))


@node("RegexReplace", category=CATEGORY, display_name="Regex Replace")
def regex_replace(string: Annotated[str, _text()], regex_pattern: Annotated[str, _text()],
                  replace: Annotated[str, _text()],
                  case_insensitive: Annotated[bool, Boolean(True)] | None = None,
                  multiline: Annotated[bool, Boolean(False)] | None = None,
                  dotall: Annotated[bool, Boolean(False)] | None = None,
                  count: Annotated[int, Int(0, min=0, max=100)] | None = None) -> str:
    """Replaces matches (`count` 0 = all); the replacement may use \\1 or \\g<name> group references."""
    rx = _compile(regex_pattern, True if case_insensitive is None else case_insensitive, bool(multiline),
                  bool(dotall))
    try:
        return rx.sub(replace, string, count=count or 0)
    except (re.error, IndexError) as exc:
        raise ValueError(f"replace: invalid group reference in {replace!r}: {exc}") from None

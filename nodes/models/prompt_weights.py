"""ComfyUI prompt-weighting syntax, parsed into weighted text segments.

Rules (they match ComfyUI's tokenizer so a prompt weighs the same in both tools):
- `(text)` multiplies the weight by 1.1 per nesting level;
- `(text:1.3)` sets the weight to 1.3 (absolute, not relative to the enclosing level); the number
  follows the *last* colon inside the parentheses; if it does not parse, the colon stays text
  and only the 1.1 factor applies;
- `\\(` and `\\)` are literal parentheses (the backslash is dropped);
- unbalanced parentheses never raise: a group that is not both opened and closed is literal text,
  with ComfyUI's quirks (a stray `)` makes the rest of the level literal);
- `embedding:NAME` at the start of the prompt or after a space/newline references a
  textual-inversion file; NAME runs to the next whitespace, trailing commas are text again.

Pure functions, no torch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

EMBEDDING_PREFIX = "embedding:"
# Deeper nesting has no use (1.1**50 is a weight of 117) and each level is parsed again: 5,000 `(` would
# recurse past Python's limit. Prompts nesting deeper are refused with this message.
MAX_NESTING = 50


class PromptTooDeep(ValueError):
    """The prompt nests parentheses deeper than MAX_NESTING."""

# Escaped parentheses are swapped for private-use characters while the groups are parsed,
# then restored as plain parentheses.
_ESC_OPEN = "\ue000"
_ESC_CLOSE = "\ue001"


@dataclass(frozen=True)
class PromptSegment:
    """A piece of prompt text with its weight; `embedding` is set for an `embedding:NAME` reference
    (then `text` is the original `embedding:NAME` spelling)."""

    text: str
    weight: float
    embedding: str | None = None

    @property
    def is_embedding(self) -> bool:
        return self.embedding is not None


def _escape(text: str) -> str:
    return text.replace("\\(", _ESC_OPEN).replace("\\)", _ESC_CLOSE)


def _unescape(text: str) -> str:
    return text.replace(_ESC_OPEN, "(").replace(_ESC_CLOSE, ")")


def _split_groups(text: str) -> list[str]:
    """Split one level into plain runs and top-level `( ... )` groups (parentheses kept)."""
    pieces: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    pieces.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                pieces.append(current + ")")
                current = ""
            else:
                # Either nested, or a stray close (depth < 0): both stay in the current run.
                current += char
        else:
            current += char
    if current:
        pieces.append(current)
    return pieces


def _explicit_weight(inner: str) -> tuple[str, float] | None:
    colon = inner.rfind(":")
    if colon <= 0:
        return None
    try:
        weight = float(inner[colon + 1 :])
    except ValueError:
        return None
    if not math.isfinite(weight):
        # ComfyUI would feed NaN/inf into the encoder; treating it as text is the safe reading.
        return None
    return inner[:colon], weight


def _weigh(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for piece in _split_groups(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner = piece[1:-1]
            inner_weight = weight * 1.1
            explicit = _explicit_weight(inner)
            if explicit is not None:
                inner, inner_weight = explicit
            out.extend(_weigh(inner, inner_weight))
        else:
            out.append((piece, weight))
    return out


def nesting_depth(text: str) -> int:
    """The deepest level of unescaped parentheses (one linear scan)."""
    depth = deepest = 0
    for char in _escape(text):
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")" and depth > 0:
            depth -= 1
    return deepest


def check_nesting(text: str) -> str | None:
    """An error message when `text` nests too deeply to parse, else None."""
    depth = nesting_depth(text)
    if depth > MAX_NESTING:
        return (f"the prompt nests parentheses {depth} levels deep; at most {MAX_NESTING} are allowed "
                f"(write (word:1.5) for a strong weight)")
    return None


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """`text` -> [(segment, weight)], escaped parentheses restored; empty segments dropped. Raises
    PromptTooDeep past MAX_NESTING levels."""
    problem = check_nesting(text)
    if problem:
        raise PromptTooDeep(problem)
    return [(_unescape(seg), w) for seg, w in _weigh(_escape(text), 1.0) if seg]


_EMBEDDING_RE = re.compile(r"(?:(?<=^)|(?<=[ \n]))" + re.escape(EMBEDDING_PREFIX) + r"(\S+)")


def split_embeddings(text: str, weight: float, prefix: str = EMBEDDING_PREFIX) -> list[PromptSegment]:
    """Split one weighted segment at `embedding:NAME` references."""
    pattern = _EMBEDDING_RE if prefix == EMBEDDING_PREFIX else re.compile(
        r"(?:(?<=^)|(?<=[ \n]))" + re.escape(prefix) + r"(\S+)"
    )
    out: list[PromptSegment] = []
    pos = 0
    for match in pattern.finditer(text):
        raw_name = match.group(1)
        name = raw_name.rstrip(",")
        if not name:
            continue  # "embedding:," is just text
        if match.start() > pos:
            out.append(PromptSegment(text[pos : match.start()], weight))
        out.append(PromptSegment(prefix + name, weight, embedding=name))
        pos = match.start(1) + len(name)
    if pos < len(text):
        out.append(PromptSegment(text[pos:], weight))
    return out


def parse_prompt(text: str, prefix: str = EMBEDDING_PREFIX) -> list[PromptSegment]:
    """Full parse: weights, then embedding references inside each weighted segment."""
    segments: list[PromptSegment] = []
    for seg, weight in parse_prompt_weights(text):
        segments.extend(split_embeddings(seg, weight, prefix))
    return segments


def embedding_names(text: str) -> list[str]:
    """Names of the embeddings a prompt references, in order (duplicates kept once)."""
    seen: dict[str, None] = {}
    for seg in parse_prompt(text):
        if seg.embedding is not None:
            seen.setdefault(seg.embedding, None)
    return list(seen)

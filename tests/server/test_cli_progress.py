"""`sdflow run` progress: a tqdm bar per stepping node (rate, ETA) on a terminal, node lines only when piped."""
from __future__ import annotations

import io

from engine.events import Event
from server.cli import ProgressPrinter


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


PROMPT = {"3": {"class_type": "KSampler"}, "8": {"class_type": "VAEDecode", "_meta": {"title": "Decode"}}}


def feed(printer: ProgressPrinter) -> None:
    printer(Event("executing", {"node": "3"}))
    for i in range(1, 11):
        printer(Event("progress", {"node": "3", "value": i, "max": 10}))
    printer(Event("executing", {"node": "8"}))
    for i in range(1, 5):
        printer(Event("progress", {"node": "8", "value": i, "max": 4}))
    printer(Event("execution_success", {}))


def test_bars_on_a_terminal():
    out = Terminal()
    feed(ProgressPrinter(PROMPT, out))
    text = out.getvalue()
    assert "> 3 KSampler" in text and "> 8 Decode" in text
    assert "10/10" in text and "4/4" in text and "it/s" in text
    assert "3 KSampler" in text.split("> 8 Decode")[0].split("> 3 KSampler")[1]   # the bar names its node


def test_quiet_when_piped():
    out = io.StringIO()
    feed(ProgressPrinter(PROMPT, out))
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0] == "> 3 KSampler" and lines[1].startswith("  3 KSampler: 10/10 in ")
    assert lines[2] == "> 8 Decode" and lines[3].startswith("  8 Decode: 4/4 in ") and len(lines) == 4
    assert "\r" not in text

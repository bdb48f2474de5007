"""Execution events. `type` and `data` are exactly ComfyUI's websocket event names and keys, so the server
forwards them unchanged; `image` carries a preview (a PIL image) for type "preview"."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Event:
    type: str
    data: dict
    image: Any = None


Emit = Callable[[Event], None]


def now_ms() -> int:
    return int(time.time() * 1000)


def no_emit(event: Event) -> None:
    return None


no_emit.wants_preview = lambda: False  # type: ignore[attr-defined]  # nobody listens: no step previews

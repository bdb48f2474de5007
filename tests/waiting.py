"""Waiting on state, never on time: poll a condition until it holds, failing after a generous deadline.

The poll interval only bounds how often the condition is read; a test that passes never depends on it."""
from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.01,
               what: str = "the condition") -> T:
    """`condition()`'s first truthy value; AssertionError naming `what` when the deadline passes first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what} (last value {value!r})")
        time.sleep(interval)


async def until(condition: Callable[[], Any | Awaitable[Any]], *, timeout: float = 30.0, interval: float = 0.05,
                what: str = "the condition") -> Any:
    """The async form: `condition` may be a coroutine function (e.g. one that asks the server)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what} (last value {value!r})")
        await asyncio.sleep(interval)

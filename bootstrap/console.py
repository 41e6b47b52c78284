"""Windows console modes while FluxDeck runs: VT processing on (the progress lines' `\\r\\x1b[K` redraw instead of
printing as litter on Windows 10's conhost) and QuickEdit off (a click would otherwise freeze pip or a 20 GB
download until a key is pressed); both restored on exit. The decisions are plain functions on mode bits; the
ctypes calls sit behind a small interface so tests can stand in for Windows. Standard library only."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

STD_INPUT_HANDLE = -10
STD_OUTPUT_HANDLE = -11
ENABLE_PROCESSED_OUTPUT = 0x0001
ENABLE_VIRTUAL_TERMINAL_PROCESSING = 0x0004
ENABLE_QUICK_EDIT_MODE = 0x0040
ENABLE_EXTENDED_FLAGS = 0x0080  # must be set for a change of QuickEdit to take


def output_mode(mode: int) -> int:
    return mode | ENABLE_PROCESSED_OUTPUT | ENABLE_VIRTUAL_TERMINAL_PROCESSING


def input_mode(mode: int) -> int:
    return (mode | ENABLE_EXTENDED_FLAGS) & ~ENABLE_QUICK_EDIT_MODE


class ConsoleApi(Protocol):
    def get_mode(self, which: int) -> int | None: ...  # None: not a console (redirected, or not Windows)

    def set_mode(self, which: int, mode: int) -> bool: ...


class WindowsConsole:
    """GetConsoleMode / SetConsoleMode on the standard handles."""

    def __init__(self) -> None:
        import ctypes

        self._ctypes = ctypes
        self._kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        self._kernel32.GetStdHandle.restype = ctypes.c_void_p

    def _handle(self, which: int):
        return self._ctypes.c_void_p(self._kernel32.GetStdHandle(which))

    def get_mode(self, which: int) -> int | None:
        mode = self._ctypes.c_uint32()
        if not self._kernel32.GetConsoleMode(self._handle(which), self._ctypes.byref(mode)):
            return None
        return mode.value

    def set_mode(self, which: int, mode: int) -> bool:
        return bool(self._kernel32.SetConsoleMode(self._handle(which), self._ctypes.c_uint32(mode)))


@contextmanager
def console_modes(api: ConsoleApi | None = None, windows: bool = sys.platform == "win32") -> Iterator[None]:
    """VT on and QuickEdit off for the duration; the modes found are put back however the block ends."""
    if api is None:
        if not windows:
            yield
            return
        try:
            api = WindowsConsole()
        except (OSError, AttributeError):
            yield
            return
    saved: list[tuple[int, int]] = []
    for which, change in ((STD_OUTPUT_HANDLE, output_mode), (STD_INPUT_HANDLE, input_mode)):
        mode = api.get_mode(which)
        if mode is not None and change(mode) != mode and api.set_mode(which, change(mode)):
            saved.append((which, mode))
    try:
        yield
    finally:
        for which, mode in reversed(saved):
            api.set_mode(which, mode)

"""Windows console modes: VT on and QuickEdit off while FluxDeck runs, put back afterwards (a stand-in console)."""

from __future__ import annotations

import pytest

from bootstrap import console as c


class FakeConsole:
    def __init__(self, out: int | None, inp: int | None) -> None:
        self.modes = {c.STD_OUTPUT_HANDLE: out, c.STD_INPUT_HANDLE: inp}
        self.calls: list[tuple[int, int]] = []

    def get_mode(self, which):
        return self.modes[which]

    def set_mode(self, which, mode):
        self.calls.append((which, mode))
        self.modes[which] = mode
        return True


CONHOST_OUT = 0x0003  # processed output + wrap at end of line, no VT
CONHOST_IN = 0x01F7  # QuickEdit on, as Windows 10 starts a console


def test_mode_bits():
    assert c.output_mode(CONHOST_OUT) == CONHOST_OUT | 0x0004
    assert c.input_mode(CONHOST_IN) & c.ENABLE_QUICK_EDIT_MODE == 0
    assert c.input_mode(CONHOST_IN) & c.ENABLE_EXTENDED_FLAGS
    assert c.input_mode(CONHOST_IN) | c.ENABLE_QUICK_EDIT_MODE == CONHOST_IN  # nothing else changes


def test_modes_are_changed_for_the_run_and_restored_even_on_error():
    fake = FakeConsole(CONHOST_OUT, CONHOST_IN)
    with pytest.raises(RuntimeError):
        with c.console_modes(fake):
            assert fake.modes[c.STD_OUTPUT_HANDLE] & c.ENABLE_VIRTUAL_TERMINAL_PROCESSING
            assert not fake.modes[c.STD_INPUT_HANDLE] & c.ENABLE_QUICK_EDIT_MODE
            raise RuntimeError("the TUI crashed")
    assert fake.modes == {c.STD_OUTPUT_HANDLE: CONHOST_OUT, c.STD_INPUT_HANDLE: CONHOST_IN}


def test_redirected_streams_and_other_systems_are_left_alone():
    fake = FakeConsole(None, None)  # output piped (the TUI's models screen runs the bootstrap so)
    with c.console_modes(fake):
        pass
    assert fake.calls == []
    with c.console_modes(windows=False):
        pass

"""Input that ends, or Ctrl+C, at a wizard prompt is one sentence and a clean exit, never a traceback (issue 17,
item 4): through the real entry point with stdin at EOF, closed, or a terminal that gets Ctrl+D / Ctrl+C."""

from __future__ import annotations

import builtins
import getpass
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bootstrap import cli, wizard
from bootstrap.errors import InputEnded

ROOT = Path(__file__).resolve().parent.parent
SENTENCE = "No choice made; run the wizard again with `"
STOPPED = "Stopped at the question, no choice made; run the wizard again with `"


def raising(exc: BaseException):
    def read(*args, **kwargs):
        raise exc

    return read


@pytest.mark.parametrize("exc", [EOFError(), OSError(5, "Input/output error")])
def test_an_ended_input_is_input_ended(monkeypatch, capsys, exc):
    monkeypatch.setattr(builtins, "input", raising(exc))
    with pytest.raises(InputEnded) as caught:
        wizard.TerminalIO().ask("Which one?", "2")
    assert not caught.value.interrupted and capsys.readouterr().out == "\n"  # the prompt's line is ended


def test_ctrl_c_at_a_prompt_is_input_ended_interrupted(monkeypatch):
    monkeypatch.setattr(builtins, "input", raising(KeyboardInterrupt()))
    with pytest.raises(InputEnded) as caught:
        wizard.TerminalIO().ask("Which one?")
    assert caught.value.interrupted


def test_the_token_prompt_too(monkeypatch):
    monkeypatch.setattr(getpass, "getpass", raising(EOFError()))
    with pytest.raises(InputEnded):
        wizard.TerminalIO().secret("Paste the token")
    monkeypatch.setattr(getpass, "getpass", lambda prompt: "\x1a")  # Windows: Ctrl+Z then Enter
    with pytest.raises(InputEnded):
        wizard.TerminalIO().secret("Paste the token")
    monkeypatch.setattr(getpass, "getpass", lambda prompt: "  hf_abc \n")
    assert wizard.TerminalIO().secret("Paste the token") == "hf_abc"


def test_no_stdin_at_all(monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(InputEnded):
        wizard.TerminalIO().ask("Which one?")


def test_answers_still_work(monkeypatch):
    answers = iter(["", " 3 "])
    monkeypatch.setattr(builtins, "input", lambda prompt: next(answers))
    assert wizard.TerminalIO().ask("Which one?", "2") == "2"
    assert wizard.TerminalIO().ask("Which one?", "2") == "3"


@pytest.mark.parametrize("interrupted, code, start", [(False, 2, SENTENCE), (True, 130, STOPPED)])
def test_the_cli_says_one_sentence_with_the_command(monkeypatch, capsys, interrupted, code, start):
    def wizard_that_gets_no_answer(args):
        raise InputEnded(interrupted)

    monkeypatch.setitem(cli.COMMANDS, "wizard", wizard_that_gets_no_answer)
    assert cli.main(["wizard"]) == code
    err = capsys.readouterr().err
    assert err.startswith(start) and err.count("\n") == 1
    assert "-m bootstrap wizard` (or start run_gpu or run_cpu again) when ready." in err


# ---- through the real entry point ----


def wizard_argv(tmp_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bootstrap",
        "wizard",
        "--models-dir",
        str(tmp_path / "models"),
        "--config",
        str(tmp_path / "config.toml"),
    ]


def child_env(tmp_path: Path) -> dict[str, str]:
    # a home of its own: no ComfyUI/Forge folder is found, so the first question is asked at once
    return dict(os.environ, HOME=str(tmp_path), USERPROFILE=str(tmp_path), PYTHONPATH=str(ROOT))


@pytest.mark.parametrize("stdin", ["devnull", "closed-pipe", "no-fd"])
def test_the_wizard_with_its_input_at_an_end(tmp_path, stdin):
    kwargs: dict = {}
    if stdin == "devnull":
        kwargs["stdin"] = subprocess.DEVNULL
    elif stdin == "closed-pipe":
        kwargs["input"] = ""  # a pipe closed before anything was written
    else:
        if sys.platform == "win32":
            pytest.skip("closing fd 0 is a POSIX test")
        kwargs["preexec_fn"] = lambda: os.close(0)
    done = subprocess.run(
        wizard_argv(tmp_path),
        cwd=tmp_path,
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(SENTENCE) and lines[-1].endswith("when ready.")
    assert not (tmp_path / "config.toml").exists()  # nothing was chosen, nothing saved


def waiting_for_a_key(pid: int) -> None:
    """Until the wizard sits in its read of the terminal: a Ctrl+C that lands between the prompt being printed
    and the read starting is handled, but the read then waits on (no person types that fast)."""
    wchan = Path(f"/proc/{pid}/wchan")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not wchan.exists():
            time.sleep(1.0)
            return
        if wchan.read_text() in ("wait_woken", "n_tty_read"):
            return
        time.sleep(0.05)


@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal is POSIX")
@pytest.mark.parametrize("key, code, start", [(b"\x04", 2, SENTENCE), (b"\x03", 130, STOPPED)])
def test_ctrl_d_and_ctrl_c_typed_at_the_prompt(tmp_path, key, code, start):
    """A real terminal: the wizard waits at its first question, the user presses Ctrl+D (or Ctrl+C)."""
    import fcntl
    import pty
    import termios

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        wizard_argv(tmp_path),
        cwd=tmp_path,
        env=child_env(tmp_path),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # the pty's Ctrl+C is the wizard's SIGINT
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 60
    try:
        while b"(Enter to skip):" not in seen and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 4096)
        assert b"(Enter to skip):" in seen, seen
        waiting_for_a_key(proc.pid)
        os.write(leader, key)
        code_seen = proc.wait(timeout=30)
        while select.select([leader], [], [], 0.2)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the other end closed (Linux reports EIO)
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    text = seen.decode("utf-8", "replace")
    assert code_seen == code and "Traceback" not in text
    last = [line for line in text.replace("\r", "").splitlines() if line.strip()][-1]
    assert last.startswith(start) and last.endswith("when ready.")

"""Data from outside (a manifest, a server's answer, an archive) made safe to use: names that mean one file on
every OS, paths confined to their folder, text that cannot drive the terminal; and secrets written whole and
private."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path, PurePath

from bootstrap.errors import BootstrapError

# Windows refuses these characters in a name (':' would also open an NTFS alternate data stream).
_WINDOWS_BAD_CHARS = set('<>:"/\\|?*')
# Device names Windows keeps in every folder, with any extension ("nul.safetensors" is the null device too).
_WINDOWS_DEVICES = re.compile(r"^(con|prn|aux|nul|conin\$|conout\$|(com|lpt)[0-9¹²³])$", re.IGNORECASE)
MAX_NAME = 255


def printable(text: object) -> str:
    """The text with every control or invisible character written as an escape (\\x1b, \\u202e, ...): what a
    server or a file says reaches the terminal as letters, never as a command to it."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def name_problem(name: str) -> str | None:
    """Why `name` is not one plain file name that means the same file on Windows, Linux and macOS (or None)."""
    if name in ("", ".", ".."):
        return "is not a file name"
    if len(name) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    if any(not ch.isprintable() for ch in name):
        return "holds control characters"
    bad = sorted(_WINDOWS_BAD_CHARS.intersection(name))
    if bad:
        return f"holds {' '.join(bad)}, which Windows does not allow in a name"
    if name[-1] in ". ":
        return "ends in a dot or a space, which Windows drops"
    if _WINDOWS_DEVICES.match(name.split(".", 1)[0].rstrip(" ")):
        return "is a device name on Windows"
    return None


def relative_parts(text: str, what: str) -> tuple[str, ...]:
    """A relative path written with '/' (as in a manifest or a URL) split into plain names; anything that could
    leave its folder on some OS (an absolute path, a drive letter, a UNC or \\\\?\\ prefix, a backslash,
    '..') is refused in one sentence."""
    if not isinstance(text, str) or not text:
        raise BootstrapError(f"{what} is empty: give a relative path such as folder/file.safetensors.")
    parts = tuple(text.split("/"))
    for part in parts:
        problem = name_problem(part)
        if problem is not None:
            raise BootstrapError(
                f"{what} '{printable(text)}' is not a safe relative path: '{printable(part)}' {problem}."
            )
    return parts


def confine(base: PurePath, relative: str, what: str) -> PurePath:
    """`base / relative`, refused unless it stays inside `base` under both Windows and POSIX rules.

    Works on pure paths too (PureWindowsPath tests the Windows rules on any machine). The check is lexical and
    done after normalising: every part is a plain name (relative_parts), and the joined path still starts
    with all of base's parts; a symlink the user made inside the folder is the user's choice and is kept."""
    parts = relative_parts(relative, what)
    joined = base.joinpath(*parts)
    inside = joined.parts[len(base.parts) :]
    if joined.parts[: len(base.parts)] != base.parts or len(inside) != len(parts) or ".." in inside:
        raise BootstrapError(f"{what} '{printable(relative)}' would leave {base}: it is refused.")
    return joined


def write_private(path: Path, data: bytes) -> None:
    """Write a secret whole or not at all, readable and writable by the owner only: the bytes go to a temporary
    name in the same folder (created 0600), which is renamed over `path` once complete, so a reader sees the
    old file or the whole new one, and an older world-readable file is replaced rather than rewritten. On
    Windows the mode bits do not apply: the file takes the access list of its folder, which in the user's
    profile (the default place of the token) admits the user, SYSTEM and administrators only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

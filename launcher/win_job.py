"""Windows: the engine child in a Job Object with KILL_ON_JOB_CLOSE, so that it dies with the TUI however the
TUI ends (a closed console window kills the TUI without running any of its code). The job's handle lives as
long as the TUI process; when Windows closes it, every process in the job is ended. ctypes only; elsewhere
nothing is done (engine/parent_watch.py covers every OS)."""

from __future__ import annotations

import ctypes
import sys
from ctypes import wintypes

JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x00002000
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9


class IoCounters(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_ulonglong)
        for name in (
            "ReadOperationCount",
            "WriteOperationCount",
            "OtherOperationCount",
            "ReadTransferCount",
            "WriteTransferCount",
            "OtherTransferCount",
        )
    ]


DWORD = (
    ctypes.c_uint32
)  # wintypes.DWORD is c_ulong, 8 bytes off Windows: the layout must not change with the OS


class BasicLimitInformation(ctypes.Structure):
    _fields_ = [
        ("PerProcessUserTimeLimit", ctypes.c_longlong),
        ("PerJobUserTimeLimit", ctypes.c_longlong),
        ("LimitFlags", DWORD),
        ("MinimumWorkingSetSize", ctypes.c_size_t),
        ("MaximumWorkingSetSize", ctypes.c_size_t),
        ("ActiveProcessLimit", DWORD),
        ("Affinity", ctypes.c_size_t),
        ("PriorityClass", DWORD),
        ("SchedulingClass", DWORD),
    ]


class ExtendedLimitInformation(ctypes.Structure):
    _fields_ = [
        ("BasicLimitInformation", BasicLimitInformation),
        ("IoInfo", IoCounters),
        ("ProcessMemoryLimit", ctypes.c_size_t),
        ("JobMemoryLimit", ctypes.c_size_t),
        ("PeakProcessMemoryUsed", ctypes.c_size_t),
        ("PeakJobMemoryUsed", ctypes.c_size_t),
    ]


def kill_on_close_limits() -> ExtendedLimitInformation:
    """What SetInformationJobObject gets: only KILL_ON_JOB_CLOSE, no other limit."""
    info = ExtendedLimitInformation()
    info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    return info


class KillOnCloseJob:
    """One job per engine process: `assign(popen)` after it started. Off Windows, or when Windows refuses (an
    old system that does not nest jobs), `handle` is None and assign() returns False: the parent watch remains."""

    def __init__(self, windows: bool = sys.platform == "win32") -> None:
        self.handle: int | None = None
        if not windows:
            return
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        kernel32.CreateJobObjectW.restype = wintypes.HANDLE
        handle = kernel32.CreateJobObjectW(None, None)
        if not handle:
            return
        info = kill_on_close_limits()
        if kernel32.SetInformationJobObject(
            wintypes.HANDLE(handle),
            JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS,
            ctypes.byref(info),
            ctypes.sizeof(info),
        ):
            self.handle = handle
            self._kernel32 = kernel32
        else:
            kernel32.CloseHandle(wintypes.HANDLE(handle))

    def assign(self, process) -> bool:
        """Put a started subprocess.Popen in the job."""
        process_handle = getattr(process, "_handle", None)
        if self.handle is None or process_handle is None:
            return False
        return bool(
            self._kernel32.AssignProcessToJobObject(
                wintypes.HANDLE(self.handle), wintypes.HANDLE(int(process_handle))
            )
        )

"""Starting, watching and stopping the control plane's processes.

Each process is recorded as (name, PID, kernel start time, log file). The start time, read from
``/proc/<pid>/stat``, makes a recorded PID safe to signal later, even from another Python process
(``cluster-down``) after the original parent has gone: a PID the kernel has since given to
something else never matches, so only the process this harness started is ever signalled.

Processes started for a test session die with the session (``PR_SET_PDEATHSIG``); processes started
with ``detach=True`` get their own session so they outlive the command that started them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 0.2


class StartupError(RuntimeError):
    """A component did not come up; the message names it, its URL and the tail of its log."""


@dataclass(frozen=True)
class ProcessRecord:
    """A started process, as persisted in the cluster's state file."""

    name: str
    pid: int
    start_ticks: int
    log: Path

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["log"] = str(self.log)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessRecord:
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            start_ticks=int(data["start_ticks"]),
            log=Path(data["log"]),
        )


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now.

    All sockets stay open until every port is picked, so the kernel cannot hand out one twice.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start(name: str, argv: Sequence[str], log: Path, *, detach: bool) -> ProcessRecord:
    """Start ``argv`` with stdout and stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            preexec_fn=None if detach else _die_with_parent,
        )
    ticks = _start_ticks(proc.pid)
    return ProcessRecord(name=name, pid=proc.pid, start_ticks=ticks or 0, log=log)


def is_running(record: ProcessRecord) -> bool:
    """True while the recorded process (not merely its PID) is alive; reaps it if it is our child."""
    state = _stat(record.pid)
    if state is None or int(state[19]) != record.start_ticks:
        return False
    if state[0] == "Z":
        _reap(record.pid)
        return False
    return True


def stop(record: ProcessRecord, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; no-op if it is already gone."""
    if not is_running(record):
        return
    _signal(record.pid, signal.SIGTERM)
    if _wait_gone(record, timeout):
        return
    _signal(record.pid, signal.SIGKILL)
    _wait_gone(record, 5.0)


def log_tail(log: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:])


def wait_ready(record: ProcessRecord, url: str, check: Callable[[], str | None], timeout: float) -> None:
    """Poll ``check`` (None means ready, a string says what is still wrong) until ready.

    Fails early when the process exits, and after ``timeout`` seconds otherwise, with the
    component, its URL, the last problem seen and the tail of its log in the message.
    """
    deadline = time.monotonic() + timeout
    problem = "not checked yet"
    while True:
        if not is_running(record):
            raise StartupError(_failure(record, url, "exited before it became ready"))
        problem = check() or ""
        if not problem:
            return
        if time.monotonic() > deadline:
            raise StartupError(_failure(record, url, f"not ready after {timeout:.0f}s ({problem})"))
        time.sleep(_POLL_SECONDS)


def _failure(record: ProcessRecord, url: str, what: str) -> str:
    return (
        f"{record.name} (pid {record.pid}) {what}; health URL {url}\n"
        f"--- last lines of {record.log} ---\n{log_tail(record.log)}"
    )


def _wait_gone(record: ProcessRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_running(record):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state letter)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _start_ticks(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _die_with_parent() -> None:
    """Runs in the child before exec: deliver SIGTERM to it when the harness process dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

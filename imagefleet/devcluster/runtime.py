"""The process kubelet's container runtime: starting, watching and signalling local processes.

Every container process

* starts from one long-lived spawner thread with ``PR_SET_PDEATHSIG`` = SIGKILL: the signal fires
  when the *thread* that forked the child ends, so forking from one thread that lives as long as
  the kubelet ties every container to the kubelet itself, not to a pod worker;
* runs in its own process group, so SIGTERM and SIGKILL reach whatever it started too; when the
  main process exits, the rest of its group is killed (as a container's PID 1 exiting ends the
  container);
* appends stdout and stderr to its log file.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_prctl: Any = None
if sys.platform.startswith("linux"):
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork


class ContainerProcess:
    """One running container process; ``exited`` is set (and ``on_exit`` called) once it is reaped."""

    def __init__(self, popen: subprocess.Popen[bytes], on_exit: Callable[[int], None]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.returncode: int | None = None
        self.exited = threading.Event()
        self._on_exit = on_exit
        threading.Thread(target=self._watch, name=f"wait-{self.pid}", daemon=True).start()

    def _watch(self) -> None:
        # Wait without reaping, so the PID (and the group ID) cannot be reused while the rest of
        # the group is killed; then reap.
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.returncode = self.popen.wait()
        self.exited.set()
        try:
            self._on_exit(self.returncode)
        except Exception:
            log.exception("exit callback of pid %d failed", self.pid)

    def signal_group(self, signum: int) -> None:
        """Signal the whole process group (no-op once reaped)."""
        if self.exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def wait(self, timeout: float | None = None) -> bool:
        return self.exited.wait(timeout)


def _child_setup(parent: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec: no locks, no imports
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the kubelet died before prctl took effect
            os._exit(137)

    return setup


class Spawner:
    """Forks every container process from one thread that lives as long as the spawner."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = (
            queue.Queue()
        )
        self._thread = threading.Thread(target=self._loop, name="process-spawner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            work, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as err:
                future.set_exception(err)

    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        log_path: Path,
        on_exit: Callable[[int], None],
    ) -> ContainerProcess:
        """Start ``argv``; raises OSError when it cannot be executed."""
        log_path.parent.mkdir(parents=True, exist_ok=True)

        def work() -> ContainerProcess:
            with log_path.open("ab") as out:
                popen = subprocess.Popen(
                    list(argv),
                    env=dict(env),
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    process_group=0,
                    preexec_fn=_child_setup(os.getpid()),
                )
            return ContainerProcess(popen, on_exit)

        future: concurrent.futures.Future[ContainerProcess] = concurrent.futures.Future()
        self._queue.put((work, future))
        return future.result()

    def close(self) -> None:
        """End the spawner thread: every process it started that is still alive gets SIGKILL."""
        self._queue.put(None)
        self._thread.join(timeout=5)

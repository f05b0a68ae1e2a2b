"""The test harness's waits: a pod process that exits is reported at once, not after the timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from imagefleet.testing.servers import GiveUp, PodProcess, wait_until


def test_wait_until_retries_errors_but_not_a_give_up() -> None:
    calls = []

    def flaky() -> bool:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError
        return True

    wait_until(flaky, 5, "flaky", interval=0.01)
    assert len(calls) == 3

    def hopeless() -> bool:
        raise GiveUp("the process exited")

    started = time.monotonic()
    with pytest.raises(GiveUp, match="exited"):
        wait_until(hopeless, 60, "hopeless")
    assert time.monotonic() - started < 5


def test_a_pod_that_exits_at_once_fails_its_wait_with_its_log(tmp_path: Path) -> None:
    pod = PodProcess(["--no-such-flag"], log_dir=tmp_path)
    pod.start()
    started = time.monotonic()
    with pytest.raises(GiveUp, match="pod exited with 2") as info:
        pod.wait_ready(timeout=120)
    assert time.monotonic() - started < 60
    assert "--no-such-flag" in str(info.value)
    assert pod.proc is not None and pod.proc.returncode == 2

"""The operator in the test process, under kopf's own test runner (``kopf.testing.KopfRunner``).

Tests and benchmarks start it against a control plane (``KUBECONFIG``) with settings of their
own and read what it runs through :class:`~imagefleet.operator.handlers.Parts`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kopf.testing import KopfRunner

from imagefleet import settings as settings_mod
from imagefleet.operator.handlers import Parts, build_registry
from imagefleet.settings import OperatorSettings


def operator_settings(**overrides: Any) -> OperatorSettings:
    """Operator settings from defaults and ``overrides`` only (the environment is ignored)."""
    overrides.setdefault("health_port", 0)
    return settings_mod.load(OperatorSettings, {}, env={}, **overrides)


@contextmanager
def running_operator(kubeconfig: Path, settings: OperatorSettings, timeout: float = 60.0) -> Iterator[Parts]:
    """Run the operator until the block ends; raise what it raised, if anything."""
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    registry, parts = build_registry(settings)
    args = ["run", "--standalone"]
    args += [f"--namespace={ns}" for ns in settings.namespaces] or ["--all-namespaces"]
    try:
        with KopfRunner(args, registry=registry, timeout=timeout) as runner:
            deadline = time.monotonic() + timeout
            while parts.controller is None:
                if time.monotonic() > deadline or not runner._thread.is_alive():
                    raise RuntimeError(
                        f"the operator did not start:\n{runner.output if runner._thread.is_alive() else ''}"
                    )
                time.sleep(0.05)
            yield parts
    finally:
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous

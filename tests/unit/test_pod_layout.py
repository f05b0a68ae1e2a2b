"""The scheduler's parts are its own: the rest of the pod goes through the facade."""

from __future__ import annotations

import ast
from pathlib import Path

POD = Path(__file__).resolve().parents[2] / "inference_pod"
PACKAGE = "imagefleet.inference_pod."
# The scheduler (scheduler.py) and the parts behind it; only they may import one another's parts.
SCHEDULER = {"scheduler", "batchstate", "batchloop", "steploop", "delivery", "health", "estimator"}
PARTS = SCHEDULER - {"scheduler"}


def pod_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            names.add(node.module.removeprefix(PACKAGE))
        elif isinstance(node, ast.ImportFrom) and node.module == PACKAGE.rstrip("."):
            names.update(alias.name for alias in node.names)
    return names


def test_no_module_outside_the_scheduler_reaches_into_its_parts() -> None:
    offenders = {
        path.stem: sorted(pod_imports(path) & PARTS)
        for path in POD.glob("*.py")
        if path.stem not in SCHEDULER and pod_imports(path) & PARTS
    }
    assert offenders == {}


def test_the_pure_parts_import_neither_aiohttp_nor_torch() -> None:
    for name in ("batching", "batchstate", "costs", "health", "counters", "phase"):
        source = (POD / f"{name}.py").read_text()
        assert "import torch" not in source and "aiohttp" not in source, name

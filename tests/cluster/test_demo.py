"""`make demo` as a newcomer runs it: one command, then the printed curl line gets an image.

The demo gets a control plane of its own (a state directory of the test's, node indices far from
the session plane's, so pod IPs never clash) and is stopped with `cluster-down`'s command.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

from imagefleet.testing.routers import call

REPO = Path(__file__).resolve().parents[2]


def _devcluster(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_make_demo_ends_with_a_curl_line_that_gets_an_image(tmp_path: Path, bin_dir: Path) -> None:
    state = tmp_path / "demo-cluster"
    try:
        demo = _devcluster(
            "imagefleet.devcluster.demo", "--state-dir", str(state), "--first-node-index", "150", timeout=900
        )
        assert demo.returncode == 0, demo.stderr[-3000:]
        match = re.search(r"curl -s (http://[0-9.]+:\d+)/v1/images/generations", demo.stdout)
        assert match, demo.stdout
        assert "export KUBECONFIG=" in demo.stdout and "make cluster-down" in demo.stdout
        reply = call(
            "POST",
            match.group(1) + "/v1/images/generations",
            {"prompt": "a lighthouse at dusk", "size": "64x64"},
        )
        assert reply.status == 200, reply.body
        assert base64.b64decode(reply.body["data"][0]["b64_json"]).startswith(b"\x89PNG")
        again = _devcluster("imagefleet.devcluster.demo", "--state-dir", str(state), timeout=600)
        assert again.returncode == 0 and "already running" in again.stderr, again.stderr[-2000:]
    finally:
        down = _devcluster("imagefleet.devcluster", "down", "--state-dir", str(state), timeout=120)
        assert down.returncode == 0, down.stderr

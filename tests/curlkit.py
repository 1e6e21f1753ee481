"""Real curl as a test client (Debian's curl package).

``curl(...)`` runs curl through gevent's subprocess module, so a server in
the test's own hub keeps serving while curl runs; a test that needs curl is
skipped, with the reason, where it is not installed (CI installs it).
"""

from __future__ import annotations

import shutil
import typing as t

import pytest
from gevent import subprocess


def curl_path() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed (apt-get install curl); .ci/run installs it")
    return path


def curl(*args: str, timeout: float = 20.0) -> t.Any:
    """Run ``curl args...``; returns the CompletedProcess (text output)."""
    return subprocess.run(
        [curl_path(), "--silent", "--show-error", *args], capture_output=True, text=True, timeout=timeout
    )

"""Skips CI must not take: a tool the test needs is missing -> skip on a developer machine, FAIL in CI.

``.ci/run`` sets ``WORKER_ORCD_CI=1`` and installs every such tool, so a requirement
never disappears from CI behind a skip (the README's testing section lists the
skips that remain).
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("WORKER_ORCD_CI") == "1"


def need(present: bool, what: str) -> None:
    """Call first in a test: skip without ``what`` locally; in CI its absence is a failure."""
    if present:
        return
    if IN_CI:
        pytest.fail(f"{what}: CI must run this test (.ci/run installs it)", pytrace=False)
    pytest.skip(what)

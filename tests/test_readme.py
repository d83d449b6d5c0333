"""The README's error table is the contract operators read: it must equal errors.CODE_INFO (SPEC 4950-4951),
and its quick start must install and test as CI does (it says so)."""

from __future__ import annotations

import re
from pathlib import Path

from worker_orcd.errors import CODE_INFO, ErrorCode

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `([A-Z_]+)` \| (\d{3}) \| (no|yes \((\d+) ms\)) \| (.+) \|$")


def test_worker_4950_readme_error_table_equals_code_info() -> None:
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        m = ROW.match(line)
        if m and m.group(1) in ErrorCode.__members__:
            rows[m.group(1)] = m
    assert set(rows) == {c.value for c in ErrorCode}, "every code, and only codes, in the README table"
    for code, info in CODE_INFO.items():
        m = rows[code.value]
        assert int(m.group(2)) == info.http_status, code
        assert (m.group(3) != "no") == info.retriable, code
        if info.retriable:
            assert int(m.group(4)) == info.retry_after_ms, code
        assert m.group(5).startswith(info.meaning), code


def test_readme_quick_start_installs_and_tests_as_ci_does() -> None:
    """The README says its test command is "the same command CI runs, after the install above": the
    torch pin, the editable install with the test extra and the pytest line are .ci/run's."""
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    pins = {name: set(re.findall(r"torch==([0-9][0-9.]*)", text)) for name, text in (("README", readme), ("CI", ci))}
    assert pins["CI"] and pins["README"] == pins["CI"], pins
    assert 'pip install -e ".[test]"' in readme and 'pip install -q -e ".[test]"' in ci
    test_cmd = "python -m pytest -q"
    assert f". .venv/bin/activate && {test_cmd}" in readme
    assert any(line.strip() == test_cmd for line in ci.splitlines()), ".ci/run must call the README's test command"


def test_readme_log_allow_list_equals_fields() -> None:
    """Issue 10, defect 10: the README listed fewer log fields than the code lets through."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("drawn only from this allow-list")
    listed = re.findall(r"`([a-z0-9_]+)`", readme[start : readme.index("**Redaction is structural**")])
    from worker_orcd.logs import FIELDS

    assert set(listed) - {"worker_orcd"} == set(FIELDS)


def test_readme_request_metric_labels_are_the_codes() -> None:
    """Issue 10, defect 10: `worker_requests_total` is labelled `success` or an error code (metrics.outcome)."""
    row = next(ln for ln in (REPO / "README.md").read_text().splitlines() if ln.startswith("| `worker_requests_total`"))
    assert "`success`" in row and "error code" in row
    assert not {"unauthorized", "unavailable", "client_error", "server_error"} & set(re.findall(r"`(\w+)`", row))

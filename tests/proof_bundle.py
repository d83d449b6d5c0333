"""Proof bundles (SPEC 4996): what a reviewer needs to trust a test run, kept on disk per run.

A pytest plugin (registered in tests/conftest.py) with one fixture,
``proof_bundle``. A test records its evidence - token streams, seeds,
model digests, timings, anything JSON - and the plugin writes it to::

    .proof_bundle/<suite>/<run-id>/
        index.json            every artifact: test id, kind, path, sha256, size; each test's outcome
        environment.json      python / torch / triton versions, platform, device, git commit
        <test>/<kind>-<name>.json   one file per recorded artifact (name unique per test and kind)

``<suite>`` is the test module without its ``test_`` prefix; ``<run-id>`` is
one id per pytest session (``$PROOF_BUNDLE_RUN_ID`` or UTC time, pid and a random suffix), so
every suite of one run shares it. The root is ``$PROOF_BUNDLE_DIR`` or
``<rootdir>/.proof_bundle``. The index is rewritten after every artifact
(a crash keeps what was recorded) and once more at the end with the
outcomes. Nothing is written for a suite whose tests record nothing.

Versions come from package metadata, so the plugin never imports torch
itself; the device name is read only if the tests already imported torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import secrets
import subprocess
import sys
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

ROOT_ENV = "PROOF_BUNDLE_DIR"
RUN_ID_ENV = "PROOF_BUNDLE_RUN_ID"
INDEX = "index.json"
ENVIRONMENT = "environment.json"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSIONED = ("torch", "triton", "numpy", "gguf", "transformers", "fastapi", "uvicorn", "prometheus-client", "pytest")


class ProofBundleError(Exception):
    """A recording that would make the bundle ambiguous (same kind and name twice, data that is not JSON)."""


def _slug(text: str, limit: int = 80) -> str:
    """A filesystem-safe name that stays unique: readable prefix + short hash of the full text."""
    readable = _SAFE.sub("_", text).strip("._")[:limit] or "x"
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _json_bytes(data: Any) -> bytes:
    try:
        return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise ProofBundleError(f"artifact is not plain JSON: {e}") from None


def environment(repo: Path) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    env = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "versions": versions,
        "device": _device(),
        "require_real_gpu": os.environ.get("REQUIRE_REAL_GPU") == "1",
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "git": _git(repo),
    }
    return env


def _device() -> dict[str, Any]:
    torch = sys.modules.get("torch")
    if torch is None:
        return {"kind": "unknown (torch not imported by these tests)"}
    try:
        if torch.cuda.is_available():
            i = torch.cuda.current_device()
            return {"kind": "cuda", "name": torch.cuda.get_device_name(i), "capability": list(torch.cuda.get_device_capability(i)),
                    "cuda": torch.version.cuda, "count": torch.cuda.device_count()}
    except Exception as e:  # noqa: BLE001 - a broken driver must not break the bundle
        return {"kind": "cuda (unreadable)", "error": type(e).__name__}
    return {"kind": "cpu", "threads": torch.get_num_threads()}


def _git(repo: Path) -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


@dataclass
class Artifact:
    test_id: str
    name: str
    kind: str
    path: str  # relative to the run directory
    sha256: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"test_id": self.test_id, "name": self.name, "kind": self.kind, "path": self.path,
                "sha256": self.sha256, "size": self.size}


@dataclass
class SuiteBundle:
    """One ``<suite>/<run-id>/`` directory and its index."""

    root: Path
    suite: str
    run_id: str
    repo: Path
    artifacts: list[Artifact] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def dir(self) -> Path:
        return self.root / self.suite / self.run_id

    def add(self, test_id: str, name: str, kind: str, data: Any) -> Path:
        rel = f"{_slug(test_id.split('::', 1)[-1])}/{_slug(f'{kind}-{name}', 60)}.json"
        if any(a.path == rel for a in self.artifacts):
            raise ProofBundleError(f"{test_id} already recorded a {kind} artifact named {name!r}")
        payload = _json_bytes({"test_id": test_id, "name": name, "kind": kind, "data": data})
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (self.dir / ENVIRONMENT).exists():
            self.write_environment()
        _write_atomic(path, payload)
        self.artifacts.append(Artifact(test_id, name, kind, rel, hashlib.sha256(payload).hexdigest(), len(payload)))
        self.write_index()
        return path

    def write_environment(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.dir / ENVIRONMENT, _json_bytes(environment(self.repo)))

    def write_index(self) -> None:
        env = (self.dir / ENVIRONMENT).read_bytes()
        index = {
            "suite": self.suite,
            "run_id": self.run_id,
            "created": self.created,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            "environment": {"path": ENVIRONMENT, "sha256": hashlib.sha256(env).hexdigest(), "size": len(env)},
            "artifacts": [a.as_dict() for a in self.artifacts],
            "tests": dict(sorted(self.outcomes.items())),
        }
        _write_atomic(self.dir / INDEX, _json_bytes(index))


class ProofBundle:
    """What a test gets from the fixture: records artifacts under its own test id."""

    def __init__(self, suite: SuiteBundle, test_id: str) -> None:
        self._suite = suite
        self.test_id = test_id

    @property
    def dir(self) -> Path:
        return self._suite.dir

    def record(self, name: str, data: Any, kind: str = "data") -> Path:
        """Any JSON-able evidence; returns the file written."""
        return self._suite.add(self.test_id, name, kind, data)

    def token_stream(
        self, name: str, tokens: Sequence[int | str], *, seed: int | None = None, params: Mapping[str, Any] | None = None,
        text: str | None = None, prompt: Sequence[int] | str | None = None, **extra: Any,
    ) -> Path:
        """A generated stream with what produced it (seed, sampling parameters, prompt)."""
        data = {"tokens": list(tokens), "n_tokens": len(tokens), "seed": seed, "params": dict(params or {}),
                "text": text, "prompt": prompt if isinstance(prompt, str) or prompt is None else list(prompt), **extra}
        return self.record(name, data, "token_stream")

    def model_digest(self, name: str, *, sha256: str | None = None, path: Path | None = None, **extra: Any) -> Path:
        """A model's SHA-256, given or computed from the file."""
        if sha256 is None:
            if path is None:
                raise ProofBundleError("model_digest needs sha256= or path=")
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            sha256 = h.hexdigest()
        data = {"sha256": sha256, "path": str(path) if path else None,
                "size": path.stat().st_size if path else None, **extra}
        return self.record(name, data, "model_digest")

    def timing(self, name: str, seconds: float, **extra: Any) -> Path:
        return self.record(name, {"seconds": seconds, **extra}, "timing")


# --- the pytest plugin ---------------------------------------------------------------------

@dataclass
class _Session:
    root: Path
    run_id: str
    repo: Path
    suites: dict[str, SuiteBundle] = field(default_factory=dict)

    def suite(self, name: str) -> SuiteBundle:
        if name not in self.suites:
            self.suites[name] = SuiteBundle(self.root, name, self.run_id, self.repo)
        return self.suites[name]


_STATE = pytest.StashKey[_Session]()


def _run_id() -> str:
    given = os.environ.get(RUN_ID_ENV)
    if given:
        if not _RUN_ID.fullmatch(given):
            raise pytest.UsageError(f"{RUN_ID_ENV} must be 1-128 of [A-Za-z0-9._-], got {given!r}")
        return given
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}-{secrets.token_hex(3)}"


def pytest_configure(config: pytest.Config) -> None:
    root = Path(os.environ.get(ROOT_ENV) or config.rootpath / ".proof_bundle")
    config.stash[_STATE] = _Session(root=root, run_id=_run_id(), repo=config.rootpath)


def _suite_name(item: pytest.Item) -> str:
    module = getattr(item, "module", None)
    stem = Path(module.__file__).stem if module is not None and module.__file__ else item.nodeid.split("::")[0]
    return _SAFE.sub("_", stem.removeprefix("test_")) or "suite"


@pytest.fixture
def proof_bundle(request: pytest.FixtureRequest) -> Iterator[ProofBundle]:
    """Records this test's evidence under .proof_bundle/<suite>/<run-id>/ (SPEC 4996)."""
    session = request.config.stash[_STATE]
    suite = session.suite(_suite_name(request.node))
    suite.outcomes.setdefault(request.node.nodeid, "running")
    yield ProofBundle(suite, request.node.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    session = item.config.stash.get(_STATE, None)
    if session is None or "proof_bundle" not in getattr(item, "fixturenames", ()):
        return report
    suite = session.suites.get(_suite_name(item))
    if suite is None:
        return report
    previous = suite.outcomes.get(item.nodeid)
    if report.failed:
        suite.outcomes[item.nodeid] = "failed" if report.when == "call" else f"error ({report.when})"
    elif report.when == "call" or (report.skipped and previous in (None, "running")):
        suite.outcomes[item.nodeid] = report.outcome
    if suite.artifacts and suite.outcomes.get(item.nodeid) != previous:
        suite.write_index()
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is None:
        return
    for suite in state.suites.values():
        if suite.artifacts:  # the device is known by now (torch imported by the tests)
            suite.write_environment()
            suite.write_index()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    written = [s for s in (state.suites.values() if state else ()) if s.artifacts]
    for suite in written:
        terminalreporter.write_line(f"proof bundle: {suite.dir} ({len(suite.artifacts)} artifacts)")

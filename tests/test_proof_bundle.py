"""The proof-bundle plugin itself (SPEC 4996), run on small generated test suites with pytester."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from proof_bundle import ProofBundleError, SuiteBundle, environment

pytest_plugins = ("pytester",)

REPO = Path(__file__).resolve().parents[1]

INNER = '''
import pytest

def test_records(proof_bundle):
    proof_bundle.token_stream("greedy", [11, 12, 13], seed=7, params={"temperature": 0.0}, text="abc", prompt=[1, 2])
    proof_bundle.model_digest("model", sha256="ab" * 32)
    proof_bundle.timing("generate", 0.25, tokens=3)

def test_records_then_fails(proof_bundle):
    proof_bundle.record("partial", {"step": 1})
    assert False, "the bundle keeps what a failing test recorded"

def test_without_bundle():
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_param(proof_bundle, n):
    proof_bundle.record("value", {"n": n})
'''


@pytest.fixture(autouse=True)
def _bare_inner_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner runs load only the plugin under test (installed pytest plugins cost ~1.5 s a run)."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def run_inner(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_inprocess("-p", "proof_bundle", "-p", "no:cacheprovider", *args)


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.fixture
def bundles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "bundles"
    monkeypatch.setenv("PROOF_BUNDLE_DIR", str(root))
    monkeypatch.setenv("PROOF_BUNDLE_RUN_ID", "run-1")
    return root


def test_worker_4996_bundle_layout_index_and_hashes(pytester: pytest.Pytester, bundles: Path) -> None:
    result = run_inner(pytester, INNER)
    result.assert_outcomes(passed=4, failed=1)
    run = bundles / "inner" / "run-1"
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == ["environment.json", "index.json"]
    index = load(run / "index.json")
    assert index["suite"] == "inner" and index["run_id"] == "run-1"
    artifacts = index["artifacts"]
    assert [(a["test_id"].split("::")[1], a["name"], a["kind"]) for a in artifacts] == [
        ("test_records", "greedy", "token_stream"),
        ("test_records", "model", "model_digest"),
        ("test_records", "generate", "timing"),
        ("test_records_then_fails", "partial", "data"),
        ("test_param[1]", "value", "data"),
        ("test_param[2]", "value", "data"),
    ]
    for a in artifacts:  # every artifact is listed with the hash of exactly the bytes on disk
        body = (run / a["path"]).read_bytes()
        assert hashlib.sha256(body).hexdigest() == a["sha256"] and len(body) == a["size"]
        assert json.loads(body)["test_id"] == a["test_id"]
    env = (run / "environment.json").read_bytes()
    assert index["environment"]["sha256"] == hashlib.sha256(env).hexdigest()
    tests = {k.split("::")[1]: v for k, v in index["tests"].items()}
    assert tests == {"test_records": "passed", "test_records_then_fails": "failed", "test_param[1]": "passed",
                     "test_param[2]": "passed"}  # the test without the fixture leaves no trace
    stream = load(run / artifacts[0]["path"])["data"]
    assert stream == {"tokens": [11, 12, 13], "n_tokens": 3, "seed": 7, "params": {"temperature": 0.0}, "text": "abc",
                      "prompt": [1, 2]}
    assert any("proof bundle: " in line and "(6 artifacts)" in line for line in result.outlines)


def test_worker_4996_each_run_gets_its_own_directory(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROOF_BUNDLE_DIR", str(tmp_path / "b"))
    monkeypatch.delenv("PROOF_BUNDLE_RUN_ID", raising=False)
    source = "def test_one(proof_bundle):\n    proof_bundle.record('x', 1)\n"
    run_inner(pytester, source).assert_outcomes(passed=1)
    run_inner(pytester, source).assert_outcomes(passed=1)
    runs = sorted(p.name for p in (tmp_path / "b" / "inner").iterdir())
    assert len(runs) == 2 and all(re.fullmatch(r"\d{8}T\d{6}Z-\d+-[0-9a-f]{6}", r) for r in runs), runs


def test_worker_4996_ambiguous_or_non_json_recordings_fail_the_test(pytester: pytest.Pytester, bundles: Path) -> None:
    source = '''
import pytest
from proof_bundle import ProofBundleError

def test_duplicate(proof_bundle):
    proof_bundle.record("same", 1)
    with pytest.raises(ProofBundleError, match="already recorded"):
        proof_bundle.record("same", 2)

def test_not_json(proof_bundle):
    for bad in ({1, 2}, b"bytes", float("nan")):
        with pytest.raises(ProofBundleError, match="not plain JSON"):
            proof_bundle.record("bad", bad)

def test_digest_needs_input(proof_bundle):
    with pytest.raises(ProofBundleError):
        proof_bundle.model_digest("m")
'''
    run_inner(pytester, source).assert_outcomes(passed=3)
    index = load(bundles / "inner" / "run-1" / "index.json")
    assert [a["name"] for a in index["artifacts"]] == ["same"]  # nothing half-written for the refused ones


def test_worker_4996_nothing_written_when_nothing_recorded(pytester: pytest.Pytester, bundles: Path) -> None:
    run_inner(pytester, "def test_a(proof_bundle):\n    pass\n").assert_outcomes(passed=1)
    assert not bundles.exists()


def test_worker_4996_model_digest_from_file_and_environment(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(range(256)) * 5000)
    suite = SuiteBundle(tmp_path / "root", "unit", "r1", REPO)
    from proof_bundle import ProofBundle

    pb = ProofBundle(suite, "tests/x.py::test_y")
    written = load(pb.model_digest("model", path=model))
    assert written["data"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert written["data"]["size"] == model.stat().st_size
    env = environment(REPO)
    assert env["python"].count(".") == 2 and {"torch", "triton"} <= set(env["versions"])
    assert env["git"]["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git"]["commit"])
    pb.record("model", {"note": "another kind may reuse the name"})
    with pytest.raises(ProofBundleError, match="already recorded a model_digest"):
        pb.model_digest("model", sha256="0" * 64)


def test_worker_4996_bad_run_id_is_a_usage_error(pytester: pytest.Pytester, bundles: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROOF_BUNDLE_RUN_ID", "../escape")
    result = run_inner(pytester, "def test_a():\n    pass\n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR

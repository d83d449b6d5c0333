"""A tensor-parallel rank that fails before the group can serve stops the whole group at once (issue 12).

Measured on two H200s: a member refused for VRAM before it joined left rank 0 waiting for it for
the whole join timeout (10 minutes), with nothing in rank 0's log but socket waits. Now a rank
that fails before joining posts its reason (HMAC over the group secret) where the others wait,
and what can fail after joining but before the upload (the plan: VRAM, KV pool, batch,
residency) is agreed on first. Real `worker-orcd serve` processes on the real 0.5B, gloo.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_serve_integration import start
from test_tensor_parallel import ONE_THREAD, _args, _free_port, _secret

from worker_orcd.engine.tp_plan import TPSpec

pytestmark = pytest.mark.slow

SECRET = "group-secret-" + "5" * 24


def _spec(rank: int) -> TPSpec:
    return TPSpec(degree=2, rank=rank, group_id="g-unit", members=("tp-w0", "tp-w1"), master_host="127.0.0.1",
                  master_port=1, secret=SECRET.encode())


def test_tp_failure_report_needs_the_group_secret() -> None:
    """Rank 0 stops on a member's failure report only when it proves the secret: anyone else who
    can reach the store must not be able to end the group with a made-up reason."""
    import torch.distributed as dist

    from worker_orcd.engine import tensor_parallel as tp

    store = dist.HashStore()
    prefix, nonce0 = "worker-orcd/tp/g-unit/", "n" * 32
    tp._raise_if_failed(store, _spec(0), prefix, nonce0, 1)  # nothing posted: nothing raised
    forged = TPSpec(**{**_spec(1).__dict__, "secret": b"not-the-secret-" + b"1" * 24})
    store.set(f"{prefix}failed/1", json.dumps({"reason": "forged", "mac": tp._failure_mac(forged, 1, nonce0, "forged")}))
    tp._raise_if_failed(store, _spec(0), prefix, nonce0, 1)  # ignored
    store.set(f"{prefix}failed/1", "not json")
    tp._raise_if_failed(store, _spec(0), prefix, nonce0, 1)  # ignored
    reason = "tp-w1: MODEL_LOAD_FAILED: not a GGUF file"
    store.set(f"{prefix}failed/1", json.dumps({"reason": reason, "mac": tp._failure_mac(_spec(1), 1, nonce0, reason)}))
    with pytest.raises(tp.TPGroupError, match="rank 1 \\(tp-w1\\) failed before the group formed: tp-w1: MODEL"):
        tp._raise_if_failed(store, _spec(0), prefix, nonce0, 1)
    tp._raise_if_failed(store, _spec(0), prefix, "m" * 32, 1)  # a report made for another rank 0's nonce: ignored


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=6000) | st.builds(lambda r, m: json.dumps({"reason": r, "mac": m}).encode(),
                                                st.text(max_size=200), st.text(max_size=80)))
def test_tp_failure_reports_fuzzed_never_crash_and_never_stop_the_group(raw: bytes) -> None:
    """Whatever bytes sit under a member's failure key, rank 0 either ignores them or (only with the
    secret's MAC, which random input does not have) raises TPGroupError: never another exception."""
    import torch.distributed as dist

    from worker_orcd.engine import tensor_parallel as tp

    store = dist.HashStore()
    store.set("p/failed/1", raw)
    tp._raise_if_failed(store, _spec(0), "p/", "n" * 32, 1)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=6000) | st.builds(lambda n, m: json.dumps({"nonce": n, "mac": m}).encode(),
                                                st.text(min_size=16, max_size=128), st.text(max_size=80) | st.integers()))
def test_tp_join_requests_fuzzed_are_refused_with_a_reason(raw: bytes) -> None:
    """A malformed or forged hello is refused with a reason (rank 0 logs it and keeps waiting):
    it never raises (a non-ASCII MAC made ``hmac.compare_digest`` raise TypeError and end rank 0's load)."""
    from worker_orcd.engine import tensor_parallel as tp

    reason, nonce = tp._check_hello(raw, _spec(0), 1, "n" * 32)
    assert reason and nonce == ""


def _group(tmp: Path, model: Path, group: str, member_model_root: Path | None = None,
           member_extra: tuple[str, ...] = ()) -> tuple[object, object]:
    port = _free_port()
    secret = _secret(tmp, f"{group}.secret", SECRET)
    rank0 = start(tmp, _args(model, 0, port, secret, group, ["--port", "0"]), tmp / "token", env=ONE_THREAD)
    args = _args(model, 1, port, secret, group, list(member_extra))
    if member_model_root is not None:
        args[args.index("--model-root") + 1] = str(member_model_root)
    rank1 = start(tmp, args, None, env=ONE_THREAD)
    return rank0, rank1


def _both_exit_1(first: Any, then: Any) -> None:
    """``first`` exits 1 within 120 s, ``then`` within 60 s more (not after the 10-minute join timeout)."""
    try:
        assert first.proc.wait(120) == 1, first.log.read_text()[-3000:]
        assert then.proc.wait(60) == 1, then.log.read_text()[-3000:]
    finally:
        for p in (first, then):
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(30)


def _events(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(os.urandom(24).hex() + "\n")
    path.chmod(0o600)
    return path


def test_tp_member_that_fails_validation_stops_rank0_at_once(serve_model_path: Path, tmp_path: Path,
                                                             token_file: Path) -> None:
    """Rank 1's copy of the model is not a GGUF: rank 1 exits 1 before joining, and rank 0, waiting
    for it to join, exits 1 within seconds naming rank 1 and its reason (not after 10 minutes)."""
    bad_root = tmp_path / "bad"
    bad_root.mkdir()
    (bad_root / serve_model_path.name).write_bytes(b"NOTGGUF!" + os.urandom(4096))
    rank0, rank1 = _group(tmp_path, serve_model_path, "g-fail", member_model_root=bad_root)
    _both_exit_1(first=rank1, then=rank0)
    failed = [e for e in _events(rank0.log) if e.get("event") == "startup_failed"]
    assert failed and failed[0]["code"] == "TP_GROUP_FAILED", rank0.log.read_text()[-3000:]
    assert "rank 1 (tp-w1) failed before the group formed: tp-w1: MODEL" in str(failed[0]["error"]), failed
    assert not any(e.get("event") == "model_digest" for e in _events(rank0.log))  # rank 0 never uploaded


def test_tp_rank0_that_fails_validation_stops_its_member_at_once(serve_model_path: Path, tmp_path: Path,
                                                                  token_file: Path) -> None:
    """Rank 0's copy is not a GGUF: it exits 1 after telling the member, which exits 1 naming rank 0's
    reason instead of waiting out the join timeout for a rank 0 that never forms the group."""
    bad_root = tmp_path / "bad"
    bad_root.mkdir()
    (bad_root / serve_model_path.name).write_bytes(b"NOTGGUF!" + os.urandom(4096))
    port = _free_port()
    secret = _secret(tmp_path, "g-r0.secret", SECRET)
    args0 = _args(serve_model_path, 0, port, secret, "g-r0", ["--port", "0"])
    args0[args0.index("--model-root") + 1] = str(bad_root)
    rank0 = start(tmp_path, args0, token_file, env=ONE_THREAD)
    rank1 = start(tmp_path, _args(serve_model_path, 1, port, secret, "g-r0", []), None, env=ONE_THREAD)
    _both_exit_1(first=rank1, then=rank0)
    text = rank1.log.read_text(errors="replace")
    assert "rank 0 (tp-w0) failed before the group formed: tp-w0: MODEL" in text, text[-3000:]


def test_tp_ranks_with_different_plans_fail_before_uploading(serve_model_path: Path, tmp_path: Path,
                                                             token_file: Path) -> None:
    """Rank 1 was started with another KV budget: both ranks refuse at the plan agreement, before
    either uploads a byte of the model (the load agreement would find it only after the upload)."""
    extra = ("--kv-cache-size-mb", "32")  # argparse: the last value wins over _args' 64
    rank0, rank1 = _group(tmp_path, serve_model_path, "g-plan", member_extra=extra)
    _both_exit_1(first=rank0, then=rank1)
    for p in (rank0, rank1):
        text = p.log.read_text(errors="replace")
        assert "do not agree on the plan" in text, text[-3000:]
        assert not any(e.get("event") == "model_digest" for e in _events(p.log)), text[-3000:]

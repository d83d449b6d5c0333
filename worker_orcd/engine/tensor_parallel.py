"""Tensor parallel over torch.distributed (SPEC 4500-4522): joining a group, the step broadcast, the all-reduces.

One worker process per device, one shard each (``shard.py``), one process group: ``gloo`` on the
CPU (development/test mode) and, on GPUs, NCCL for the all-reduces (CUDA tensors, inside the
captured decode graphs) with gloo for rank 0's step messages (CPU tensors) in the same group. Rank 0 serves HTTP/SSE and runs the scheduler; the others follow.

Joining (before ``init_process_group``). Rank 0 runs a ``TCPStore`` bound to ``--tp-master`` only,
and writes a fresh nonce. A member reads it and writes a hello: its own nonce and
``HMAC(secret, group id, member list, rank, both nonces)``. Rank 0 answers each hello: refused
(logged, the member exits with the reason; rank 0 keeps waiting for a good one until the join
timeout) or accepted, with rank 0's own HMAC over the member's nonce, so a member also refuses a
rank 0 without the secret. The process group's keys then live under a prefix derived from the
secret and the nonce: a peer that does not hold the secret neither passes the check nor finds the
rendezvous keys. Neither gloo nor NCCL authenticates or encrypts its own traffic: the master
port and the ranks' links must be on a private network (README, "Tensor parallel").

Steps. Rank 0's engine loop hands every scheduled ``StepBatch`` to ``LeaderRunner``, which
broadcasts it (a header, then the rows as int64: token ids, positions, block tables, which rows
are sampled; through gloo, on the host) and queues it, without waiting for the device: the loop
overlaps the next step's host work with this one as at tp=1. Followers run the same step and
compute the same logits but do not sample: rank 0 samples (sampling params never leave rank 0)
and broadcasts the drawn ids on the device (NCCL on GPUs), where every rank's next step reads
its PENDING tokens, as rank 0's own runner does. Row-parallel O and down products are summed by
``all_reduce``: its algorithm and order are fixed for a fixed group, size and backend (gloo's
ring / halving-doubling, NCCL's ring or tree picked by size, which is why NCCL_ALGO/PROTO are left
alone but must not change between runs), so a TP group's streams are identical run to run. A tp=2
stream is NOT bit-identical to tp=1's (partial sums are added in another order); greedy output
agrees up to the first near-tie (tests/test_tensor_parallel.py).

Failure. Every collective has the group timeout; an idle rank 0 pings the group every
heartbeat, so a follower that died or hangs is found within a heartbeat plus the timeout, even
with no job running, and a follower finds a dead or hung rank 0 the same way. Any failed
collective raises ``TP_GROUP_FAILED`` (fatal): rank 0's jobs end with it, rank 0 goes to
``stopped``, followers exit 1. A drain ends with ``STOP`` broadcast: followers exit 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from ..batching.step import Sampled, SampleSpec, StepBatch, StepRow
from ..errors import ErrorCode, WorkerError
from .events import SamplingParams
from .model import Attend, Model
from .tp_plan import BACKEND_BY_DEVICE, NCCL_SAFE_ENV, TPSpec
from .weights import LayerWeights

log = logging.getLogger("worker_orcd.engine")

OP_STEP, OP_PING, OP_STOP = 1, 2, 3
_MAX_HELLO = 4096  # bytes of a member's hello a rank 0 reads
_POLL_S = 0.5  # how often a waiting rank 0 looks again for a member's next hello


class TPGroupError(WorkerError):
    """A peer failed, hung, left or was refused: fatal for every rank of the group."""

    code = ErrorCode.TP_GROUP_FAILED


def _mac(secret: bytes, *parts: object) -> str:
    return hmac.new(secret, json.dumps([str(p) for p in parts]).encode(), hashlib.sha256).hexdigest()


def _same_mac(want: str, got: object) -> bool:
    """Constant-time MAC comparison of what a peer sent, whatever it sent (``hmac.compare_digest``
    raises TypeError on non-ASCII str: one malformed hello must not crash rank 0)."""
    if not isinstance(got, str):
        return False
    return hmac.compare_digest(want.encode(), got.encode("utf-8", "surrogatepass"))


def _wait_get(store: dist.Store, key: str, timeout_s: float) -> bytes | None:
    """The value of ``key`` once it exists, or None after ``timeout_s``."""
    try:
        store.wait([key], timedelta(seconds=max(timeout_s, 0.001)))
    except (RuntimeError, dist.DistError):  # DistStoreError: timed out (a subclass of both in torch 2.x)
        return None
    return store.get(key)


def _master_store(spec: TPSpec) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on the --tp-master address only (not every interface)."""
    family = socket.AF_INET6 if ":" in spec.master_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((spec.master_host, spec.master_port))
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise TPGroupError(f"tensor-parallel group {spec.group_id}: rank 0 cannot listen on "
                           f"{spec.master_host}:{spec.master_port}: {e.strerror or e}") from None
    store = dist.TCPStore(spec.master_host, spec.master_port, None, True, timedelta(seconds=spec.join_timeout_s),
                          wait_for_workers=False, master_listen_fd=sock.fileno(), use_libuv=False)
    sock.detach()  # the store's daemon owns the descriptor now: Python closing it under the daemon aborts the process
    return store


def _member_store(spec: TPSpec) -> dist.TCPStore:
    deadline = time.monotonic() + spec.join_timeout_s
    while True:
        try:
            return dist.TCPStore(spec.master_host, spec.master_port, None, False,
                                 timedelta(seconds=spec.join_timeout_s), use_libuv=False)
        except (RuntimeError, dist.DistError) as e:
            if time.monotonic() > deadline:
                raise TPGroupError(
                    f"tensor-parallel group {spec.group_id}: no rank 0 at {spec.master_host}:{spec.master_port} "
                    f"within {spec.join_timeout_s:g} s ({str(e).splitlines()[0]})"
                ) from None
            time.sleep(_POLL_S)


def _admit(store: dist.Store, spec: TPSpec, prefix: str, nonce0: str, deadline: float) -> None:
    """Rank 0: wait for a hello from every member that passes the check; answer every hello."""
    for r in range(1, spec.degree):
        n = 1
        while True:
            left = deadline - time.monotonic()
            raw = _wait_get(store, f"{prefix}hello/{r}/{n}", min(left, _POLL_S)) if left > 0 else None
            if raw is None:
                for other in range(r, spec.degree):  # any member not yet in, not only the one awaited
                    _raise_if_failed(store, spec, prefix, nonce0, other)
                if time.monotonic() < deadline:
                    continue
                raise TPGroupError(
                    f"tensor-parallel group {spec.group_id}: rank {r} ({spec.members[r]}) did not join with the "
                    f"group secret within {spec.join_timeout_s:g} s"
                )
            reason, nonce = _check_hello(raw, spec, r, nonce0)
            if reason is None:
                accept = _mac(spec.secret, "accept", spec.group_id, spec.members, r, nonce0, nonce)
                store.set(f"{prefix}verdict/{r}/{n}", json.dumps({"ok": True, "mac": accept}))
                log.info("tensor-parallel group %s: rank %d (%s) joined", spec.group_id, r, spec.members[r])
                break
            store.set(f"{prefix}verdict/{r}/{n}", json.dumps({"ok": False, "reason": reason}))
            log.warning("tensor-parallel group %s: refused a join as rank %d: %s", spec.group_id, r, reason)
            n += 1


def _check_hello(raw: bytes, spec: TPSpec, rank: int, nonce0: str) -> tuple[str | None, str]:
    """(None, member nonce) when the hello proves the secret; else (why it is refused, '')."""
    try:
        hello = json.loads(raw[:_MAX_HELLO])
        nonce, mac = hello["nonce"], hello["mac"]
        if not isinstance(nonce, str) or not isinstance(mac, str) or not 16 <= len(nonce) <= 128:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return "malformed join request", ""
    want = _mac(spec.secret, "join", spec.group_id, spec.members, rank, nonce0, nonce)
    if not _same_mac(want, mac):
        return ("the join proof does not verify: wrong group secret, or another group id or member list "
                f"than rank 0's ({spec.group_id}, {','.join(spec.members)})"), ""
    return None, nonce


def _failure_mac(spec: TPSpec, rank: int, nonce0: str, reason: str) -> str:
    return _mac(spec.secret, "failed", spec.group_id, spec.members, rank, nonce0, reason)


def _raise_if_failed(store: dist.Store, spec: TPSpec, prefix: str, nonce0: str, rank: int) -> None:
    """Raise the failure ``rank`` posted before joining (``report_failure_before_join``), if it proves the secret."""
    key = f"{prefix}failed/{rank}"
    if not store.check([key]):
        return
    try:
        posted = json.loads(store.get(key)[:_MAX_HELLO])
        reason, mac = str(posted["reason"]), str(posted["mac"])
    except (ValueError, KeyError, TypeError):
        reason, mac = "", ""  # malformed: ignored like a forged one
    if _same_mac(_failure_mac(spec, rank, nonce0, reason), mac):
        raise TPGroupError(f"tensor-parallel group {spec.group_id}: rank {rank} ({spec.members[rank]}) failed before "
                           f"the group formed: {reason}")
    log.warning("tensor-parallel group %s: ignored (and removed) a failure report for rank %d without the group "
                "secret", spec.group_id, rank)
    store.delete_key(key)  # once: the waits poll this key twice a second


def report_failure_before_join(spec: TPSpec, reason: str, timeout_s: float | None = None) -> bool:
    """This rank fails before it joined (its model did not validate, did not fit, ...): tell the group.

    Without this the others wait for it for the whole join timeout (10 minutes by default; measured
    on two H200s: a member refused for VRAM left rank 0 waiting). A member posts the reason, with an
    HMAC that proves the secret, where rank 0 looks while it waits for hellos (trying to reach rank 0
    for ``timeout_s``, default 10 s); rank 0 opens the store and keeps it open until every member has
    read its reason or ``timeout_s`` (default 30 s: members still starting) passed. Best effort:
    returns whether it was posted (and, for rank 0, read by every member)."""
    timeout_s = timeout_s if timeout_s is not None else 30.0 if spec.rank == 0 else 10.0
    prefix = f"worker-orcd/tp/{spec.group_id}/"
    reason = reason[:1000]
    short = dataclasses.replace(spec, join_timeout_s=timeout_s)
    try:
        if spec.rank == 0:
            store = _master_store(short)
            nonce0 = secrets.token_hex(16)
            store.set(prefix + "nonce", nonce0)
            store.set(f"{prefix}failed/0", json.dumps({"reason": reason, "mac": _failure_mac(spec, 0, nonce0, reason)}))
            keys = [f"{prefix}failure-seen/{r}" for r in range(1, spec.degree)]
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and not store.check(keys):
                time.sleep(0.05)
            return bool(store.check(keys))
        store = _member_store(short)
        raw = _wait_get(store, prefix + "nonce", timeout_s)
        if raw is None:
            return False
        nonce0 = raw.decode()
        store.set(f"{prefix}failed/{spec.rank}",
                  json.dumps({"reason": reason, "mac": _failure_mac(spec, spec.rank, nonce0, reason)}))
        return True
    except (TPGroupError, RuntimeError, dist.DistError, OSError) as e:
        log.warning("tensor-parallel group %s: could not tell the group that rank %d fails: %s", spec.group_id,
                    spec.rank, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False


def _rank0_failed(store: dist.Store, spec: TPSpec, prefix: str, nonce0: str) -> None:
    """A member: raise rank 0's failure before the group formed (acknowledged, so rank 0 may exit)."""
    try:
        _raise_if_failed(store, spec, prefix, nonce0, 0)
    except TPGroupError:
        store.set(f"{prefix}failure-seen/{spec.rank}", "1")
        raise


def _hello(store: dist.Store, spec: TPSpec, prefix: str, nonce0: str) -> None:
    """A member: prove the secret to rank 0, and check that rank 0 holds it too."""
    n = store.add(f"{prefix}attempts/{spec.rank}", 1)
    nonce = secrets.token_hex(16)
    mac = _mac(spec.secret, "join", spec.group_id, spec.members, spec.rank, nonce0, nonce)
    store.set(f"{prefix}hello/{spec.rank}/{n}", json.dumps({"nonce": nonce, "mac": mac}))
    raw = None
    deadline = time.monotonic() + spec.join_timeout_s
    while raw is None and time.monotonic() < deadline:
        raw = _wait_get(store, f"{prefix}verdict/{spec.rank}/{n}", min(_POLL_S, deadline - time.monotonic()))
        if raw is None:
            _rank0_failed(store, spec, prefix, nonce0)
    if raw is None:
        raise TPGroupError(f"tensor-parallel group {spec.group_id}: rank 0 did not answer the join of rank "
                           f"{spec.rank} within {spec.join_timeout_s:g} s (is another process using this rank?)")
    verdict = json.loads(raw)
    if not verdict.get("ok"):
        raise TPGroupError(f"tensor-parallel group {spec.group_id}: rank 0 refused rank {spec.rank}: "
                           f"{verdict.get('reason', 'no reason given')}")
    want = _mac(spec.secret, "accept", spec.group_id, spec.members, spec.rank, nonce0, nonce)
    if not _same_mac(want, verdict.get("mac")):
        raise TPGroupError(f"tensor-parallel group {spec.group_id}: the rank 0 at {spec.master_host}:"
                           f"{spec.master_port} does not hold the group secret; not joining")


def join(spec: TPSpec, device: str) -> TPGroup:
    """Authenticate (see the module doc), then ``init_process_group``; blocks until every rank is in."""
    backend = BACKEND_BY_DEVICE[device]
    if "nccl" in backend:
        for k, v in NCCL_SAFE_ENV.items():
            os.environ.setdefault(k, v)
    if dist.is_initialized():
        raise TPGroupError("this process is already in a tensor-parallel group; one per process")
    deadline = time.monotonic() + spec.join_timeout_s
    prefix = f"worker-orcd/tp/{spec.group_id}/"
    if spec.rank == 0:
        store = _master_store(spec)
        nonce0 = secrets.token_hex(16)
        store.set(prefix + "nonce", nonce0)
        log.info("tensor-parallel group %s: rank 0 waiting for %d member(s) on %s:%d", spec.group_id,
                 spec.degree - 1, spec.master_host, spec.master_port)
        _admit(store, spec, prefix, nonce0, deadline)
    else:
        store = _member_store(spec)
        raw = _wait_get(store, prefix + "nonce", spec.join_timeout_s)
        if raw is None:
            raise TPGroupError(f"tensor-parallel group {spec.group_id}: the store at {spec.master_host}:"
                               f"{spec.master_port} has no rank 0 of this group")
        nonce0 = raw.decode()
        _rank0_failed(store, spec, prefix, nonce0)
        _hello(store, spec, prefix, nonce0)
    pg_prefix = prefix + _mac(spec.secret, "pg", spec.group_id, nonce0)[:32] + "/"
    try:
        dist.init_process_group(backend, store=dist.PrefixStore(pg_prefix, store), rank=spec.rank,
                                world_size=spec.degree, timeout=timedelta(seconds=spec.timeout_s))
    except (RuntimeError, dist.DistError) as e:
        raise TPGroupError(f"tensor-parallel group {spec.group_id}: forming the {backend} group failed: "
                           f"{str(e).splitlines()[0]}") from None
    log.info("tensor-parallel group %s formed: rank %d of %d over %s", spec.group_id, spec.rank, spec.degree, backend)
    return TPGroup(spec, store, pg_prefix)


class TPGroup:
    """This process's membership: the messages from rank 0, the all-reduce, the failure state."""

    def __init__(self, spec: TPSpec, store: dist.Store, pg_prefix: str) -> None:
        self.spec = spec
        self.rank, self.size = spec.rank, spec.degree
        self._store = store
        self._prefix = pg_prefix
        self.lock = threading.Lock()  # rank 0: one message (and the step it starts) at a time
        self._header = torch.zeros(3, dtype=torch.int64)
        self._seq = 0
        self._last_send = time.monotonic()
        self.failed: TPGroupError | None = None
        self._on_failure: list[Callable[[WorkerError], None]] = []
        self._closed = threading.Event()
        self._beat: threading.Thread | None = None
        self.steps = 0  # steps run (followers: received)

    # --- failure -----------------------------------------------------------------------------

    def on_failure(self, callback: Callable[[WorkerError], None]) -> None:
        self._on_failure.append(callback)

    def _fail(self, what: str, exc: BaseException) -> TPGroupError:
        if self.failed is None:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            who = "a member" if self.rank == 0 else "rank 0"
            self.failed = TPGroupError(
                f"tensor-parallel group {self.spec.group_id}: rank {self.rank} lost {who} during {what} "
                f"(a peer died, hung past the {self.spec.timeout_s:g} s timeout, or left): {first}"
            )
            log.error("%s", self.failed.message)
            for cb in self._on_failure:
                try:
                    cb(self.failed)
                except Exception:  # noqa: BLE001 - a failing observer must not hide the failure
                    log.exception("a tensor-parallel failure callback failed")
        return self.failed

    def _collective(self, what: str, fn: Callable[[], object]) -> None:
        if self.failed is not None:
            raise self.failed
        if self._closed.is_set():
            raise TPGroupError(f"tensor-parallel group {self.spec.group_id} is closed")
        try:
            fn()
        except (RuntimeError, dist.DistError) as e:
            raise self._fail(what, e) from None

    # --- the forward's collective --------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group in place (the row-parallel O and down products)."""
        self._collective("an all-reduce", lambda: dist.all_reduce(x, op=dist.ReduceOp.SUM))
        return x

    # --- messages from rank 0 --------------------------------------------------------------------

    def send(self, op: int, payload: torch.Tensor | None = None) -> None:
        """Rank 0, holding ``lock``: one message to every member."""
        assert self.rank == 0
        n = 0 if payload is None else payload.numel()
        self._seq += 1
        header = torch.tensor([op, n, self._seq], dtype=torch.int64)
        self._collective("a broadcast", lambda: dist.broadcast(header, src=0))
        if payload is not None and n:
            self._collective("a broadcast", lambda: dist.broadcast(payload, src=0))
        self._last_send = time.monotonic()

    def recv(self) -> tuple[int, torch.Tensor | None]:
        """A member: the next message from rank 0 (waits at most the group timeout: rank 0 pings)."""
        h = self._header
        self._collective("a wait for rank 0", lambda: dist.broadcast(h, src=0))
        op, n = int(h[0]), int(h[1])
        if not n:
            return op, None
        payload = torch.empty(n, dtype=torch.int64)
        self._collective("a broadcast", lambda: dist.broadcast(payload, src=0))
        return op, payload

    def share_draws(self, ids: torch.Tensor) -> None:
        """Rank 0's draws of a step to every rank, queued on the device after the step (members pass
        an empty tensor of the same size and device; int64, contiguous)."""
        self._collective("a broadcast of the draws", lambda: dist.broadcast(ids, src=0))

    def start_heartbeat(self) -> None:
        """Rank 0: ping the idle group so a dead member is found without a job (and members find us)."""
        if self.rank != 0 or self._beat is not None:
            return
        self._beat = threading.Thread(target=self._heartbeat, name="tp-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        period = self.spec.heartbeat_s
        while not self._closed.wait(period / 2):
            if self.failed is not None:
                return
            if time.monotonic() - self._last_send < period or not self.lock.acquire(blocking=False):
                continue  # a step is running (it is the liveness check) or one ran just now
            try:
                if not self._closed.is_set():
                    self.send(OP_PING)
            except TPGroupError:
                return
            finally:
                self.lock.release()

    # --- agreement after load, and the end ---------------------------------------------------------

    def agree(self, summary: dict[str, object], timeout_s: float | None = None, stage: str = "loaded") -> None:
        """Every rank reports the same ``summary`` at ``stage``, or nobody serves (through the store:
        loads take their own time, longer than a collective's timeout). Stages: ``planned`` (the
        plan fits and is the same on every rank: checked before anyone uploads) and ``loaded``."""
        timeout_s = self.spec.join_timeout_s if timeout_s is None else timeout_s
        key = f"{self._prefix}{stage}/"
        self._store.set(f"{key}{self.rank}", json.dumps(summary, sort_keys=True))
        if self.rank == 0:
            verdict: dict[str, object] = {"ok": True}
            for r in range(1, self.size):
                raw = _wait_get(self._store, f"{key}{r}", timeout_s)
                theirs = json.loads(raw) if raw is not None else {"error": f"no load report within {timeout_s:g} s"}
                if theirs != summary:
                    verdict = {"ok": False, "reason": f"rank {r} reports {theirs}, rank 0 has {summary}"}
                    break
            self._store.set(f"{key}verdict", json.dumps(verdict))
        else:
            raw = _wait_get(self._store, f"{key}verdict", timeout_s)
            verdict = json.loads(raw) if raw is not None else {"ok": False, "reason": "rank 0 never reported its load"}
        if not verdict.get("ok"):
            self.close(notify=False)
            what = "loaded shards" if stage == "loaded" else "plan (KV pool, batch, residency; VRAM)"
            raise TPGroupError(f"tensor-parallel group {self.spec.group_id}: the ranks do not agree on the "
                               f"{what}: {verdict.get('reason')}")

    def abort(self, reason: str) -> None:
        """A load failed here: tell the others through the store (they are not in a collective yet)."""
        try:
            for stage in ("planned", "loaded"):  # whichever the others wait on
                if not self._store.check([f"{self._prefix}{stage}/verdict"]):
                    self._store.set(f"{self._prefix}{stage}/{self.rank}", json.dumps({"error": reason[:500]}))
                if self.rank == 0:
                    self._store.set(f"{self._prefix}{stage}/verdict",
                                    json.dumps({"ok": False, "reason": f"rank 0: {reason[:500]}"}))
        except (RuntimeError, dist.DistError):
            pass
        self.close(notify=False)

    def close(self, notify: bool = True) -> None:
        """Rank 0 (``notify``): tell the members to stop (a drain ends the group), then leave."""
        if self._closed.is_set():
            return
        if notify and self.rank == 0 and self.failed is None:
            if self.lock.acquire(timeout=self.spec.timeout_s):
                try:
                    self.send(OP_STOP)
                except TPGroupError:
                    pass
                finally:
                    self.lock.release()
        self._closed.set()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except (RuntimeError, dist.DistError):
                pass


# --- the model and the runners -------------------------------------------------------------------


class TPModel(Model):
    """The forward pass of one shard: the row-parallel outputs are summed over the group.

    Every rank holds the whole residual stream (embeddings and norms are replicated); attention
    and the FFN each end in one all-reduce. No O/down bias exists in the served archs; one would
    be added here, once, after the reduce."""

    def __init__(self, cfg: object, weights: object, group: TPGroup) -> None:
        super().__init__(cfg, weights)  # type: ignore[arg-type]
        self.group = group

    def _attention(self, i: int, lw: LayerWeights, h: torch.Tensor, attend: Attend) -> torch.Tensor:
        return self.group.all_reduce(super()._attention(i, lw, h, attend))

    def _mlp(self, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(super()._mlp(lw, h))


# A step as int64: [rows, then per row seq_id, start, n_tokens, n_blocks, sampled] + tokens + blocks.
_ROW_FIELDS = 5
_FOLLOWER_SPEC = SampleSpec(SamplingParams(max_tokens=1), 0)  # marks a sampled row; members never sample


def encode_step(batch: StepBatch) -> torch.Tensor:
    head: list[int] = [len(batch.rows)]
    body: list[int] = []
    for r in batch.rows:
        head += [r.seq_id, r.start, len(r.tokens), len(r.block_table), int(r.sample is not None)]
        body += r.tokens
        body += r.block_table
    return torch.tensor(head + body, dtype=torch.int64)


def decode_step(payload: torch.Tensor) -> StepBatch:
    v = payload.tolist()
    n = v[0]
    at = 1 + _ROW_FIELDS * n
    rows = []
    for i in range(n):
        seq_id, start, n_tok, n_blk, sampled = v[1 + _ROW_FIELDS * i : 1 + _ROW_FIELDS * (i + 1)]
        tokens = tuple(v[at : at + n_tok])
        table = tuple(v[at + n_tok : at + n_tok + n_blk])
        at += n_tok + n_blk
        rows.append(StepRow(seq_id, tokens, start, table, _FOLLOWER_SPEC if sampled else None))
    if at != len(v):
        raise TPGroupError(f"a step message from rank 0 is {len(v)} values long, its rows describe {at}")
    return StepBatch(tuple(rows))


class LeaderRunner:
    """Rank 0's runner as the engine loop sees it: every step goes to the members, then is queued here."""

    def __init__(self, runner: object, group: TPGroup) -> None:
        self._runner = runner
        self.group = group
        for name in ("block_size", "num_blocks", "max_seq_len", "vocab_size"):
            setattr(self, name, getattr(runner, name))

    def step(self, batch: StepBatch) -> list[Sampled]:
        return self.launch(batch).result()  # type: ignore[no-any-return]

    def launch(self, batch: StepBatch) -> object:
        """Send, queue and share the draws; the caller reads ``result()`` (the loop: one step later).
        PENDING tokens travel as PENDING: every rank reads them on its device from the draws."""
        with self.group.lock:
            self.group.send(OP_STEP, encode_step(batch))
            self.group.steps += 1
            out = self._runner.launch(batch)  # type: ignore[attr-defined]
            if any(r.sample is not None for r in batch.rows):  # members receive int64 (follow)
                self.group.share_draws(out.ids.to(torch.int64).contiguous())
        return out


def follow(runner: object, group: TPGroup, before_job: Callable[[], None] | None = None) -> str:
    """A member's life after load: run every step rank 0 sends until it says stop; returns why it ended.

    ``before_job`` (the host's seal check) runs before a step that starts a job (a row at position 0)."""
    busy = False
    while True:
        op, payload = group.recv()
        if op == OP_STOP:
            log.info("tensor-parallel group %s: rank 0 ended the group after %d steps (drain or shutdown)",
                     group.spec.group_id, group.steps)
            group.close(notify=False)
            return "stopped by rank 0"
        if op == OP_PING:
            if busy:
                busy = False
                log.info("tensor-parallel rank %d idle after %d steps", group.rank, group.steps)
            continue
        if op != OP_STEP or payload is None:
            raise TPGroupError(f"tensor-parallel group {group.spec.group_id}: unknown message {op} from rank 0")
        batch = decode_step(payload)
        if before_job is not None and any(r.start == 0 for r in batch.rows):
            before_job()
        with torch.no_grad():
            logits = runner.logits(batch)  # type: ignore[attr-defined]  # the same forward; rank 0 samples
            n = sum(1 for r in batch.rows if r.sample is not None)
            ids = None
            if n:
                ids = torch.empty(n, dtype=torch.int64, device=logits.device)
                group.share_draws(ids)
            runner.adopt_draws(batch, ids)  # type: ignore[attr-defined]  # the next step's PENDING tokens
        group.steps += 1
        busy = True

"""Streamed upload with an in-order re-hash (SPEC 4100-4102, 4113).

Tensors are read from the file in whole-block chunks into a small reusable
staging ring (pinned on CUDA, for the copy only, never for live data). A
quantized-resident matrix (``Slot.ggml_type``) is copied byte for byte from
the ring into its arena slice (no dequant pass); a dense slot (norms, biases,
CPU dev mode) goes through a device staging buffer and is dequantized there
straight into its arena slice. The host never holds the model. A reader
thread keeps file I/O ahead of hashing and the GPU work.

While streaming, the whole file (header, padding and unused tensors
included) is hashed in order; the bytes uploaded are exactly the bytes
hashed. With ``expected_digest`` (the host hashed the file before parsing it)
they must match it, which closes the window between verification and upload;
without it (the one-pass load) the digest is returned and the host checks it
before anything is sealed (SPEC 4113). The header bytes the host parsed are
compared with the header bytes hashed here either way (``header``), so the
layout used is the layout the digest covers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import torch

from ..errors import ModelLoadError
from ..gguf import GGMLType, GGUFFile, TensorInfo
from ..gguf.constants import BLOCK_LAYOUT
from .dequant import dequantize
from .device import DeviceContext
from .weights import WeightLayout, views

CHUNK_BYTES = 64 << 20
RING = 3  # staging buffers in flight: one being read, one being hashed, one on the GPU

Progress = Callable[[int, int], None]  # (tensor bytes uploaded, tensor bytes in all): the host's /health


class ArenaSink:
    """Where upload writes each slot: the arena's own slices (tp=1). ``shard.ShardSink`` instead keeps
    one rank's slice of every split slot, so a tensor-parallel rank never holds the whole model."""

    def __init__(self, arena: torch.Tensor, lay: WeightLayout) -> None:
        self._flat = {name: view.view(-1) for name, view in views(arena, lay).items()}

    def target(self, slot: str) -> torch.Tensor:
        """The whole slot, flat: uint8 for GGUF blocks, the layout's dtype for dense slots."""
        return self._flat[slot]

    def written(self, slot: str, n: int) -> None:
        """``n`` more elements of ``target(slot)`` hold their final values (each element once)."""


@dataclass(frozen=True)
class LoadStats:
    file_bytes: int
    uploaded_bytes: int
    resident_bytes: int
    seconds: float
    digest: str  # lower-case hex SHA-256 of every byte of the file, as streamed

    @property
    def gb_per_s(self) -> float:
        return self.file_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Deferred:
    """A chunk of a dense slot's file blocks, uploaded raw, to dequantize into ``out``."""

    raw: torch.Tensor
    ggml_type: GGMLType
    n_elements: int
    out: torch.Tensor
    slot: str


def dense_file_bytes(g: GGUFFile, lay: WeightLayout) -> int:
    """File bytes of the tensors ``lay`` dequantizes at load (the rest stay GGUF blocks)."""
    return sum(t.n_bytes for t in g.tensors if t.name in lay.parts and lay.slots[lay.parts[t.name].slot].ggml_type is None)


def dequantize_deferred(deferred: list[Deferred], dtype: torch.dtype) -> None:
    """Dequantize ``upload(..., deferred=...)``'s raw chunks into their slots (on the calling thread)."""
    for d in deferred:
        dequantize(d.raw, d.ggml_type, d.n_elements, dtype, out=d.out)


@dataclass(frozen=True)
class _Chunk:
    file_offset: int
    n_bytes: int
    tensor: TensorInfo | None  # None: header / padding / unused bytes, hashed only
    elem_start: int = 0  # first element of this chunk within the tensor


def _chunks(g: GGUFFile, lay: WeightLayout, chunk_bytes: int) -> Iterator[_Chunk]:
    """Every byte of the file exactly once, in file order; tensor chunks hold whole blocks."""
    pos = 0
    for t in sorted(g.tensors, key=lambda t: t.data_offset):
        while pos < t.data_offset:
            n = min(chunk_bytes, t.data_offset - pos)
            yield _Chunk(pos, n, None)
            pos += n
        layout = BLOCK_LAYOUT[t.ggml_type]
        step = max(1, chunk_bytes // layout.type_size) * layout.type_size
        used = t.name in lay.parts
        for off in range(0, t.n_bytes, step):
            n = min(step, t.n_bytes - off)
            yield _Chunk(t.data_offset + off, n, t if used else None, off // layout.type_size * layout.block_size)
        pos = t.data_offset + t.n_bytes
    while pos < g.file_size:
        n = min(chunk_bytes, g.file_size - pos)
        yield _Chunk(pos, n, None)
        pos += n


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise ModelLoadError(
                f"model file ended at byte {offset + got} while reading; it changed since it was verified"
            )
        got += n


class _Reader(threading.Thread):
    """Reads chunks ahead into the staging ring so file I/O overlaps hashing and the GPU work."""

    def __init__(
        self,
        fd: int,
        chunks: Iterator[_Chunk],
        host: list[torch.Tensor],
        events: list[torch.cuda.Event] | None,
        device_index: int,
    ) -> None:
        super().__init__(name="weights-reader", daemon=True)
        self.fd, self.chunks, self.host, self.events = fd, chunks, host, events
        self.device_index = device_index
        self.free: queue.Queue[int] = queue.Queue()
        self.filled: queue.Queue[tuple[int, _Chunk] | BaseException | None] = queue.Queue()
        self.stop = threading.Event()
        for k in range(len(host)):
            self.free.put(k)

    def run(self) -> None:
        try:
            if self.events is not None:  # a new thread's current device is 0: never touch another GPU
                torch.cuda.set_device(self.device_index)
            for chunk in self.chunks:
                k = self.free.get()
                if self.stop.is_set():
                    return
                if self.events is not None:
                    self.events[k].synchronize()  # the GPU copy out of this buffer has finished
                view = self.host[k].numpy().data[: chunk.n_bytes]
                _pread_full(self.fd, view, chunk.file_offset)
                self.filled.put((k, chunk))
            self.filled.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            self.filled.put(exc)


def upload(
    fh: BinaryIO,
    g: GGUFFile,
    lay: WeightLayout,
    arena: torch.Tensor,
    expected_digest: str | None,
    ctx: DeviceContext,
    chunk_bytes: int = CHUNK_BYTES,
    progress: Progress | None = None,
    sink: ArenaSink | None = None,
    cancel: threading.Event | None = None,
    deferred: list[Deferred] | None = None,
) -> LoadStats:
    """Stream the file into ``arena`` and hash all of it; raise MODEL_LOAD_FAILED if its SHA-256 is
    not ``expected_digest`` (None: the caller checks ``LoadStats.digest``) or if the header bytes are
    not those ``g`` was parsed from. ``sink`` (default: ``lay``'s slices of ``arena``) says where each
    slot's values go; ``arena`` is then only what ``resident_bytes`` reports.

    ``progress`` is told the tensor bytes uploaded so far after every chunk (only observation:
    whatever it raises is dropped, it never breaks a load). ``cancel`` set: stop at the next chunk
    (MODEL_LOAD_FAILED), e.g. because the warm-up beside it failed (``UploadThread``). ``deferred``
    (a list): the dense slots' file blocks are kept raw on the device (``dense_file_bytes`` of them) and
    appended there for ``dequantize_deferred``, so that this thread launches no kernel.

    The copies and dequantizations run on the calling thread's current CUDA stream; only that stream
    is waited for at the end (never the whole device: another thread may be capturing a graph).
    """
    fd = fh.fileno()
    if os.fstat(fd).st_size != g.file_size:
        raise ModelLoadError(f"model file is {os.fstat(fd).st_size} bytes now, {g.file_size} when it was verified")
    t0 = time.perf_counter()
    cuda = not ctx.dev_mode
    host = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(RING)]
    staging = ([torch.empty(chunk_bytes, dtype=torch.uint8, device=arena.device) for _ in range(RING)]
               if cuda and deferred is None else host)
    events = [torch.cuda.Event() for _ in range(RING)] if cuda else None
    sink = sink or ArenaSink(arena, lay)
    pending = None if deferred is None else torch.empty(dense_file_bytes(g, lay), dtype=torch.uint8, device=arena.device)
    pending_at = 0
    sha = hashlib.sha256()
    head = hashlib.sha256()  # the bytes before the first tensor: what the parser read
    head_end = g.header_size
    uploaded = 0
    total = sum(t.n_bytes for t in g.tensors if t.name in lay.parts)
    _tell(progress, 0, total)
    reader = _Reader(fd, _chunks(g, lay, chunk_bytes), host, events, ctx.index)
    reader.start()
    try:
        while True:
            item = reader.filled.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            k, chunk = item
            if cancel is not None and cancel.is_set():
                raise ModelLoadError("model load cancelled while streaming the weights")
            data = host[k].numpy().data[: chunk.n_bytes]
            sha.update(data)
            if chunk.file_offset < head_end:
                head.update(data[: head_end - chunk.file_offset])
            if chunk.tensor is not None:
                t = chunk.tensor
                part = lay.parts[t.name]
                slot = lay.slots[part.slot]
                dst = sink.target(part.slot)
                if slot.ggml_type is not None:  # quantized residency: the verified bytes, as they are
                    at = chunk.file_offset - t.data_offset
                    dst[at : at + chunk.n_bytes].copy_(host[k][: chunk.n_bytes], non_blocking=cuda)
                    sink.written(part.slot, chunk.n_bytes)
                else:
                    layout = BLOCK_LAYOUT[t.ggml_type]
                    n_el = chunk.n_bytes // layout.type_size * layout.block_size
                    start = part.elem_offset + chunk.elem_start
                    out = dst[start : start + n_el]
                    if deferred is not None:  # the raw blocks now; dequantized by the caller's thread later
                        assert pending is not None
                        raw = pending[pending_at : pending_at + chunk.n_bytes]
                        raw.copy_(host[k][: chunk.n_bytes], non_blocking=cuda)
                        pending_at += chunk.n_bytes
                        deferred.append(Deferred(raw, GGMLType(t.ggml_type), n_el, out, part.slot))
                    else:
                        raw = staging[k][: chunk.n_bytes]
                        if cuda:
                            raw.copy_(host[k][: chunk.n_bytes], non_blocking=True)
                        dequantize(raw, GGMLType(t.ggml_type), n_el, lay.dtype, out=out)
                        sink.written(part.slot, n_el)
                uploaded += chunk.n_bytes
                _tell(progress, uploaded, total)
            if events is not None:
                events[k].record()
            reader.free.put(k)
    finally:
        reader.stop.set()
        reader.free.put(0)  # unblock a reader waiting for a buffer
        reader.join()
    if cuda:
        torch.cuda.current_stream(arena.device).synchronize()
    digest = sha.hexdigest()
    if g.header_sha256 is not None and not hmac.compare_digest(head.hexdigest(), g.header_sha256):
        raise ModelLoadError("the model file's header changed after it was parsed; refusing it")
    if expected_digest is not None and not hmac.compare_digest(digest, expected_digest.lower()):
        raise ModelLoadError(
            f"model bytes changed after verification: SHA-256 while uploading is {digest}, verified digest was {expected_digest}"
        )
    return LoadStats(g.file_size, uploaded, arena.numel(), time.perf_counter() - t0, digest)


class UploadThread(threading.Thread):
    """``upload`` on its own thread and CUDA stream, so that the engine's thread binds the model, warms
    up and captures its graphs meanwhile: those need the weights' addresses, not their values (the
    warm-up's outputs are dropped; nothing runs a job before the digest check and the seal). Graph
    capture must then use ``capture_error_mode="thread_local"``: this thread's allocations and syncs
    would invalidate a global-mode capture. This thread launches no kernel (Triton's JIT is not safe
    to enter from two threads at once): the dense slots' blocks wait raw on the device (``deferred``,
    ``dense_file_bytes``) until ``result``, which joins, re-raises the upload's failure, and
    dequantizes them."""

    def __init__(self, fh: BinaryIO, g: GGUFFile, lay: WeightLayout, arena: torch.Tensor,
                 expected_digest: str | None, ctx: DeviceContext, progress: Progress | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__(name="weights-upload", daemon=True)
        self._args = (fh, g, lay, arena, expected_digest, ctx)
        self._progress, self._chunk_bytes = progress, chunk_bytes
        self.cancel = threading.Event()
        self.deferred: list[Deferred] = []  # the dense slots' raw chunks: ``result`` dequantizes them
        self._stats: LoadStats | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        fh, g, lay, arena, digest, ctx = self._args
        try:
            with torch.no_grad():
                ctx.bind_thread()
                kw = dict(chunk_bytes=self._chunk_bytes, progress=self._progress, cancel=self.cancel,
                          deferred=self.deferred)
                if ctx.dev_mode:
                    self._stats = upload(fh, g, lay, arena, digest, ctx, **kw)  # type: ignore[arg-type]
                else:  # a non-blocking stream of its own: never ordered behind (or into) the engine's work
                    stream = torch.cuda.Stream(device=arena.device)
                    try:
                        with torch.cuda.stream(stream):
                            self._stats = upload(fh, g, lay, arena, digest, ctx, **kw)  # type: ignore[arg-type]
                    finally:  # a failed upload's copies must not land in an arena already freed
                        stream.synchronize()
        except BaseException as exc:  # noqa: BLE001 - re-raised by result() on the loading thread
            self._error = exc

    def result(self) -> LoadStats:
        """Join; then dequantize the dense slots on this (the calling) thread, where every kernel compiles."""
        self.join()
        if self._error is not None:
            raise self._error
        assert self._stats is not None
        dequantize_deferred(self.deferred, self._args[2].dtype)
        self.deferred.clear()
        return self._stats

    def abandon(self) -> None:
        """Stop streaming (the load failed elsewhere) and wait until nothing touches the arena."""
        self.cancel.set()
        self.join()


def _tell(progress: Progress | None, done: int, total: int) -> None:
    """Report progress; a failing observer must not fail the load it observes."""
    if progress is None:
        return
    try:
        progress(done, total)
    except Exception:  # noqa: BLE001 - observation only
        pass

"""The GPU layer's interface as the host sees it, declared once (SPEC 4010-4013, 4400).

The real engine (``engine/api.py``) and the tests' fake engine both satisfy these
Protocols, and the host (lifecycle, HTTP routes) is typed against them alone.
No torch here: the host imports this module. The engine computes a fingerprint
of what is resident; sealing and verifying it is the host's business
(``worker_orcd.residency``), so nothing here knows about handles or seal keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, Protocol

from ..batching.loop import BeforeAdmit, Cancel, LoopObserver
from ..errors import WorkerError
from ..gguf import GGUFFile
from .events import GenerationEnd, SamplingParams, TokenEvent

__all__ = ["EngineLike", "PendingFingerprintLike", "ResidentModelLike", "VramPlanLike"]


class PendingFingerprintLike(Protocol):
    """A fingerprint started on the device (``fingerprint_start``)."""

    def ready(self) -> bool:
        """Whether it has finished, without waiting."""
        ...

    def __call__(self) -> str:
        """Wait for it; the hex checksum (as ``fingerprint()``)."""
        ...


class VramPlanLike(Protocol):
    """What loading a model would need against free device memory (``Engine.plan``)."""

    @property
    def required_bytes(self) -> int: ...
    @property
    def free_bytes(self) -> int: ...
    def as_dict(self) -> dict[str, Any]: ...


class ResidentModelLike(Protocol):
    """A model resident on the device, serving generations; owns its device memory until ``close``."""

    @property
    def max_seq_len(self) -> int: ...
    @property
    def max_batch(self) -> int: ...
    @property
    def gpu_device(self) -> int: ...
    @property
    def seals_per_step(self) -> bool:
        """True: the engine loop runs the host's ``before_admit`` seal check before it admits jobs (SPEC 4121)."""
        ...

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: Cancel = None
    ) -> Iterator[TokenEvent | GenerationEnd]: ...
    def generate_into(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancel: Cancel, sink: Callable[[Any], None]
    ) -> None:
        """``sink`` gets each TokenEvent, then a GenerationEnd or an exception, on the engine's thread.
        If it has a ``flush`` attribute, that is called after each batch of deliveries (a step's):
        a sink may hold tokens until then."""
        ...

    def stats(self) -> dict[str, int]: ...
    def fingerprint(self) -> str:
        """Hex checksum of the resident weight bytes, computed where they live."""
        ...

    def fingerprint_start(self, *, beside_steps: bool = False) -> PendingFingerprintLike:
        """``fingerprint`` started behind the device work already queued, computed beside what is
        queued after it (``beside_steps``: in a bounded share of the GPU, leaving the rest to the
        steps; else as fast as it goes); the result is asked for without waiting (``ready``) or waited for."""
        ...

    def attest(self) -> dict[str, Any]: ...
    def vram_bytes(self) -> int: ...
    def follow(self, before_job: Callable[[], None] | None = None) -> str:
        """A tensor-parallel member (rank > 0): run rank 0's steps until it ends the group; why it ended."""
        ...

    def close(self) -> None: ...


class EngineLike(Protocol):
    """One device and the models loaded on it."""

    def plan(self, gguf: GGUFFile, kv_cache_mb: int | None = None, *, tp_degree: int = 1) -> VramPlanLike:
        """What a load needs; ``tp_degree`` > 1: one rank's share (refused, ModelLoadError, if it cannot split)."""
        ...
    def load(
        self,
        gguf: GGUFFile,
        model_file: BinaryIO,
        *,
        digest: str | None = None,
        on_digest: Callable[[str], None] | None = None,
        name: str = "model",
        kv_cache_mb: int | None = None,
        max_batch: int | None = None,
        prefill_chunk: int | None = None,
        mixed_step_tokens: int | None = None,
        before_admit: BeforeAdmit | None = None,
        observer: LoopObserver | None = None,
        progress: Callable[[int, int], None] | None = None,
        on_fatal: Callable[[WorkerError], None] | None = None,
        seal_check_interval_ms: float = 0.0,
    ) -> ResidentModelLike:
        """Stream ``model_file`` (the open file ``gguf`` was parsed from) onto the device, hashing it
        on the way: against ``digest`` (the host hashed it first), or handing the SHA-256 to
        ``on_digest`` (one-pass load: the host's check, which raises to refuse the model) before
        anything runs on the weights; nothing is sealed here. ``progress(bytes_done,
        bytes_total)`` hears of each uploaded chunk of tensor data; what it raises is ignored.
        ``on_fatal`` hears (on an engine thread) of a failure outside any job (a lost TP peer)."""
        ...

    def abandon_group(self, reason: str) -> bool:
        """A tensor-parallel rank that fails before its load joined the group tells the others why
        (else they wait out the join timeout); False without a group or once joined."""
        ...

    def memory(self) -> dict[str, int]: ...
    def close(self) -> None: ...

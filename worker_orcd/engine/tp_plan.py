"""Tensor parallel (SPEC 4500-4522): who is in the group, and what a shard's shapes are. Torch-free.

The host validates its configuration against these rules and hands the engine a ``TPSpec``; the
engine (``shard.py`` slices, ``tensor_parallel.py`` talks to the peers) never reads host config.

Layout (Megatron-LM, tp_degree T, rank r):

* column-parallel: Q, K, V (and their biases) split by heads: rank r holds query heads
  ``[r*Hq/T, (r+1)*Hq/T)`` and KV heads ``[r*Hk/T, (r+1)*Hk/T)``, so every query head finds its
  KV head (GQA group) on the same rank; gate and up split by rows (``ffn_dim/T`` each).
* row-parallel: O and down split by input columns; each rank's product is a partial sum, and one
  all-reduce (sum) after each makes every rank's residual stream whole again. The archs served
  here have no O/down bias; one would be added once, after the reduce.
* replicated: token embedding, output head, every norm (and Gemma's per-head q/k norms, which
  are [head_dim] and the same for every head). The simplest correct choice: no all-gather of
  vocab-parallel logits; it costs each rank the full embedding and head.

``num_heads % T``, ``num_kv_heads % T`` and ``ffn_dim % T`` must be 0 (no KV-head replication
when T > Hk: refused with a clear error).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ModelLoadError
from .config import ModelConfig

# The NCCL settings the GPU path must pin before init_process_group (not used by gloo): NVLink
# SHARP / multicast (NVLS) off, as the device lender requires; set only where the operator has not.
NCCL_SAFE_ENV: dict[str, str] = {"NCCL_NVLS_ENABLE": "0"}
# gloo on the CPU (development/test mode). On GPUs one group with two backends: NCCL for the CUDA
# tensors (the all-reduces, captured in the decode graphs) and gloo for the CPU ones (rank 0's step
# messages and pings), so a step's description never makes a host-device round trip.
BACKEND_BY_DEVICE: dict[str, str] = {"cpu": "gloo", "cuda": "cpu:gloo,cuda:nccl"}
MAX_TP_DEGREE = 64
MIN_SECRET_BYTES = 16


@dataclass(frozen=True)
class TPSpec:
    """One rank's membership: the group, its members in rank order, the shared secret, the limits."""

    degree: int
    rank: int
    group_id: str
    members: tuple[str, ...]  # worker ids, rank order (from the coordinator)
    master_host: str  # rank 0's rendezvous store
    master_port: int
    secret: bytes = field(repr=False)  # never logged
    timeout_s: float = 60.0  # every collective and every wait for a peer
    join_timeout_s: float = 600.0  # how long rank 0 waits for its members (and a member for rank 0)
    heartbeat_s: float = 1.0  # rank 0 pings the idle group this often (a dead follower is found while idle)

    def __post_init__(self) -> None:
        if not 2 <= self.degree <= MAX_TP_DEGREE:
            raise ValueError(f"tp degree must be in [2, {MAX_TP_DEGREE}], got {self.degree}")
        if not 0 <= self.rank < self.degree:
            raise ValueError(f"tp rank must be in [0, {self.degree}), got {self.rank}")
        if len(self.members) != self.degree:
            raise ValueError(f"the member list names {len(self.members)} workers, tp degree is {self.degree}")
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the group secret must be at least {MIN_SECRET_BYTES} bytes")
        if not 0 < self.heartbeat_s < self.timeout_s:
            raise ValueError("the heartbeat interval must be positive and shorter than the collective timeout")

    @property
    def shard_id(self) -> str:
        """What the sealed handle is called: the group and the shard, so the seal binds both."""
        return tp_shard_id(self.group_id, self.rank, self.degree)


def tp_shard_id(group_id: str, rank: int, degree: int) -> str:
    """The shard id of rank ``rank`` in group ``group_id`` of ``degree`` ranks (inside the seal's HMAC)."""
    return f"{group_id}-shard{rank}of{degree}"


def check_shardable(cfg: ModelConfig, degree: int) -> None:
    """Refuse a model whose heads or FFN width do not split evenly into ``degree`` shards."""
    if degree == 1:
        return
    for what, n in (("num_heads", cfg.n_heads), ("num_kv_heads", cfg.n_kv_heads), ("ffn_dim", cfg.ffn_dim)):
        if n % degree:
            raise ModelLoadError(
                f"tensor parallel over {degree} ranks needs {what} % {degree} == 0; this model has {what}={n} "
                f"(KV heads are split, never replicated: pick a tp degree that divides {cfg.n_kv_heads})"
            )


def shard_config(cfg: ModelConfig, degree: int) -> ModelConfig:
    """The hyper-parameters one shard computes with: 1/T of the heads and of the FFN width.

    ``attn_scale`` is a field, not derived from the head count, so it stays the model's."""
    check_shardable(cfg, degree)
    if degree == 1:
        return cfg
    return dataclasses.replace(
        cfg, n_heads=cfg.n_heads // degree, n_kv_heads=cfg.n_kv_heads // degree, ffn_dim=cfg.ffn_dim // degree
    )

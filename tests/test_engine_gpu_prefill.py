"""Captured prefill graphs (REQUIRE_REAL_GPU=1): a padded bucket replay gives the logits and KV cache
the eager prefill gives, at bucket edges and past the largest bucket (SPEC 4700, 4710)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker_orcd.engine.api import Engine, GenerationEnd, SamplingParams, TokenEvent
from worker_orcd.loader import LoadOptions, validate_model
from worker_orcd.seal import Sealer
from synthetic import synth as _synth

pytestmark = pytest.mark.gpu




@pytest.mark.parametrize("shape", ["tiny-qwen2", "tiny-gemma3"])
def test_worker_4700_graph_prefill_equals_eager(shape: str, tmp_path: Path) -> None:
    path = _synth().write_synthetic_model(tmp_path / f"{shape}.gguf", shape, "F16", seed=7)
    engine = Engine.open("cuda", 0)
    rm = engine.load(validate_model(str(path), LoadOptions(model_root=tmp_path)), shard_id="pf", sealer=Sealer(), kv_cache_mb=64)
    try:
        gen = rm._gen
        assert gen.pf_graphs, "prefill graphs were not captured"
        vocab = rm.config.vocab_size
        g = torch.Generator().manual_seed(1234)
        lengths = [1, 15, 16, 17, 100, gen.pf_max - 1, gen.pf_max, gen.pf_max + 1]  # pf_max + 1: eager
        for n in [n for n in lengths if 0 < n <= rm.max_seq_len]:
            ids = torch.randint(0, vocab, (n,), generator=g).cuda()
            with torch.no_grad():
                graphed = gen.prefill(ids).clone()
                k_graph = rm._kv.k[:, :n].clone()
                eager = gen.model.prefill(ids, 0)
                k_eager = rm._kv.k[:, :n].clone()
            rel = float((graphed - eager).norm() / eager.norm())
            assert torch.isfinite(graphed).all()
            assert rel < 2e-2, f"n={n}: graph vs eager logits rel L2 {rel:.2e}"
            krel = float((k_graph.float() - k_eager.float()).norm() / k_eager.float().norm())
            assert krel < 2e-2, f"n={n}: KV cache rows differ (rel {krel:.2e})"
        # a full request through the graph path is deterministic run to run (SPEC 4710)
        ids = torch.randint(0, vocab, (37,), generator=g).tolist()

        def run() -> list[int]:
            events = list(rm.generate(ids, SamplingParams(max_tokens=12, temperature=0.8, seed=99)))
            assert isinstance(events[-1], GenerationEnd)
            return [e.token_id for e in events if isinstance(e, TokenEvent)]

        first = run()
        assert run() == first and run() == first
    finally:
        rm.close()
        engine.close()

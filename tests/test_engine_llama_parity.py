"""The `llama` architecture against Hugging Face transformers (SPEC 4700; issue 3: llama MUST work).

No real llama GGUF ships with a registry package, so the model is a small
random-weight llama written by benchmarks/synth.py. transformers reads the
same file (undoing the Q/K row permutation llama.cpp's converter applies, which
our engine honours by using the interleaved RoPE pairs), so a wrong rotary
convention, GQA mapping or norm placement shows up as a large logit error.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from worker_orcd.engine.api import Engine
from worker_orcd.loader import LoadOptions, validate_model
from worker_orcd.residency import load_resident
from synthetic import synth as _synth

REL_TOL = 1e-4  # float32 both sides on identical (F16/Q8_0-dequantized) weights: measured ~3e-7




@pytest.mark.parametrize("wtype", ["F16", "Q8_0"])
def test_worker_4700_llama_logits_match_transformers(wtype: str, tmp_path: Path) -> None:
    import accelerate  # noqa: F401 - transformers needs it to read GGUF
    import transformers

    path = _synth().write_synthetic_model(tmp_path / f"tiny-llama-{wtype}.gguf", "tiny-llama", wtype, seed=3)
    engine = Engine.open("cpu")
    rm = load_resident(engine, validate_model(str(path), LoadOptions(model_root=tmp_path)), kv_cache_mb=16)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
        hf.eval()
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
        for n in (1, 7, 40):
            ids = torch.randint(0, rm.config.vocab_size, (n,), generator=g)
            with torch.no_grad():
                ours = rm.runner.prefill_logits(ids.tolist())
                ref = hf(ids[None]).logits[0, -1]
            rel = float((ours - ref).norm() / ref.norm())
            assert rel < REL_TOL, f"n={n}: relative L2 error {rel:.2e} vs transformers"
            top = ref.topk(2).values
            if float(top[0] - top[1]) > 1e-3:
                assert int(ours.argmax()) == int(ref.argmax())
    finally:
        rm.close()
        engine.close()

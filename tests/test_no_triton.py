"""Issue 10, defect 11: the CPU mode runs without Triton (an install without the gpu/test extras).

Each check runs in a fresh interpreter where ``import triton`` fails exactly as on
a host without the package (``sys.modules['triton'] = None``): a tiny synthetic
model loads, seals and generates on the CPU engine, and ``worker-orcd serve
--device cpu`` opens its device, listens, answers /health and exits 0 on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from test_serve_integration import _free_port, write_tokens

REPO = Path(__file__).resolve().parents[1]
BLOCK = "import sys; sys.modules['triton'] = None\n"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
ENV.pop("TRITON_INTERPRET", None)

GENERATE = BLOCK + """
import tempfile
from pathlib import Path
from synthetic import synth
from worker_orcd.engine.api import Engine, SamplingParams
from worker_orcd.loader import LoadOptions, validate_model
from worker_orcd.residency import load_sealed
from worker_orcd.seal import Sealer
d = Path(tempfile.mkdtemp())
p = synth().write_synthetic_model(d / "t.gguf", "tiny-qwen2", "Q4_K_M")
sealed = load_sealed(Engine.open("cpu"), validate_model(str(p), LoadOptions(model_root=d)), shard_id="s", sealer=Sealer(), kv_cache_mb=1)
sealed.verify_seal()
rm = sealed.resident
end = list(rm.generate([1, 2, 3], SamplingParams(max_tokens=3)))[-1]
assert end.tokens_out == 3, end
assert sys.modules["triton"] is None
print("OK")
"""


def test_cpu_engine_loads_seals_and_generates_without_triton() -> None:
    r = subprocess.run([sys.executable, "-c", GENERATE], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]


def test_serve_device_cpu_starts_without_triton(tmp_path: Path) -> None:
    token_file, _, _ = write_tokens(tmp_path)
    port = _free_port()
    args = ["serve", "--worker-id", "no-triton", "--device", "cpu", "--model-root", str(tmp_path), "--port", str(port),
            "--api-token-file", str(token_file), *(["--allow-root"] if os.geteuid() == 0 else [])]
    code = BLOCK + f"from worker_orcd.cli import main; sys.exit(main({args!r}))"
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["state"] == "starting":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "ModuleNotFoundError" not in log.read_text()

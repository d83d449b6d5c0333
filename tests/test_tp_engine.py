"""A tensor-parallel member that dies while rank 0 is idle (no job) is found by the heartbeat (issue 12).

Two real processes on a tiny synthetic model (tests/tp_rank.py): rank 0 must hear TP_GROUP_FAILED
through ``on_fatal`` (what moves the host to ``stopped``) within the collective timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from synthetic import synth
from test_tensor_parallel import ONE_THREAD, _free_port

RANK = Path(__file__).resolve().parent / "tp_rank.py"


def test_tp_member_lost_while_idle_is_fatal_on_rank0(tmp_path: Path) -> None:
    model = synth().write_synthetic_model(tmp_path / "tiny-qwen2.gguf", "tiny-qwen2", "Q8_0")
    port = _free_port()
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(RANK.parents[1])}
    procs = [subprocess.Popen([sys.executable, str(RANK), str(r), str(port), str(model)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        assert procs[1].stdout is not None
        for line in procs[1].stdout:  # after the group formed and both loaded
            if line.strip() == "loaded":
                break
        time.sleep(2)  # idle: only heartbeats flow
        procs[1].kill()
        out, _ = procs[0].communicate(timeout=90)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    last = out.strip().splitlines()[-1]
    assert last.startswith("fatal=True") and "code=TP_GROUP_FAILED" in last, out[-2000:]
    assert float(last.split("after=")[1].split()[0]) < 2 + 5 + 5, last  # kill + heartbeat + timeout

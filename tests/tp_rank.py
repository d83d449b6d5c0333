"""One tensor-parallel rank on a small model, in its own process (tests/test_tp_engine.py runs two).

``python tests/tp_rank.py RANK PORT MODEL``: rank 0 waits (idle) for its group to fail and prints
what ``on_fatal`` heard and after how long; rank 1 follows until it is killed.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from worker_orcd.engine.api import Engine
from worker_orcd.engine.tp_plan import TPSpec
from worker_orcd.errors import WorkerError
from worker_orcd.loader import LoadOptions, validate_model
from worker_orcd.residency import load_resident


def main() -> None:
    rank, port, path = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    spec = TPSpec(2, rank, "g-idle", ("w0", "w1"), "127.0.0.1", port, b"s" * 32, timeout_s=5, join_timeout_s=60)
    v = validate_model(path.name, LoadOptions(model_root=path.parent), None)
    heard: list[WorkerError] = []
    fatal = threading.Event()

    def on_fatal(e: WorkerError) -> None:
        heard.append(e)
        fatal.set()

    m = load_resident(Engine.open("cpu", tp=spec), v, kv_cache_mb=16, on_fatal=on_fatal)
    print("loaded", flush=True)
    if rank == 0:
        t0 = time.monotonic()
        ok = fatal.wait(60)
        print(f"fatal={ok} after={time.monotonic() - t0:.1f} code={heard[0].code.value if heard else None}", flush=True)
    else:
        m.follow()


if __name__ == "__main__":
    main()

"""``python -m worker_orcd``: the same entry point as the ``worker-orcd`` script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())

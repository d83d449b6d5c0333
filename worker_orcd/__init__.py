"""worker-orcd: a sealed, deterministic, VRAM-only GGUF inference worker.

The host layer (everything outside ``worker_orcd.engine``) never imports torch
or triton; ``worker_orcd.engine`` owns every device allocation and kernel.
"""

__version__ = "0.1.0"

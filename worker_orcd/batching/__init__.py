"""Continuous batching, host side (no torch): sequences, KV block bookkeeping, the scheduler and the engine loop.

Follows nano-vllm's split: everything here is bookkeeping and policy in plain
Python; the GPU layer's model runner (``engine/runner.py``) takes one step's
batch as plain lists (``step.StepBatch``) and returns the sampled ids.
"""

"""GPU layer: the only code that imports torch/triton and touches the device (SPEC 4010-4013).

This file deliberately imports nothing, so the host layer can read
``worker_orcd.engine.profile`` (the engine's capabilities, pure data) without
pulling in torch; import the heavy submodules by their full names.
"""

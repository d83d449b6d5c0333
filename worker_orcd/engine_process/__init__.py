"""The engine in a process of its own (issue 8): the worker keeps HTTP, policy and the seal.

``proxy.ProcessEngine`` is the worker's ``EngineLike``; ``child`` runs the real Engine behind a
``channel.Channel``; ``wire`` is what crosses. No torch in the worker's modules here.
"""

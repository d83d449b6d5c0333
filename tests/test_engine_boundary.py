"""SPEC 4010-4013: the GPU layer does not reach into the host, and its interface is declared once.

* No module under ``worker_orcd/engine/`` imports a host module (loader, seal, sources,
  lifecycle, http, ...): the host opens and verifies the file and seals over the
  fingerprint the engine computes (issue 8). Checked on the source with ``ast``, so a
  lazy import inside a function or an ``if TYPE_CHECKING`` block counts too.
* The real engine and the HTTP tests' fake engine both satisfy the Protocols of
  ``engine/interface.py`` member by member, parameters included: the fake cannot
  drift from what the host really calls.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest

from worker_orcd.engine import interface

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "worker_orcd" / "engine"

# What the GPU layer may import from the rest of worker_orcd: plain data and shared mechanics.
ENGINE_MAY_IMPORT = {
    "worker_orcd.engine",  # itself
    "worker_orcd.errors",  # error codes and the WorkerError family
    "worker_orcd.gguf",  # the GGUF reader and its constants (data, no policy)
    "worker_orcd.batching",  # the engine loop and step types the runner implements (torch-free)
    "worker_orcd.capability",  # the ECP dataclass engine/profile.py fills in
}
# Named in issue 8: these must never appear, whatever the list above says later.
HOST_ONLY = ("loader", "seal", "sources", "residency", "lifecycle", "http", "scheduler", "config", "auth", "serve", "cli")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``source``, a module of ``package``; relative
    imports resolved, ``from .. import seal`` read as the module it names."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names]
    return out


def _in(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_import_resolution_catches_every_spelling() -> None:
    """The checker itself: relative, package-relative, absolute and lazy imports all resolve."""
    src = (
        "from ..seal import Sealer\nfrom .. import loader\nimport worker_orcd.sources\n"
        "def f():\n    from ..lifecycle import Worker\nfrom .ops import x\n"
    )
    assert {name for _, name in _imports(src, "worker_orcd.engine")} == {
        "worker_orcd.seal", "worker_orcd.loader", "worker_orcd.sources", "worker_orcd.lifecycle", "worker_orcd.engine.ops",
    }
    assert _imports("from ...http import app\n", "worker_orcd.engine.kernels") == [(1, "worker_orcd.http")]


def test_worker_4010_engine_imports_no_host_module() -> None:
    files = sorted(ENGINE.rglob("*.py"))
    assert ENGINE / "api.py" in files and ENGINE / "kernels" / "rope.py" in files
    leaks = []
    for path in files:
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for line, name in _imports(path.read_text(), package):
            if not _in(name, "worker_orcd"):
                continue
            host_only = any(_in(name, f"worker_orcd.{m}") for m in HOST_ONLY)
            if host_only or not any(_in(name, allowed) for allowed in ENGINE_MAY_IMPORT):
                leaks.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not leaks, "the GPU layer imports host modules:\n" + "\n".join(leaks)


# --- one declaration of the interface, two implementations -------------------------------------


def _members(protocol: type) -> list[str]:
    return sorted(n for n in vars(protocol) if not n.startswith("_"))


def _is_property(cls: type, name: str) -> bool:
    """A property, or a dataclass field (read as an attribute, like the Protocol's property)."""
    if isinstance(inspect.getattr_static(cls, name, None), property):
        return True
    return dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}


def _check_method(impl: Any, proto: Any, where: str) -> list[str]:
    """Every parameter the host may pass exists with the same name and kind; extras have defaults."""
    problems = []
    want = list(inspect.signature(proto).parameters.values())[1:]  # drop self
    have = dict(list(inspect.signature(impl).parameters.items())[1:])
    var_kw = any(p.kind is p.VAR_KEYWORD for p in have.values())
    for p in want:
        q = have.pop(p.name, None)
        if q is None:
            if not (var_kw and p.kind is p.KEYWORD_ONLY):
                problems.append(f"{where}: no parameter {p.name!r}")
            continue
        if q.kind != p.kind:
            problems.append(f"{where}: {p.name!r} is {q.kind.description}, the Protocol says {p.kind.description}")
        if p.default is not p.empty and q.default is q.empty:
            problems.append(f"{where}: {p.name!r} needs a default (the host may leave it out)")
    for q in have.values():
        if q.kind not in (q.VAR_KEYWORD, q.VAR_POSITIONAL) and q.default is q.empty:
            problems.append(f"{where}: extra parameter {q.name!r} has no default (the host never passes it)")
    return problems


def _conformance(cls: type, protocol: type) -> list[str]:
    problems = []
    for name in _members(protocol):
        where = f"{cls.__name__}.{name}"
        declared = inspect.getattr_static(protocol, name)
        if isinstance(declared, property):
            if not _is_property(cls, name):
                problems.append(f"{where}: missing, or not a property/field as {protocol.__name__} declares")
            continue
        impl = inspect.getattr_static(cls, name, None)
        if not callable(impl):
            problems.append(f"{where}: missing method")
            continue
        problems += _check_method(impl, declared, where)
    return problems


def _real_and_fake() -> list[tuple[type, type, type]]:
    pytest.importorskip("torch")
    from test_http_fakes import FakeEngine, FakePlan, FakeResident

    from worker_orcd.engine.api import Engine, ResidentModel
    from worker_orcd.engine.plan import VramPlan

    return [
        (interface.EngineLike, Engine, FakeEngine),
        (interface.ResidentModelLike, ResidentModel, FakeResident),
        (interface.VramPlanLike, VramPlan, FakePlan),
    ]


def test_worker_4400_real_engine_and_fake_satisfy_the_one_interface() -> None:
    problems = []
    for protocol, real, fake in _real_and_fake():
        assert _members(protocol), protocol
        problems += _conformance(real, protocol) + _conformance(fake, protocol)
    assert not problems, "\n".join(problems)


def test_conformance_check_sees_a_drifted_fake() -> None:
    """The check is not vacuous: a missing method, a renamed parameter and a lost default are caught."""

    class Drifted:
        max_seq_len = 1  # a plain class attribute, not a property

        def generate(self, ids: Any, params: Any) -> Any: ...  # no cancel
        def fingerprint(self, fast: bool) -> str: ...  # an extra required parameter

    problems = "\n".join(_conformance(Drifted, interface.ResidentModelLike))
    assert "Drifted.close: missing method" in problems
    assert "Drifted.max_seq_len: missing" in problems
    assert "no parameter 'cancel'" in problems
    assert "extra parameter 'fast'" in problems

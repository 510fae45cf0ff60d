"""The error tree (docs/errors.md): every exception class in one module per side, every reason typed and documented.

The source is scanned with `ast` (nothing is imported but the two error modules), so a new class or reason anywhere in
agent/ or packager/ is found without a test naming it.
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest

import agent.errors as agent_errors
import packager.errors as packager_errors
from agent.errors import (
    PROBATION_REASONS,
    REJECT_REASONS,
    TRANSPORT_REASONS,
    EdgeshipError,
    ProbationReason,
    RejectReason,
    TransportReason,
    reject_reason,
    transport_reason,
)

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "docs" / "errors.md").read_text()
ERROR_MODULES = {"agent/errors.py", "packager/errors.py"}
# Exception classes allowed outside the two modules (docs/errors.md says why): a name and the folder it lives in.
ALLOWED_ELSEWHERE = {
    ("FetchError", "agent/trust"),  # also tuf's DownloadError: agent.errors must not import tuf
}
# Reason-carrying constructors: class name -> the set its reason (keyword `reason` or positional 1) belongs to.
REASON_SETS = {
    "BundleRejected": REJECT_REASONS,
    "TransportError": TRANSPORT_REASONS,
    "FetchError": TRANSPORT_REASONS,
    "ProbationFailed": PROBATION_REASONS,
}


def _sources() -> Iterator[tuple[str, ast.Module]]:
    for package in ("agent", "packager"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            yield rel, ast.parse(path.read_text(), filename=rel)


SOURCES = dict(_sources())


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _exception_classes() -> set[tuple[str, str]]:
    """(class name, file) for every class in agent/ and packager/ that derives from an exception."""
    classes = [(n.name, rel, [_name(b) for b in n.bases])
               for rel, tree in SOURCES.items() for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    known = {name for name, obj in vars(builtins).items() if isinstance(obj, type) and issubclass(obj, BaseException)}
    found: set[tuple[str, str]] = set()
    while True:  # a class is an exception if a base is one: builtin, ours (found so far), or a library's ...Error
        now = {(name, rel) for name, rel, bases in classes
               if any(b in known or b.endswith(("Error", "Exception")) for b in bases)}
        if now == found:
            return found
        found = now
        known |= {name for name, _ in now}


def _constant_strings(node: ast.expr) -> list[str]:
    """The string literals `node` can evaluate to: a constant, or either side of a conditional expression."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _constant_strings(node.body) + _constant_strings(node.orelse)
    return []


def _reasons_used() -> list[tuple[str, str, str]]:
    """(class, reason, where) for every literal reason passed to a reason-carrying constructor."""
    used = []
    for rel, tree in SOURCES.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or _name(node.func) not in REASON_SETS:
                continue
            args = [k.value for k in node.keywords if k.arg == "reason"] + node.args[1:2]
            for arg in args:
                used += [(_name(node.func), r, f"{rel}:{node.lineno}") for r in _constant_strings(arg)]
        for node in ast.walk(tree):  # `reason: RejectReason = "..." if ... else "..."` and the like
            if (isinstance(node, ast.AnnAssign) and node.value is not None
                    and _name(node.annotation) in ("RejectReason", "TransportReason", "ProbationReason")):
                cls = {"RejectReason": "BundleRejected", "TransportReason": "TransportError",
                       "ProbationReason": "ProbationFailed"}[_name(node.annotation)]
                used += [(cls, r, f"{rel}:{node.lineno}") for r in _constant_strings(node.value)]
    return used


def _module_constants() -> dict[str, str]:
    return {t.id: n.value.value for tree in SOURCES.values() for n in tree.body if isinstance(n, ast.Assign)
            and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
            for t in n.targets if isinstance(t, ast.Name)}


# Where the state machine takes a reason: apply(ds, event, reason), Outcome(event, reason) from a step's work.
REASON_POSITION = {"apply": 2, "Outcome": 1}


def _deployment_reasons() -> list[tuple[str, str]]:
    """(reason, where) for every reason passed to the state machine (`apply`, a step's `Outcome`) as a literal, a
    module constant or the fixed start of an f-string, and the fixed reasons `failure_event` returns."""
    constants = _module_constants()
    out = []
    for rel, tree in SOURCES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func) in REASON_POSITION:
                at = REASON_POSITION[_name(node.func)]
                args = node.args[at:at + 1] + [k.value for k in node.keywords if k.arg == "reason"]
                for arg in args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value:
                        out.append((arg.value, f"{rel}:{node.lineno}"))
                    elif isinstance(arg, ast.Name) and arg.id in constants:
                        out.append((constants[arg.id], f"{rel}:{node.lineno}"))
                    elif isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant):
                        head = str(arg.values[0].value).rstrip(": ")
                        if head:
                            out.append((head, f"{rel}:{node.lineno}"))
            if isinstance(node, ast.FunctionDef) and node.name == "failure_event":
                for ret in ast.walk(node):
                    if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Tuple):
                        out += [(r, f"{rel}:{ret.lineno}") for r in _constant_strings(ret.value.elts[1])]
    return out


def test_every_exception_class_is_in_an_errors_module():
    found = _exception_classes()
    names = {name for name, _ in found}
    assert {"BundleRejected", "ServingError", "PackagerError", "RefusedGraph", "_HttpError"} <= names  # sanity
    stray = {(name, rel) for name, rel in found
             if rel not in ERROR_MODULES and not name.startswith("_")
             and not any(name == n and rel.startswith(folder + "/") for n, folder in ALLOWED_ELSEWHERE)}
    assert not stray, f"define these in agent/errors.py or packager/errors.py (docs/errors.md): {stray}"


def test_every_error_class_is_in_the_tree_and_documented():
    classes = [obj for module in (agent_errors, packager_errors) for obj in vars(module).values()
               if isinstance(obj, type) and issubclass(obj, BaseException)]
    assert len(classes) > 20
    for cls in classes:
        assert issubclass(cls, EdgeshipError) or cls.__name__ in ("RefusedPickle", "RefusedGraph"), cls
        assert re.search(rf"\b{cls.__name__}\b", DOCS), f"{cls.__name__} is not in docs/errors.md"
    for name, _folder in ALLOWED_ELSEWHERE:
        assert re.search(rf"\b{name}\b", DOCS), f"{name} is not in docs/errors.md"


def test_every_literal_reason_used_is_in_its_typed_set():
    used = _reasons_used()
    assert len(used) > 40  # the scan does see the code's reasons
    wrong = [(cls, r, where) for cls, r, where in used if r not in REASON_SETS[cls]]
    assert not wrong, f"reasons missing from their Literal in agent/errors.py: {wrong}"


@pytest.mark.parametrize("alias", [RejectReason, TransportReason, ProbationReason],
                         ids=["RejectReason", "TransportReason", "ProbationReason"])
def test_every_typed_reason_is_documented(alias):
    for reason in get_args(alias):
        assert f"| `{reason}` |" in DOCS, f"reason {reason!r} has no row in docs/errors.md"


def test_every_deployment_reason_is_documented():
    reasons = _deployment_reasons()
    assert {"no_deployment", "crash_loop", "clean_stop", "check_failed", "runtime_unavailable"} <= {
        r for r, _ in reasons}  # sanity: the scan sees the state machine and the steps
    missing = [(r, where) for r, where in reasons if f"`{r}" not in DOCS]
    assert not missing, f"deployment reasons missing from docs/errors.md: {missing}"


def test_reason_sets_are_the_literals():
    assert set(get_args(RejectReason)) == REJECT_REASONS
    assert set(get_args(TransportReason)) == TRANSPORT_REASONS
    assert set(get_args(ProbationReason)) == PROBATION_REASONS


@pytest.mark.parametrize(("value", "expected"), [
    ("hash_mismatch", "hash_mismatch"), ("superseded", "superseded"), ("", "invalid"), ("no such reason", "invalid"),
    (None, "invalid"), (3, "invalid"), ("timeout", "invalid"),  # a transport reason is no rejection reason
])
def test_reject_reason_at_the_data_boundary(value, expected):
    assert reject_reason(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("no_space", "no_space"), ("not_found", "not_found"), ("", "transport"), ("manifest", "transport"),
    (["timeout"], "transport"),
])
def test_transport_reason_at_the_data_boundary(value, expected):
    assert transport_reason(value) == expected
    assert transport_reason(value, default="fetch_worker") == (expected if expected != "transport" else "fetch_worker")

"""Decide, without unpickling anything, whether the pickles in a torch model file could import or call code.

torch 2.13's `torch.export.load` unpickles sample inputs, constants and weights with `weights_only=False` (or
falls back to it), `pickle.loads`es "opaque" constants and reads pre-2.7 `serialized_*` entries the same way, so
its own loading is no defence. This module reads the zip itself, works out every entry torch could unpickle, and
walks each pickle's opcodes (`pickletools.genops`) with a small symbolic stack: a pickle may import only the
globals a genuine torch 2.13 file contains, call only the allowed ones, and must be well formed to its end.
Anything else is refused before torch sees the file. Pure: stdlib only, no torch.
"""

from __future__ import annotations

import io
import json
import pickletools
import posixpath
import re
import zipfile
from dataclasses import dataclass
from typing import cast

from packager.errors import RefusedPickle

ZIP_MAGIC = b"PK\x03\x04"  # what torch.load checks to choose its zip reader


# Storage types appear inside persistent ids (`('storage', torch.FloatStorage, key, location, numel)`), never called.
_STORAGES = frozenset(f"torch.{t}Storage" for t in (
    "Bool", "Byte", "Char", "Short", "Int", "Long", "Half", "Float", "Double", "BFloat16", "ComplexFloat",
    "ComplexDouble"))


@dataclass(frozen=True)
class Policy:
    """What one kind of pickle may name: `callables` for REDUCE, `classes` (or `class_prefix`) for NEWOBJ/BUILD,
    `values` only referenced."""

    name: str
    callables: frozenset[str]
    values: frozenset[str] = _STORAGES
    classes: frozenset[str] = frozenset()
    class_prefix: str | None = None

    def importable(self, qualname: str) -> bool:
        return (qualname in self.callables or qualname in self.values or qualname in self.classes
                or self.is_class(qualname))

    def is_class(self, qualname: str) -> bool:
        return qualname in self.classes or (self.class_prefix is not None and qualname.startswith(self.class_prefix))


# What torch.save writes for tensors, parameters and state_dicts (a subset of torch's weights_only allow-list).
TORCH_SAVE = Policy("torch.save", frozenset({
    "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "collections.OrderedDict"}))

# TorchScript's data.pkl/constants.pkl/*.debug_pkl, read by torch's C++ unpickler: module objects are classes
# compiled from the archive's own TorchScript code (`__torch__.*`), lists come from torch.jit._pickle.
TORCHSCRIPT = Policy("TorchScript", frozenset({
    "torch._utils._rebuild_tensor_v2", "collections.OrderedDict",
    *(f"torch.jit._pickle.{f}" for f in ("build_intlist", "build_tensorlist", "build_doublelist",
                                         "build_boollist", "build_tensor_from_id", "restore_type_tag"))}),
    class_prefix="__torch__.")


@dataclass(frozen=True)
class _Global:
    qualname: str


class _Made:
    """An object an allowed callable or class produced (a tensor, an OrderedDict, a TorchScript module)."""


_MARK = object()
_OTHER = object()  # numbers, containers, persistent storages: anything that is neither a name nor a global
_MADE = _Made()
_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                         "BINUNICODE8"})
# Never in a torch file; each imports or calls by itself (EXT* reach copyreg's registry, INST/OBJ call a class,
# PERSID passes text to persistent_load).
_REFUSED_OPS = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "NEXT_BUFFER", "READONLY_BUFFER"})
_MUTATING_OPS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"})


def check_pickle(data: bytes, policy: Policy, entry: str, start: int = 0) -> int:
    """Check one pickle starting at `start`; return the offset just past its STOP. Raises RefusedPickle."""

    def refuse(why: str) -> RefusedPickle:
        return RefusedPickle(f"{entry}: {why} (only tensors and plain containers are loaded)")

    stream = io.BytesIO(data)
    stream.seek(start)
    stack: list[object] = []
    memo: dict[int, object] = {}
    try:
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name in _REFUSED_OPS:
                raise refuse(f"pickle opcode {name}")
            if name in ("GLOBAL", "STACK_GLOBAL"):
                if name == "GLOBAL":
                    module, _, attr = str(arg).partition(" ")
                else:
                    module, attr = stack[-2], stack[-1]  # type: ignore[assignment]
                    if not isinstance(module, str) or not isinstance(attr, str):
                        raise refuse("pickle imports a computed name")
                    del stack[-2:]
                qualname = f"{module}.{attr}"
                if "." in attr or not policy.importable(qualname):  # attr paths would resolve past the check
                    raise refuse(f"pickle imports {qualname}")
                stack.append(_Global(qualname))
                continue
            if name == "REDUCE":
                target = stack[-2]
                if not (isinstance(target, _Global) and target.qualname in policy.callables):
                    raise refuse(f"pickle calls {_describe(target)}")
                del stack[-2:]
                stack.append(_MADE)
                continue
            if name in ("NEWOBJ", "NEWOBJ_EX"):
                target = stack[-2 if name == "NEWOBJ" else -3]
                if not (isinstance(target, _Global) and policy.is_class(target.qualname)):
                    raise refuse(f"pickle instantiates {_describe(target)}")
                del stack[-2 if name == "NEWOBJ" else -3:]
                stack.append(_MADE)
                continue
            if name == "BUILD":  # __setstate__ or attribute updates: only on what an allowed call made
                if stack[-2] is not _MADE:
                    raise refuse(f"pickle sets the state of {_describe(stack[-2])}")
                del stack[-1]
                continue
            if name == "BINPERSID":  # torch's persistent_load: ('storage', <storage type>, key, location, numel)
                stack[-1] = _OTHER
                continue
            if name in _MUTATING_OPS:
                _pop_for(op, stack, keep_target=True)
                if isinstance(stack[-1], _Global):
                    raise refuse(f"pickle modifies {stack[-1].qualname}")
                continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[cast(int, arg)] = _top(stack)
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = _top(stack)
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[cast(int, arg)])
                continue
            if name == "DUP":
                stack.append(_top(stack))
                continue
            if name == "STOP":
                if len(stack) != 1:
                    raise refuse("malformed pickle (stack at STOP)")
                return stream.tell()
            if name in _STRING_OPS:
                value = arg.decode("latin-1") if isinstance(arg, bytes) else arg
                stack.append(value)
                continue
            _pop_for(op, stack, keep_target=False)
            if name == "MARK":
                stack.append(_MARK)
            else:
                stack.extend(_OTHER for _ in op.stack_after)
    except RefusedPickle:
        raise
    except (ValueError, IndexError, KeyError) as e:  # truncated data, bad opcode, stack underflow, unknown memo key
        raise refuse(f"malformed pickle ({e})") from e
    raise refuse("malformed pickle (no STOP)")


def _top(stack: list[object]) -> object:
    if not stack or stack[-1] is _MARK:
        raise IndexError("stack underflow")
    return stack[-1]


def _pop_for(op: pickletools.OpcodeInfo, stack: list[object], keep_target: bool) -> None:
    """Pop what `op` consumes, as pickletools.dis does; keep_target leaves the container a mutating op updates."""
    before = op.stack_before
    if pickletools.markobject in before:
        while stack[-1] is not _MARK:
            stack.pop()
        stack.pop()
        below = before.index(pickletools.markobject)
        if below and not keep_target:
            del stack[-below:]
        if below and stack[-1] is _MARK:
            raise IndexError("container missing below MARK")
        return
    count = len(before) - (1 if keep_target else 0)
    if count > len(stack) or any(item is _MARK for item in stack[len(stack) - count:]):
        raise IndexError("stack underflow")
    if count:
        del stack[-count:]
    if keep_target and not stack:
        raise IndexError("stack underflow")


def _describe(value: object) -> str:
    return value.qualname if isinstance(value, _Global) else "a computed object"


def check_pickle_stream(data: bytes, policy: Policy, entry: str) -> None:
    """Check bytes that torch.load (non-zip) or pickle.loads could read: one or more pickles up to the very end."""
    if not data:
        return
    pos = 0
    while pos < len(data):
        pos = check_pickle(data, policy, entry, pos)


# --- archives ------------------------------------------------------------------------------------------------

def _read_entries(zf: zipfile.ZipFile, label: str) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    seen: set[str] = set()
    for info in infos:
        # torch's zip reader looks names up case-insensitively: two entries that differ only in case are
        # ambiguous (one could be checked, the other loaded).
        key = info.filename.casefold()
        if key in seen:
            raise RefusedPickle(f"{label}: two entries named {info.filename!r} (ignoring case)")
        seen.add(key)
        if info.flag_bits & 0x1:
            raise RefusedPickle(f"{label}: {info.filename}: encrypted entry")
    return infos


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, label: str) -> bytes:
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, NotImplementedError, OSError, RuntimeError, EOFError) as e:
        raise RefusedPickle(f"{label}: {info.filename}: unreadable zip entry ({e})") from e


def _rel(name: str) -> str:
    """An entry's name below the archive's root folder (torch prefixes every record name with it)."""
    return name.split("/", 1)[1] if "/" in name else name


def check_torch_save_zip(data: bytes, entry: str) -> None:
    """A torch.save zip archive, as torch.load reads it: data.pkl is unpickled, data/<key> records are raw."""
    label = entry
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise RefusedPickle(f"{label}: not a readable zip archive ({e})") from e
    with zf:
        infos = _read_entries(zf, label)
        for info in infos:
            rel = _rel(info.filename).casefold()
            if rel == "constants.pkl" or rel.startswith("code/"):
                # torch.load hands an archive with constants.pkl to torch.jit.load
                raise RefusedPickle(f"{label}: holds a TorchScript archive")
            if rel.endswith(".pkl"):
                check_pickle_stream(_read(zf, info, label), TORCH_SAVE, f"{entry}/{_rel(info.filename)}")


# Entries of a .pt2 that torch only reads as text or JSON, never through torch.load/pickle (unless a payload
# config points a pickled payload at them: then they are checked like any other).
_PT2_TEXT = frozenset({"archive_format", "archive_version", "byteorder", "version", ".data/version",
                       ".data/serialization_id", ".format_version", ".storage_alignment",
                       "serialized_exported_program.json"})
_PT2_JSON = re.compile(r"^(models/[^/]+\.json|data/(weights/[^/]+_weights|constants/[^/]+_constants)_config\.json"
                       r"|extra/.+|extra_files/.+)$")
_PT2_CONFIG = re.compile(r"^data/(weights|constants)/[^/]+_(weights|constants)_config\.json$")
# AOTInductor packages load compiled shared libraries; the others are runtimes this packager never uses.
_PT2_REFUSED_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")


def check_pt2(data: bytes, label: str) -> None:
    """Refuse a torch.export .pt2 if anything torch.export.load could unpickle might import or call code.

    Raw tensor payloads (config `use_pickle: false`) and text entries are skipped; every other entry is either a
    torch.save zip whose data.pkl is checked or a stream of pickles checked to its last byte.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise RefusedPickle(f"{label}: not a readable zip archive ({e})") from e
    with zf:
        infos = _read_entries(zf, label)
        pickled: set[str] = set()
        raw: set[str] = set()
        for info in infos:
            rel = _rel(info.filename)
            if any(rel.casefold().startswith(d) for d in _PT2_REFUSED_DIRS):
                raise RefusedPickle(f"{info.filename}: compiled or foreign payload in a .pt2 (only exported "
                                    "programs are loaded)")
            match = _PT2_CONFIG.match(rel)
            if match:
                _payloads(_read(zf, info, label), match.group(1), info.filename, pickled, raw)
        for info in infos:
            rel = _rel(info.filename)
            key = rel.casefold()
            if key not in pickled and (key in raw or key in _PT2_TEXT or _PT2_JSON.match(rel)):
                continue
            body = _read(zf, info, label)
            if body.startswith(ZIP_MAGIC):
                check_torch_save_zip(body, info.filename)
            else:
                check_pickle_stream(body, TORCH_SAVE, info.filename)


def _payloads(config: bytes, kind: str, entry: str, pickled: set[str], raw: set[str]) -> None:
    """Sort the records a weights/constants payload config names into pickled and raw (casefolded rel names)."""
    try:
        payloads = json.loads(config)["config"]
        items = list(payloads.items())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RefusedPickle(f"{entry}: unreadable payload config ({e})") from e
    for fqn, meta in items:
        path_name = meta.get("path_name") if isinstance(meta, dict) else None
        if not isinstance(path_name, str):
            raise RefusedPickle(f"{entry}: {fqn}: payload without a path_name")
        name = posixpath.join(f"data/{kind}/", path_name).casefold()  # as torch joins it (os.path.join)
        # torch unpickles use_pickle payloads, and constants that are not plain tensors (custom/opaque objects)
        if meta.get("use_pickle") or (kind == "constants" and not path_name.startswith("tensor_")):
            pickled.add(name)
        else:
            raw.add(name)


def check_torchscript(data: bytes, label: str) -> None:
    """Refuse a TorchScript archive whose pickles (data.pkl, constants.pkl, *.debug_pkl) name anything but
    tensors, containers and the archive's own TorchScript classes."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise RefusedPickle(f"{label}: not a readable zip archive ({e})") from e
    with zf:
        for info in _read_entries(zf, label):
            if info.filename.casefold().endswith("pkl"):  # data.pkl, constants.pkl, *.debug_pkl
                check_pickle_stream(_read(zf, info, label), TORCHSCRIPT, info.filename)


def check_state_dict(data: bytes, label: str) -> None:
    """A `--weights` file: a torch.save zip whose data.pkl holds only tensors and containers."""
    if not data.startswith(ZIP_MAGIC):
        raise RefusedPickle(f"{label}: not a torch.save zip archive (the pre-1.6 format is not read)")
    check_torch_save_zip(data, label)

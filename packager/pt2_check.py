"""Refuse a .pt2 whose exported-program JSON would make torch run code it did not write. Pure: stdlib only.

torch 2.13's `torch.export.load` reads `models/<name>.json` (or the pre-2.7 `serialized_exported_program.json`)
and, from that text alone:
- passes every `expr_str` (symbolic shapes) to `sympy.sympify`, which evaluates Python;
- resolves node targets, `as_operator` arguments and `source_fn_stack` metadata by `getattr` from `torch`,
  `_operator` or `math` (`torch.os.system` resolves, and a callable becomes a graph node run with the model);
- `exec`s `guards_code` and placeholder names/values in the code it generates for `ep.module()`;
- decodes `in_spec`/`out_spec` pytree contexts, which may `importlib.import_module` an enum or defaultdict factory.
Each such field must look exactly like what torch's own serializer writes (checked with Python's tokenizer and a
small grammar); anything else is refused before torch sees the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tokenize
import zipfile
from collections.abc import Callable

from packager.errors import RefusedGraph

_Refuse = Callable[[str], RefusedGraph]


_MAX_EXPR = 10_000  # characters; genuine expressions are a few hundred at most
_MAX_DEPTH = 200   # JSON and parenthesis nesting

# Names sympify resolves in torch's expressions: srepr's class names (Add, Mul, Symbol(...) ...), sympy's own
# functions torch emits, and the torch functions torch passes to sympify as locals (serialize.py sympy_functions).
_SYMPY_FUNCS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "floor", "ceiling", "Mod",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan",
    "LessThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair",
    "NegativeOne", "One", "Zero", "Half", "IntInfinity", "NegativeIntInfinity", "Infinity", "NegativeInfinity",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity"})
_SYMPY_CONSTANTS = frozenset({"True", "False", "true", "false", "oo", "zoo", "nan", "int_oo"})
# Assumption keywords srepr writes (`Symbol('s0', integer=True, positive=True)`), and Float's precision.
_SYMPY_KEYWORDS = frozenset({"integer", "positive", "nonnegative", "negative", "nonpositive", "real", "finite",
                             "infinite", "nonzero", "zero", "extended_real", "rational", "precision"})
_SYMBOL = re.compile(r"^[a-z]{1,4}[0-9]+$")  # s0, u3, zuf0, ...: torch's SymT prefixes plus a number
_NUMBER = re.compile(r"^[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?$")
_STRING_ARG = re.compile(r"^'([a-z]{1,4}[0-9]+|-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?)'$")
_EXPR_OPS = frozenset({"(", ")", ",", "+", "-", "*", "/", "//", "%", "**", "="})

# guards_code: Python torch generates and exec's, e.g. "L['x'].size()[0] == L['y'].size()[0]".
_GUARD_NAMES = frozenset({"L", "and", "or", "not", "True", "False", "max", "min", "abs", "math"})
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset"})
_GUARD_MATH = frozenset({"floor", "ceil", "trunc", "sqrt"})
_GUARD_OPS = frozenset({"(", ")", "[", "]", ",", ".", "+", "-", "*", "/", "//", "%", "**",
                        "==", "!=", "<=", ">=", "<", ">"})
_GUARD_KEY = re.compile(r"^'[A-Za-z_][A-Za-z0-9_]*'$")

# Node targets torch resolves to real operators. `torch.ops.<ns>.<op>.<overload>` for the namespaces genuine
# exports use, the higher-order ops, and the symbolic-int functions torch's serializer writes (_SYM_OPS).
_OP_NAMESPACES = ("aten", "prims", "quantized_decomposed", "quantized")
_OP = re.compile(r"^torch\.ops\.(?P<ns>[a-z_]+)\.(?P<op>[A-Za-z_][A-Za-z0-9_]*)(\.(?P<ovl>[A-Za-z][A-Za-z0-9_]*))?$")
# attributes of torch's OpNamespace/OpOverloadPacket objects that are not operators
_NOT_OPS = frozenset({"name", "op", "overloads", "default_overload"})
_SYM_TARGETS = frozenset({
    *(f"_operator.{f}" for f in ("eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub",
                                 "floordiv", "mod", "pow", "truediv", "and_", "or_", "lshift", "rshift",
                                 "getitem")),
    "math.trunc", "torch.sym_not", "torch.sym_int", "torch.sym_float", "torch.sym_ite", "torch.sym_max",
    "torch.sym_min", "torch._sym_sqrt", "torch.sym_sqrt"})
# source_fn_stack metadata (stored, not called): also the nn.Module classes and functions torch names there.
_SOURCE_FN = re.compile(r"^torch\.(nn\.modules\.[a-z_]+\.[A-Z][A-Za-z0-9]*|nn\.functional\.[a-z][a-z0-9_]*"
                        r"|[a-z][a-z0-9_]*)$")

# Names that end up in code torch generates (placeholders, get_attr paths, kwargs): plain dotted identifiers.
_NAME = re.compile(r"^([A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*)?$")
_NAME_KEYS = frozenset({"name", "as_name", "user_input_name", "parameter_name", "buffer_name",
                        "tensor_constant_name", "custom_obj_name", "fqn", "forward_arg_names"})
# A placeholder's string value is pasted into the guard code as '<value>'.
_PLAIN_STRING = re.compile(r"^[A-Za-z0-9_ .:+-]*$")
_INT_KEYS = frozenset({"as_int", "min_val", "max_val"})
_CHECKED_KEYS = frozenset({"expr_str", "in_spec", "out_spec", "guards_code", "as_float", "as_bool", *_INT_KEYS})


def is_graph_entry(rel: str) -> bool:
    """Entries torch.export.load deserializes as an exported program (rel: below the archive's root folder)."""
    key = rel.casefold()
    return key.startswith("models/") or key == "serialized_exported_program.json"


def check_pt2_graphs(data: bytes, label: str) -> None:
    """Check every exported-program JSON in a .pt2 (run after pickle_scan.check_pt2 has vetted the archive)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise RefusedGraph(f"{label}: not a readable zip archive ({e})") from e
    with zf:
        for info in zf.infolist():
            rel = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
            if is_graph_entry(rel) or is_graph_entry(info.filename):
                try:
                    body = zf.read(info)
                except (zipfile.BadZipFile, NotImplementedError, OSError, RuntimeError, EOFError) as e:
                    raise RefusedGraph(f"{info.filename}: unreadable zip entry ({e})") from e
                check_graph_json(body, info.filename)


def check_graph_json(data: bytes, entry: str) -> None:
    """Refuse an exported-program JSON holding anything torch would run as code. Raises RefusedGraph."""

    def refuse(why: str) -> RefusedGraph:
        return RefusedGraph(f"{entry}: {why} (only what torch's own serializer writes is loaded)")

    try:
        program = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise refuse(f"not a readable exported program ({e})") from e
    if not isinstance(program, dict):
        raise refuse("not an exported program")
    _walk(program, None, refuse, 0)


def _walk(value: object, key: str | None, refuse: _Refuse, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise refuse("nested too deeply")
    if key in _CHECKED_KEYS:  # whatever its JSON type: a list or object where torch expects text is refused too
        _check_field(key, value, refuse)
    elif isinstance(value, dict):
        _check_dict(value, refuse)
        for k, v in value.items():
            _walk(v, k, refuse, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _walk(v, key, refuse, depth + 1)
    elif key in _NAME_KEYS:
        _check_name(key, value, refuse)


def _check_dict(d: dict[str, object], refuse: _Refuse) -> None:
    if "target" in d and "inputs" in d and "outputs" in d:  # a graph node
        check_target(d["target"], refuse)
    if "as_operator" in d:
        check_target(d["as_operator"], refuse)
    inputs = d.get("inputs")
    if "nodes" in d and isinstance(inputs, list):  # a graph: its placeholders' constant values
        for arg in inputs:
            text = arg.get("as_string") if isinstance(arg, dict) else None
            if text is not None and not (isinstance(text, str) and _PLAIN_STRING.match(text)):
                raise refuse(f"graph input string {text!r}")
    metadata = d.get("metadata")
    if isinstance(metadata, dict) and "source_fn_stack" in metadata:
        stack = metadata["source_fn_stack"]
        if not isinstance(stack, str):
            raise refuse("source_fn_stack is not text")
        for item in stack.split(";"):
            _, _, target = item.partition(",")
            if not (_SOURCE_FN.match(target) or _is_operator(target)):
                raise refuse(f"source_fn_stack names {target!r}")


def _check_field(key: str, value: object, refuse: _Refuse) -> None:
    if key == "expr_str":
        check_sym_expr(value, refuse)
    elif key in ("in_spec", "out_spec"):
        check_treespec(value, refuse)
    elif key == "guards_code":
        if not isinstance(value, list):
            raise refuse("guards_code is not a list")
        for guard in value:
            check_guard(guard, refuse)
    elif key in _INT_KEYS and not (value is None or (isinstance(value, int) and not isinstance(value, bool))):
        raise refuse(f"{key} {value!r} is not an integer")
    elif key == "as_float" and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise refuse(f"{key} {value!r} is not a number")
    elif key == "as_bool" and not isinstance(value, bool):
        raise refuse(f"{key} {value!r} is not a boolean")


def _check_name(key: str, value: object, refuse: _Refuse) -> None:
    if value is not None and not (isinstance(value, str) and _NAME.match(value)):
        raise refuse(f"{key} {value!r} is not a plain name")


def _is_operator(target: str) -> bool:
    if target in _SYM_TARGETS:
        return True
    match = _OP.match(target)
    if not match:
        return False
    ns, op, ovl = match.group("ns"), match.group("op"), match.group("ovl")
    if op.startswith("__") or op in _NOT_OPS or (ovl is not None and ovl in _NOT_OPS):
        return False
    if ns == "higher_order":  # torch.ops.higher_order.cond, .while_loop, ...: no overload
        return ovl is None and not op.startswith("_")
    return ns in _OP_NAMESPACES and ovl is not None


def check_target(target: object, refuse: _Refuse) -> None:
    """A node's call target or an operator argument: torch's operators only, never a path through torch."""
    if not isinstance(target, str) or not _is_operator(target):
        raise refuse(f"node target {target!r} is not an allowed operator")


def _tokens(text: str, refuse: _Refuse, what: str) -> list[tokenize.TokenInfo]:
    if len(text) > _MAX_EXPR or not text.isascii() or not text.isprintable() or "\\" in text:
        raise refuse(f"{what} {text[:80]!r}")
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError) as e:  # IndentationError is a SyntaxError
        raise refuse(f"{what} {text[:80]!r} ({e})") from e
    body = [t for t in toks if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    depth = 0
    for t in body:
        if t.type == tokenize.OP and t.string in "([":
            depth += 1
            if depth > _MAX_DEPTH:
                raise refuse(f"{what} nested too deeply")
        elif t.type == tokenize.OP and t.string in ")]":
            depth -= 1
    return body


def check_sym_expr(expr: object, refuse: _Refuse) -> None:
    """A symbolic shape expression as torch writes it (sympy srepr over torch's sympy functions)."""
    if not isinstance(expr, str):
        raise refuse(f"symbolic expression {expr!r} is not text")
    what = "symbolic expression"
    toks = _tokens(expr, refuse, what)
    if not toks:
        raise refuse(f"{what} is empty")
    for i, t in enumerate(toks):
        prev = toks[i - 1].string if i else ""
        nxt = toks[i + 1].string if i + 1 < len(toks) else ""
        ok = False
        if t.type == tokenize.NAME:
            if nxt == "(":
                ok = t.string in _SYMPY_FUNCS
            elif nxt == "=":
                ok = t.string in _SYMPY_KEYWORDS and prev in ("(", ",")
            else:
                ok = t.string in _SYMPY_CONSTANTS or bool(_SYMBOL.match(t.string))
        elif t.type == tokenize.NUMBER:
            ok = bool(_NUMBER.match(t.string))
        elif t.type == tokenize.STRING:  # Symbol('s0', ...), Float('1.5', precision=53): first argument only
            ok = bool(_STRING_ARG.match(t.string)) and prev == "(" and i >= 2 and \
                toks[i - 2].string in ("Symbol", "Float", "Rational", "Integer")
        elif t.type == tokenize.OP:
            ok = t.string in _EXPR_OPS and (t.string != "=" or (prev in _SYMPY_KEYWORDS))
        if not ok:
            raise refuse(f"{what} {expr[:80]!r}: {t.string!r} is not allowed")


def check_guard(guard: object, refuse: _Refuse) -> None:
    """One guards_code line: comparisons of input sizes, as torch writes them (it is exec'd by ep.module())."""
    if not isinstance(guard, str):
        raise refuse(f"guard {guard!r} is not text")
    what = "guard"
    toks = _tokens(guard, refuse, what)
    for i, t in enumerate(toks):
        prev = toks[i - 1].string if i else ""
        nxt = toks[i + 1].string if i + 1 < len(toks) else ""
        ok = False
        if t.type == tokenize.NAME:
            if prev == ".":
                before = toks[i - 2].string if i >= 2 else ""
                ok = (t.string in _GUARD_METHODS and before in (")", "]")) or \
                     (t.string in _GUARD_MATH and before == "math")
            elif t.string == "math":
                ok = nxt == "."
            elif t.string == "L":
                ok = nxt == "["
            else:
                ok = t.string in _GUARD_NAMES
        elif t.type == tokenize.NUMBER:
            ok = bool(_NUMBER.match(t.string))
        elif t.type == tokenize.STRING:
            ok = bool(_GUARD_KEY.match(t.string)) and prev == "[" and nxt == "]"
        elif t.type == tokenize.OP:
            ok = t.string in _GUARD_OPS
        if not ok:
            raise refuse(f"{what} {guard[:80]!r}: {t.string!r} is not allowed")


_SAFE_SPEC_TYPES_REFUSED = frozenset({"collections.defaultdict"})  # its context names a module to import


def check_treespec(spec: object, refuse: _Refuse) -> None:
    """An in_spec/out_spec pytree spec: no type whose context imports (defaultdict), no enum in any context."""
    if not isinstance(spec, str):
        raise refuse("pytree spec is not text")
    try:
        decoded = json.loads(spec)
    except (ValueError, RecursionError) as e:
        raise refuse(f"unreadable pytree spec ({e})") from e
    todo: list[tuple[object, int]] = [(decoded, 0)]
    while todo:
        node, depth = todo.pop()
        if depth > _MAX_DEPTH:
            raise refuse("pytree spec nested too deeply")
        if isinstance(node, dict):
            if "__enum__" in node:  # torch's enum hook imports the module the spec names
                raise refuse("pytree spec imports an enum")
            if node.get("type") in _SAFE_SPEC_TYPES_REFUSED:
                raise refuse(f"pytree spec type {node.get('type')}")
            context = node.get("context")
            if isinstance(context, str):
                # not JSON: torch's json.loads fails the same way and imports nothing
                with contextlib.suppress(ValueError, RecursionError):
                    todo.append((json.loads(context), depth + 1))
            todo.extend((v, depth + 1) for k, v in node.items() if k != "context")
        elif isinstance(node, list):
            todo.extend((v, depth + 1) for v in node)

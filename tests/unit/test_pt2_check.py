"""packager.pt2_check: which exported-program JSON fields torch would evaluate, import or exec are refused."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from packager.errors import RefusedGraph
from packager.pt2_check import check_graph_json, check_pt2_graphs

SYM = "Symbol('s77', positive=True, integer=True)"
# Expressions and guards from genuine torch 2.13 exports (the examples' dynamic batch and sequence dimensions).
GENUINE_EXPRS = [
    SYM, "Mul(Integer(1024), Symbol('s53', positive=True, integer=True))",
    "Mul(Integer(4), Pow(Symbol('s53', positive=True, integer=True), Integer(2)))",
    "Add(floor(Mul(Rational(1, 2), Symbol('s0', integer=True, positive=True))), Max(Integer(3), "
    "Symbol('u0', integer=True)))",
    "FloorDiv(Symbol('s0', integer=True, positive=True), Integer(2))", "Float('1.5', precision=53)",
    "s0 + 2*s1 - (s0 // 2) % 3 ** 2", "Min(s0, IntInfinity())",
]
GENUINE_GUARDS = ["L['input_ids'].size()[1] == L['attention_mask'].size()[1]",
                  "L['x'].size()[0] >= 2 and 2*L['x'].size()[0] + 1 <= 100", "math.floor(L['x'].stride()[0]) != 0"]


def _program(exprs: list[str] | None = None, target: str = "torch.ops.aten.linear.default",
             guards: list[str] | None = None, **extra: object) -> dict:
    exprs = exprs if exprs is not None else [SYM]
    return {
        "graph_module": {
            "graph": {
                "inputs": [{"as_tensor": {"name": "x"}}],
                "nodes": [{"target": target, "name": "linear",
                           "inputs": [{"name": "input", "arg": {"as_tensor": {"name": "x"}}, "kind": 1}],
                           "outputs": [{"as_tensor": {"name": "linear"}}],
                           "metadata": {"stack_trace": "File x", "torch_fn": "linear_1;builtin.linear"}}],
                "outputs": [{"as_tensor": {"name": "linear"}}],
                "tensor_values": {"x": {"sizes": [{"as_expr": {"expr_str": e, "hint": None}} for e in exprs]}},
            },
            "signature": {"input_specs": [{"parameter": {"arg": {"name": "p_lin_weight"},
                                                         "parameter_name": "lin.weight"}}]},
            "module_call_graph": [{"fqn": "", "signature": {
                "in_spec": '[1, {"type": "builtins.tuple", "context": "null", "children_spec": []}]',
                "out_spec": '[1, {"type": null, "context": null, "children_spec": []}]',
                "forward_arg_names": ["x"]}}],
        },
        "range_constraints": {"s77": {"min_val": 1, "max_val": 64}},
        "guards_code": guards if guards is not None else [],
        **extra,
    }


def _check(program: dict) -> None:
    check_graph_json(json.dumps(program).encode(), "m/models/model.json")


def _refused(program: dict) -> str:
    with pytest.raises(RefusedGraph) as e:
        _check(program)
    assert str(e.value).startswith("m/models/model.json: ")
    return str(e.value)


def test_genuine_expressions_guards_and_targets_pass() -> None:
    _check(_program(GENUINE_EXPRS, guards=GENUINE_GUARDS))
    for target in ("torch.ops.aten._to_copy.default", "torch.ops.prims.convert_element_type.default",
                   "torch.ops.higher_order.cond", "_operator.mul", "_operator.floordiv", "math.trunc",
                   "torch.sym_max", "torch._sym_sqrt"):
        _check(_program(target=target))


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", f"({SYM}).__class__", "Symbol.__init__", f"(lambda: 0)() or {SYM}",
    "Symbol('s0').func", "Symbol('s0'.join('x'))", "Symbol(\"s0\")", "Symbol('os.system')", "exec('1')",
    "eval('1')", "getattr(Integer(1), 'p')", "Integer(1)[0]", "s0; s1", "s0 if s0 else s1", "x", "_s0",
    "Symbol('s0', __class__=True)", "Integer(0x10)", "Integer(1j)", "[s0]", "{s0}", "s0 @ s1", "s0 < s1",
    "S.true", "Integer(1) # comment", "Symbol(b's0')", "Symbol(f's0')", "", "s0\n", "ṡ0", "a\\\nb",
    "(" * 300 + "s0" + ")" * 300,
])
def test_expressions_torch_does_not_write_are_refused(expr: str) -> None:
    assert "symbolic expression" in _refused(_program([SYM, expr]))


def test_a_non_text_expression_is_refused() -> None:
    program = _program()
    program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]["expr_str"] = ["s0"]
    assert "not text" in _refused(program)


@pytest.mark.parametrize("target", [
    "torch.os.system", "torch._C._nn.linear", "torch.ops.aten.__class__.__init__", "torch.ops.aten.name.join",
    "torch.ops.aten.add.__call__", "torch.ops.aten.add", "torch.ops.mylib.evil.default", "os.system",
    "_operator.attrgetter", "_operatorx.add", "torchvision.ops.nms", "math.sys", "#ns:op", "builtins.eval",
    "torch.ops.higher_order._ops", "torch.ops.aten.add.default.__globals__", "",
])
def test_targets_that_are_not_torch_operators_are_refused(target: str) -> None:
    assert repr(target) in _refused(_program(target=target))
    program = _program()
    program["graph_module"]["graph"]["nodes"][0]["inputs"][0]["arg"] = {"as_operator": target}
    assert "node target" in _refused(program)


@pytest.mark.parametrize("guard", [
    "__import__('os').system('true')", "L['x'].size()[0] == 1 or exec('1')", "L['x'].__class__",
    "L['x\"'].size()[0] == 1", "L['x'].numpy()", "math.sys", "os.system('x')",
    "L['x'].size()[0] == 1; import os", "(lambda: 1)()", "L['x'].size()[0] := 1", "\"Guard\"",
])
def test_guards_torch_does_not_write_are_refused(guard: str) -> None:
    assert "guard" in _refused(_program(guards=[*GENUINE_GUARDS, guard]))


@pytest.mark.parametrize("path,value", [
    (("graph_module", "signature", "input_specs", 0, "parameter", "arg", "name"), "x=__import__('os')"),
    (("graph_module", "signature", "input_specs", 0, "parameter", "parameter_name"), 'lin.w")or("'),
    (("graph_module", "graph", "nodes", 0, "name"), "a b"),
    (("graph_module", "graph", "nodes", 0, "inputs", 0, "name"), "input=1"),
    (("graph_module", "module_call_graph", 0, "signature", "forward_arg_names", 0), "x)"),
    (("range_constraints", "s77", "min_val"), "1 or exec('x')"),
    (("graph_module", "graph", "inputs", 0), {"as_string": "x' or exec('1') or '"}),
    (("graph_module", "graph", "inputs", 0), {"as_int": "1; 2"}),
    (("graph_module", "graph", "inputs", 0), {"as_float": "1.0 or exec('1')"}),
    (("graph_module", "graph", "inputs", 0), {"as_bool": "x"}),
])
def test_names_and_values_pasted_into_generated_code_are_refused(path: tuple[object, ...], value: object) -> None:
    program = _program()
    holder: object = program
    for key in path[:-1]:
        holder = holder[key]  # type: ignore[index]
    holder[path[-1]] = value  # type: ignore[index]
    _refused(program)


@pytest.mark.parametrize("spec", [
    '[1, {"type": "builtins.dict", "context": "[{\\"__enum__\\": true, \\"fqn\\": \\"os:environ\\", '
    '\\"name\\": \\"x\\"}]", "children_spec": []}]',
    '[1, {"type": "collections.defaultdict", "context": "{}", "children_spec": []}]',
    '[1, {"type": "builtins.tuple", "context": "null", "children_spec": [{"type": "builtins.list", '
    '"context": "{\\"__enum__\\": 1}", "children_spec": []}]}]',
    "[1, {", 7,
])
def test_pytree_specs_that_import_are_refused(spec: object) -> None:
    program = _program()
    program["graph_module"]["module_call_graph"][0]["signature"]["in_spec"] = spec
    assert "pytree spec" in _refused(program)


def test_source_fn_stack_names_only_torch_modules_and_operators() -> None:
    program = _program()
    meta = program["graph_module"]["graph"]["nodes"][0]["metadata"]
    meta["source_fn_stack"] = "linear,torch.nn.modules.linear.Linear;relu,torch.nn.functional.relu;add,_operator.add"
    _check(program)
    meta["source_fn_stack"] = "linear,torch.os.system"
    assert "source_fn_stack" in _refused(program)


def test_unreadable_json_is_refused_and_every_graph_entry_of_an_archive_is_checked() -> None:
    assert "not a readable" in _refused_bytes(b"\xff{")
    assert "not a readable" in _refused_bytes(b"[" * 100_000)
    evil = json.dumps(_program(target="torch.os.system")).encode()
    good = json.dumps(_program()).encode()
    for name in ("m/models/model.json", "m/models/other.json", "serialized_exported_program.json",
                 "m/Models/model.json"):
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            z.writestr("m/models/model.json", good)
            z.writestr(name, evil)
        with pytest.raises(RefusedGraph, match=r"torch\.os\.system"):
            check_pt2_graphs(out.getvalue(), "m.pt2")


def _refused_bytes(data: bytes) -> str:
    with pytest.raises(RefusedGraph) as e:
        check_graph_json(data, "m/models/model.json")
    return str(e.value)

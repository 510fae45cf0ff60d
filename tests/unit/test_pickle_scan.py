"""packager.pickle_scan: which pickles and model archives are refused, without torch and without unpickling."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import pytest

from packager.errors import RefusedPickle
from packager.pickle_scan import (
    TORCH_SAVE,
    TORCHSCRIPT,
    check_pickle_stream,
    check_pt2,
    check_state_dict,
    check_torchscript,
)

# data.pkl of torch 2.13's torch.save: sample inputs `((x,), {})` of a .pt2, and a small state_dict.
SAMPLE_INPUTS = (b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00((X\x07\x00\x00\x00storageq\x01ctorch\n'
                 b'FloatStorage\nq\x02X\x01\x00\x00\x000q\x03X\x03\x00\x00\x00cpuq\x04K\x04tq\x05QK\x00K\x01K\x04'
                 b'\x86q\x06K\x04K\x01\x86q\x07\x89ccollections\nOrderedDict\nq\x08)Rq\ttq\nRq\x0b\x85q\x0c}q\r'
                 b'\x86q\x0e.')
STATE_DICT = (b'\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\x05\x00\x00\x00scaleq\x02ctorch._utils\n'
              b'_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05X\x01\x00\x00'
              b'\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x02tq\x08QK\x00K\x02\x85q\tK\x01\x85q\n\x89h\x00)Rq\x0btq'
              b'\x0cRq\rX\x08\x00\x00\x00lin.biasq\x16h\x03((h\x04h\x05X\x01\x00\x00\x002q\x17h\x07K\x02tq\x18QK'
              b'\x00K\x02\x85q\x19K\x01\x85q\x1a\x89h\x00)Rq\x1btq\x1cRq\x1du}q\x1eX\t\x00\x00\x00_metadataq\x1f'
              b'h\x00)Rq (X\x00\x00\x00\x00q!}q"X\x07\x00\x00\x00versionq#K\x01susb.')
# TorchScript data.pkl: a module object of the archive's own class, built with its attributes.
SCRIPT_DATA = (b'\x80\x02c__torch__\nM\nq\x00)\x81}q\x01(X\x05\x00\x00\x00scaleq\x02ctorch._utils\n'
               b'_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05X\x01\x00'
               b'\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x02tq\x08QK\x00K\x02\x85q\tK\x01\x85q\n\x89'
               b'ccollections\nOrderedDict\nq\x0b)Rq\x0ctq\rRq\x0eX\x08\x00\x00\x00trainingq\x0f\x89ub.')


class _Call:
    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


def _refused(data: bytes, policy=TORCH_SAVE) -> str:
    with pytest.raises(RefusedPickle) as e:
        check_pickle_stream(data, policy, "entry")
    return str(e.value)


def test_genuine_torch_pickles_pass() -> None:
    check_pickle_stream(SAMPLE_INPUTS, TORCH_SAVE, "sample")
    check_pickle_stream(STATE_DICT, TORCH_SAVE, "sd")
    check_pickle_stream(SCRIPT_DATA, TORCHSCRIPT, "data.pkl")
    check_pickle_stream(pickle.dumps(((1, 2.5, "x", None, True), {"k": [b"b"]}), protocol=4), TORCH_SAVE, "plain")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_imports_and_calls_outside_the_allow_list_are_refused(protocol: int) -> None:
    assert "imports posix.system" in _refused(pickle.dumps(_Call(os.system, "true"), protocol=protocol))
    # a pickle may not even import a module it does not call: imports run module code
    why = _refused(pickle.dumps({"f": eval}, protocol=protocol))
    assert "imports" in why and ".eval" in why  # __builtin__.eval below protocol 3


def test_names_built_from_memo_and_computed_objects_are_refused() -> None:
    # STACK_GLOBAL with its strings fetched from the memo, as pickle protocol 4 writes repeated names
    memoized = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94h\x00h\x01\x93."
    assert "imports os.system" in _refused(memoized)
    computed = b"\x80\x04)\x8c\x06system\x93."  # module name is not a string
    assert "computed name" in _refused(computed)
    # an allowed name spelled as an attribute path is refused: getattr chains could reach anything
    assert "imports torch._utils._rebuild_tensor_v2" in _refused(b"\x80\x02ctorch\n_utils._rebuild_tensor_v2\n).")


def test_allowed_names_used_the_wrong_way_are_refused() -> None:
    assert "calls torch.FloatStorage" in _refused(b"\x80\x02ctorch\nFloatStorage\nK\x01\x85R.")  # a value, not called
    # BUILD on a global would set attributes of torch's own function/class (monkeypatching)
    assert "sets the state of collections.OrderedDict" in _refused(b"\x80\x02ccollections\nOrderedDict\n}b.")
    assert "modifies collections.OrderedDict" in _refused(b"\x80\x02ccollections\nOrderedDict\nK\x01K\x02s.")
    assert "instantiates collections.OrderedDict" in _refused(b"\x80\x02ccollections\nOrderedDict\n)\x81.")
    assert "imports __torch__.M" in _refused(SCRIPT_DATA)  # TorchScript classes only in TorchScript's pickles


@pytest.mark.parametrize("data,why", [
    (b"(ios\nsystem\nS'true'\no.", "INST"),                    # protocol 0 import-and-call
    (b"\x80\x02(cbuiltins\nlist\no.", "imports builtins.list"),  # OBJ: the class is checked at import
    (b"\x80\x02\x82\x01.", "EXT1"),                              # copyreg extension registry
    (b"\x80\x02P0\n.", "PERSID"),
])
def test_opcodes_torch_never_writes_are_refused(data: bytes, why: str) -> None:
    assert why in _refused(data)


def test_every_pickle_in_a_stream_is_checked_and_garbage_refused() -> None:
    evil = pickle.dumps(_Call(os.system, "true"), protocol=2)
    # torch.load of a non-zip payload reads several pickles in a row (magic number, protocol, sys info, data, keys)
    assert "posix.system" in _refused(pickle.dumps(119547037146038801333356, protocol=2) + evil)
    assert "malformed" in _refused(SAMPLE_INPUTS[:-1])            # truncated: no STOP
    assert "malformed" in _refused(SAMPLE_INPUTS + b"\x00\x01")  # trailing bytes that are no pickle
    assert "malformed" in _refused(b"\x80\x02h\x05.")           # memo key never stored
    assert "malformed" in _refused(b"\x80\x02(\x85.")           # a tuple of a MARK: stack underflow


# --- archives -----------------------------------------------------------------------------------------------

def _zip(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return out.getvalue()


RAW_FLOATS = b"c\x00\x80?\nq\n\x00\x00\x80?"  # raw tensor bytes that happen to read as a GLOBAL opcode


def _torch_save(data_pkl: bytes = SAMPLE_INPUTS) -> bytes:
    return _zip({"archive/data.pkl": data_pkl, "archive/data/0": RAW_FLOATS, "archive/byteorder": b"little",
                 "archive/version": b"3\n", "archive/.data/version": b"3\n", "archive/.format_version": b"1",
                 "archive/.storage_alignment": b"64", "archive/.data/serialization_id": b"0123456789"})


def _pt2(**overrides: bytes | None) -> bytes:
    weights = {"config": {"lin.weight": {"path_name": "weight_0", "is_param": True, "use_pickle": False}}}
    constants = {"config": {"c": {"path_name": "tensor_0", "is_param": False, "use_pickle": False}}}
    entries: dict[str, bytes | None] = {
        "m/data/weights/weight_0": RAW_FLOATS, "m/data/weights/model_weights_config.json": json.dumps(weights).encode(),
        "m/data/constants/tensor_0": RAW_FLOATS,
        "m/data/constants/model_constants_config.json": json.dumps(constants).encode(),
        "m/models/model.json": b'{"graph_module": {}}', "m/data/sample_inputs/model.pt": _torch_save(),
        "m/archive_format": b"pt2", "m/archive_version": b"0", "m/.data/version": b"6\n",
        "m/byteorder": b"little", "m/.data/serialization_id": b"0656930146", "m/extra/notes.txt": b"cos\nsystem\n",
    }
    entries.update({f"m/{k}": v for k, v in overrides.items()})
    return _zip({k: v for k, v in entries.items() if v is not None})


def test_a_genuine_pt2_layout_passes_raw_and_text_entries_unread() -> None:
    check_pt2(_pt2(), "m.pt2")


def test_pt2_entries_torch_would_unpickle_are_checked() -> None:
    evil = pickle.dumps(_Call(os.system, "true"), protocol=2)
    cases: dict[str, dict[str, bytes | None]] = {
        "sample inputs": {"data/sample_inputs/model.pt": _torch_save(evil)},
        "sample inputs, plain pickle": {"data/sample_inputs/model.pt": evil},
        # a pickled payload may point at a file that would otherwise be raw data, in another case
        "pickled alias": {"data/weights/model_weights_config.json": json.dumps({"config": {
            "a": {"path_name": "weight_0", "use_pickle": False},
            "b": {"path_name": "WEIGHT_0", "use_pickle": True}}}).encode(), "data/weights/weight_0": evil},
        "opaque constant": {"data/constants/model_constants_config.json": json.dumps({"config": {
            "c": {"path_name": "opaque_obj_0", "use_pickle": False}}}).encode(), "data/constants/tensor_0": None,
            "data/constants/opaque_obj_0": evil},
        "legacy file": {"data/weights/model.pt": _torch_save(evil)},
        "unreferenced entry": {"data/weights/weight_9": evil},
    }
    for name, overrides in cases.items():
        with pytest.raises(RefusedPickle, match=r"posix\.system"):
            check_pt2(_pt2(**overrides), "m.pt2")
            pytest.fail(name)


def test_pt2_archive_level_refusals() -> None:
    with pytest.raises(RefusedPickle, match="TorchScript"):
        check_pt2(_pt2(**{"data/sample_inputs/model.pt": _zip({"a/data.pkl": SAMPLE_INPUTS,
                                                                "a/constants.pkl": b"\x80\x02)."})}), "m.pt2")
    with pytest.raises(RefusedPickle, match="compiled"):
        check_pt2(_pt2(**{"data/aotinductor/model/model.so": b"\x7fELF"}), "m.pt2")
    with pytest.raises(RefusedPickle, match="ignoring case"):
        check_pt2(_pt2(**{"Data/Weights/Weight_0": RAW_FLOATS}), "m.pt2")
    with pytest.raises(RefusedPickle, match="payload config"):
        check_pt2(_pt2(**{"data/weights/model_weights_config.json": b"[]"}), "m.pt2")


def test_torchscript_and_state_dict_files() -> None:
    script = {"m/data.pkl": SCRIPT_DATA, "m/constants.pkl": b"\x80\x02).", "m/code/__torch__.py": b"class M(Module):\n",
              "m/code/__torch__.py.debug_pkl": b"\x80\x02ctorch.jit._pickle\nbuild_intlist\n]\x85R.",
              "m/data/0": RAW_FLOATS, "m/version": b"3\n"}
    check_torchscript(_zip(script), "m.ts")
    with pytest.raises(RefusedPickle, match=r"constants\.pkl: pickle imports posix\.system"):
        check_torchscript(_zip({**script, "m/constants.pkl": pickle.dumps(_Call(os.system, "x"), protocol=2)}), "m")
    check_state_dict(_torch_save(STATE_DICT), "sd.pt")
    with pytest.raises(RefusedPickle, match=r"pre-1\.6"):
        check_state_dict(pickle.dumps({"w": 1}, protocol=2), "sd.pt")
    with pytest.raises(RefusedPickle, match=r"imports __torch__\.M"):
        check_state_dict(_torch_save(SCRIPT_DATA), "sd.pt")

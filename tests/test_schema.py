"""proto/caffe.proto is field-for-field BVLC Caffe's, and the checked-in caffe_pb2 is not stale."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ORACLE, REPO, require_shared
from resnetc.proto import caffe_pb2

SCALAR = {
    1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64", 7: "fixed32", 8: "bool",
    9: "string", 12: "bytes", 13: "uint32", 15: "sfixed32", 16: "sfixed64", 17: "sint32", 18: "sint64",
}
LABEL = {1: "optional", 2: "required", 3: "repeated"}


def _caffe_schema():
    require_shared()
    with open(os.path.join(ORACLE, "caffe_proto_fields.json")) as f:
        return json.load(f)


def _type_name(fd):
    if fd.type in SCALAR:
        return SCALAR[fd.type]
    t = fd.message_type or fd.enum_type
    return t.full_name[len("caffe."):]


def _check_message(desc, spec, path):
    ours = {f.name: f for f in desc.fields}
    for f in spec["fields"]:
        assert f["name"] in ours, f"{path}.{f['name']} missing"
        fd = ours[f["name"]]
        assert fd.number == f["number"], f"{path}.{f['name']}: number {fd.number} != Caffe's {f['number']}"
        want_label = f["label"]
        got_label = "repeated" if fd.is_repeated else ("required" if fd.is_required else "optional")
        assert got_label == want_label, f"{path}.{f['name']}: label {got_label} != {want_label}"
        assert _type_name(fd) == f["type"], f"{path}.{f['name']}: type {_type_name(fd)} != {f['type']}"
        if "default" in f and fd.type not in (11,):
            got = fd.default_value
            if fd.enum_type is not None:
                got = fd.enum_type.values_by_number[got].name
            if isinstance(got, float):
                assert got == pytest.approx(f["default"], rel=1e-6), f"{path}.{f['name']} default"
            else:
                assert got == f["default"], f"{path}.{f['name']}: default {got!r} != {f['default']!r}"
        if f.get("packed"):
            assert fd.GetOptions().packed, f"{path}.{f['name']} must be packed"
    extra = [fd for name, fd in ours.items() if name not in {f["name"] for f in spec["fields"]}]
    for fd in extra:  # only our extension range may add fields
        assert 5000 <= fd.number < 5100, f"{path}.{fd.name} = {fd.number}: not Caffe's, outside 5000-5099"
    for name, values in spec.get("enums", {}).items():
        ed = desc.enum_types_by_name[name]
        assert {v.name: v.number for v in ed.values} == values, f"{path}.{name} enum"
    for name, sub in spec.get("nested", {}).items():
        _check_message(desc.nested_types_by_name[name], sub, f"{path}.{name}")


def test_every_caffe_message_field_matches():
    schema = _caffe_schema()
    for name, spec in schema["messages"].items():
        desc = caffe_pb2.DESCRIPTOR.message_types_by_name[name]
        _check_message(desc, spec, name)
    assert {v.name: v.number for v in caffe_pb2.DESCRIPTOR.enum_types_by_name["Phase"].values} == \
        schema["top_level_enums"]["Phase"]


def test_generated_module_is_not_stale(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) regenerates caffe_pb2")
    sys.path.insert(0, REPO)
    from resnetc.proto import regenerate

    fresh = regenerate.generate(str(tmp_path))
    with open(fresh, "rb") as a, open(regenerate.OUT, "rb") as b:
        assert a.read() == b.read(), "resnetc/proto/caffe_pb2.py is stale: run `python -m resnetc.proto.regenerate`"

"""Sweep the whole real-world corpus: every net builds in both phases with Caffe's shapes, or fails with one
clear line (fork layers, Python layers, nets Caffe itself rejects)."""
import csv
import gzip
import json
import os

import pytest

from conftest import CORPUS, ORACLE, corpus_manifest, require_shared
from resnetc.errors import ResnetcError
from resnetc.graph import build_graph
from resnetc.prototxt import read_net


def _shapes_oracle():
    path = os.path.join(ORACLE, "shapes", "shapes.json.gz")
    if not os.path.exists(path):
        return {}
    with gzip.open(path) as f:
        return json.load(f)


def _failed():
    path = os.path.join(ORACLE, "shapes", "failed.tsv")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["net"]: r["caffe_error"] for r in csv.DictReader(f, delimiter="\t")}


SHAPES = _shapes_oracle()
FAILED = _failed()
NETS = [r["local_path"] for r in corpus_manifest() if r["kind"] in ("net-train", "net-deploy")]


@pytest.mark.parametrize("key", sorted(SHAPES) or ["<no oracle>"])
def test_graph_matches_caffe(key):
    require_shared()
    v = SHAPES[key]
    path = os.path.join(CORPUS, key.split("@")[0])
    replaced = v.get("inputs_replaced") or {}
    input_shapes = {top: shape for layer in replaced.values() for top, shape in layer["tops"].items()}
    g = build_graph(read_net(path), v["phase"], stages=v.get("stages", ()), input_shapes=input_shapes)
    assert [l.name for l in g.layers] == v["layer_order"]
    for l, t in zip(g.layers, v["layer_types"]):
        if l.name not in replaced:
            assert l.type == t, f"{l.name}: {l.type} != {t}"
    for blob, shape in v["blobs"].items():
        if blob == "(automatic)":  # Caffe's anonymous loss top; ours is named after its layer
            autos = [s for name, s in g.blob_alias.items() if name.startswith("(automatic:")]
            assert autos and all(g.blob_shapes[s] == tuple(shape) for s in autos)
            continue
        assert g.shape(blob) == tuple(shape), f"blob {blob}: {g.shape(blob)} != Caffe's {shape}"
    for name, shapes in v["params"].items():
        got = [tuple(b.shape) for b in g.layer(name).blobs]
        assert got == [tuple(s) for s in shapes], f"params of {name}: {got} != Caffe's {shapes}"
    assert g.outputs == v["outputs"]
    if not replaced:
        assert g.inputs == v["inputs"]


@pytest.mark.parametrize("rel", NETS or ["<no corpus>"])
def test_every_corpus_net_builds_or_fails_clearly(rel):
    require_shared()
    path = os.path.join(CORPUS, rel)
    for phase in ("TRAIN", "TEST"):
        try:
            build_graph(read_net(path), phase)
        except ResnetcError as e:
            msg = str(e)
            assert "\n" not in msg and msg.startswith(path + ":"), msg
            if rel in FAILED:
                continue
            pytest.fail(f"real Caffe builds {rel} ({phase}) but resnetc says: {msg}")
        else:
            if rel in FAILED and phase == "TEST":
                pytest.fail(f"real Caffe rejects {rel}: {FAILED[rel][:120]}; resnetc accepted it")

"""Reading text and binary Caffe protos; parse errors are one line with file:line:col."""
import os

import pytest
from hypothesis import given, settings, strategies as st

from conftest import CORPUS, corpus_manifest, require_shared
from resnetc.errors import ResnetcError
from resnetc.prototxt import layer_lines, parse_net_text, read_net, read_solver, to_text
from resnetc.proto import caffe_pb2

ROWS = corpus_manifest()
# files that real Caffe could not parse either (fork fields): see oracle/shapes/failed.tsv
FORK_FIELDS = ("permute_param", "resize_param", "eval_type", "stepearly")


@pytest.mark.parametrize("row", [r for r in ROWS if r["kind"] in ("net-train", "net-deploy", "solver")],
                         ids=lambda r: r["local_path"])
def test_corpus_file_parses_or_names_the_fork_field(row):
    require_shared()
    path = os.path.join(CORPUS, row["local_path"])
    read = read_solver if row["kind"] == "solver" else read_net
    try:
        msg = read(path)
    except ResnetcError as e:
        text = str(e)
        assert any(f in text for f in FORK_FIELDS), text
        assert text.startswith(path + ":") and "\n" not in text
        return
    if row["kind"] != "solver":
        assert len(msg.param.layer) > 0
        # every layer of a text file has a line number
        assert all(msg.line_of(l.name) for l in msg.param.layer if l.type != "Input" or l.name != "input")


def test_layer_lines_finds_v2_and_v0_blocks():
    text = 'name: "n"\n# layer { name: "fake" }\nlayer {\n  name: "a"\n  type: "ReLU"\n}\nlayers {\n layer {\n  name: "b"\n }\n}\n'
    assert layer_lines(text) == {"a": 3, "b": 7}


@pytest.mark.parametrize("text,line,col", [
    ('name: "x"\nlayer {\n  name: "a"\n  tpye: "ReLU"\n}\n', 4, 3),
    ('name: "x"\nlayer {\n  name: "a"\n', 3, 9),
    ('layer { convolution_param { num_output: -3 } }', 1, 43),
])
def test_parse_error_is_one_line_with_position(tmp_path, text, line, col):
    p = tmp_path / "bad.prototxt"
    p.write_text(text)
    with pytest.raises(ResnetcError) as ei:
        read_net(str(p))
    msg = str(ei.value)
    assert msg.startswith(f"{p}:{line}:"), msg
    assert "\n" not in msg


def test_binary_and_text_round_trip(tmp_path):
    net = caffe_pb2.NetParameter(name="n")
    l = net.layer.add(name="ip", type="InnerProduct", bottom=["data"], top=["ip"])
    l.inner_product_param.num_output = 10
    b = tmp_path / "n.caffemodel"
    b.write_bytes(net.SerializeToString())
    assert read_net(str(b)).param == net
    t = tmp_path / "n.prototxt"
    t.write_text(to_text(net))
    assert read_net(str(t)).param == net


def test_missing_file_is_a_clear_error():
    with pytest.raises(ResnetcError, match="no such file"):
        read_net("/nonexistent/x.prototxt")


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('layer{}:"name type top bottom 0123\n#\\')), max_size=120))
def test_fuzzed_text_never_raises_anything_but_resnetc_error(text):
    try:
        parse_net_text(text, "fuzz.prototxt")
    except ResnetcError as e:
        assert "\n" not in str(e)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_truncated_real_prototxt_is_a_clear_error(data):
    require_shared()
    path = os.path.join(CORPUS, "bvlc-caffe/models/bvlc_alexnet/deploy.prototxt")
    text = open(path).read()
    cut = data.draw(st.integers(1, len(text) - 1))
    try:
        parse_net_text(text[:cut], path)
    except ResnetcError as e:
        assert str(e).startswith(path + ":")

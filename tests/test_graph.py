"""LayerGraph construction: NetState filtering, Caffe's split insertion, in-place SSA versions, errors."""
import pytest

from resnetc.errors import ResnetcError
from resnetc.graph import build_graph
from resnetc.prototxt import parse_net_text

NET = '''
name: "g"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 5 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip" inner_product_param { num_output: 10 } }
layer { name: "ip_b" type: "InnerProduct" bottom: "conv1" top: "ip_b" inner_product_param { num_output: 10 }
        include { phase: TRAIN } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST } }
layer { name: "staged" type: "ReLU" bottom: "ip" top: "staged" include { stage: "deploy" } }
'''


def graph(text=NET, phase="TEST", **kw):
    return build_graph(parse_net_text(text, "g.prototxt"), phase, **kw)


def test_split_layers_get_caffe_names_and_in_place_blob_is_final_value():
    g = graph()
    names = [l.name for l in g.layers]
    # label feeds loss and acc -> split after the Input layer (its top 1); ip feeds loss and acc
    assert names == ["data", "label_data_1_split", "conv1", "relu1", "ip", "ip_ip_0_split", "loss", "acc"]
    split = g.layer("ip_ip_0_split")
    assert split.caffe_tops == ["ip_ip_0_split_0", "ip_ip_0_split_1"]
    assert g.layer("loss").caffe_bottoms == ["ip_ip_0_split_0", "label_data_1_split_0"]
    # conv1 is rewritten in place by relu1: two versions, the alias points at the last one
    assert g.layer("relu1").bottoms == ["conv1"] and g.layer("relu1").tops == ["conv1#1"]
    assert g.blob_alias["conv1"] == "conv1#1"
    assert g.outputs == ["acc", "loss"]  # byte-wise sorted, like Caffe's std::set
    assert g.shape("conv1") == (4, 5, 6, 6) and g.shape("ip") == (4, 10)
    assert g.layer("loss").loss_weights == [1.0]


def test_train_phase_and_stage_rules():
    g = graph(phase="TRAIN")
    names = [l.name for l in g.layers]
    assert "ip_b" in names and "acc" not in names
    # conv1 (after relu1) now feeds ip and ip_b: a split named after the in-place producer relu1
    assert "conv1_relu1_0_split" in names
    g = graph(stages=["deploy"])
    assert "staged" in [l.name for l in g.layers]


def test_explicit_loss_weight_rides_on_split_0():
    text = NET.replace('top: "ip" inner_product_param', 'top: "ip" loss_weight: 0.5 inner_product_param')
    g = graph(text)
    split = g.layer("ip_ip_0_split")
    assert list(split.param.loss_weight) == [0.5, 0, 0]
    assert g.layer("loss").caffe_bottoms[0] == "ip_ip_0_split_1"
    assert not g.layer("ip").param.loss_weight
    assert "ip_ip_0_split_0" in g.outputs


@pytest.mark.parametrize("edit,message", [
    (('bottom: "conv1" top: "ip"', 'bottom: "nope" top: "ip"'), "unknown bottom blob 'nope'"),
    (('top: "ip_b"', 'top: "ip"'), None),  # TRAIN only layer: checked in TRAIN below
    (('type: "ReLU" bottom: "conv1"', 'type: "NoSuchLayer" bottom: "conv1"'), "unknown layer type 'NoSuchLayer'"),
    (('num_output: 10 } }\nlayer { name: "ip_b"', 'num_output: 10 } }\nlayer { name: "dup" type: "ReLU" bottom: "data" top: "ip" }\nlayer { name: "ip_b"'),
     "produced by multiple layers"),
])
def test_errors_name_file_line_and_layer(edit, message):
    text = NET.replace(*edit)
    phase = "TRAIN" if message is None else "TEST"
    with pytest.raises(ResnetcError) as ei:
        graph(text, phase=phase)
    msg = str(ei.value)
    assert msg.startswith("g.prototxt:") and "layer '" in msg
    if message:
        assert message in msg


def test_shape_error_names_layer_and_line():
    text = NET.replace("kernel_size: 3", "kernel_size: 30")
    with pytest.raises(ResnetcError) as ei:
        graph(text)
    assert str(ei.value).startswith("g.prototxt:5: layer 'conv1' (Convolution)")


def test_in_place_refused_for_flatten():
    text = NET.replace('type: "ReLU" bottom: "conv1" top: "conv1"', 'type: "Flatten" bottom: "conv1" top: "conv1"')
    with pytest.raises(ResnetcError, match="cannot run in place"):
        graph(text)


def test_shared_params_and_lr_mult():
    text = '''
layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 6 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "a" top: "x" param { name: "w" lr_mult: 2 } param { name: "bias" }
        inner_product_param { num_output: 3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "b" top: "y" param { name: "w" } param { name: "bias" decay_mult: 0 }
        inner_product_param { num_output: 3 } }
'''
    g = graph(text)
    ip2 = g.layer("ip2")
    assert ip2.shared_from == [("ip1", 0), ("ip1", 1)]
    assert ip2.lr_mult == [2.0, 1.0]
    assert g.layer("ip1").decay_mult == [1.0, 0.0]  # owner adopts an explicit multiplier of a sharer when defaulted


def test_batchnorm_rejects_learnable_statistics():
    text = '''
layer { name: "in" type: "Input" top: "a" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "bn" type: "BatchNorm" bottom: "a" top: "a" param { lr_mult: 1 } }
'''
    with pytest.raises(ResnetcError, match="lr_mult: 0"):
        graph(text)

"""NetSpec: pycaffe's net_spec API producing our NetParameter, with pycaffe's naming."""
from __future__ import annotations

import os

import pytest
from google.protobuf import text_format

from resnetc.errors import ResnetcError
from resnetc.netspec import TEST, TRAIN, L, NetSpec, P, to_proto
from resnetc.prototxt import parse_net_text, to_text
from resnetc.proto import caffe_pb2


def nonlinear_net(hdf5, batch_size):
    """Caffe's examples/02-brewing-logreg notebook, which wrote nonlinear_auto_train.prototxt with pycaffe."""
    n = NetSpec()
    n.data, n.label = L.HDF5Data(batch_size=batch_size, source=hdf5, ntop=2)
    n.ip1 = L.InnerProduct(n.data, num_output=40, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.ip1, num_output=2, weight_filler=dict(type="xavier"))
    n.accuracy = L.Accuracy(n.ip2, n.label)
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n.to_proto()


def test_pycaffe_written_file_is_reproduced_byte_for_byte(corpus):
    path = os.path.join(corpus, "bvlc-caffe/examples/hdf5_classification/nonlinear_auto_train.prototxt")
    with open(path) as f:
        expected = f.read()
    got = to_text(nonlinear_net("examples/hdf5_classification/data/train.txt", 10))
    assert got == expected


def lenet(batch_size):
    n = NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source="mnist_train_lmdb",
                             transform_param=dict(scale=1.0 / 255), ntop=2, include=dict(phase=TRAIN))
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"),
                            param=[dict(lr_mult=1), dict(lr_mult=2)])
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool1, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n.to_proto()


def anon_lenet(batch_size):
    data, label = L.DummyData(shape=[dict(dim=[batch_size, 1, 28, 28]), dict(dim=[batch_size, 1, 1, 1])],
                              transform_param=dict(scale=1.0 / 255), ntop=2)
    conv1 = L.Convolution(data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    pool1 = L.Pooling(conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    conv2 = L.Convolution(pool1, kernel_size=5, num_output=50, weight_filler=dict(type="xavier"))
    pool2 = L.Pooling(conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    ip1 = L.InnerProduct(pool2, num_output=500, weight_filler=dict(type="xavier"))
    relu1 = L.ReLU(ip1, in_place=True)
    ip2 = L.InnerProduct(relu1, num_output=10, weight_filler=dict(type="xavier"))
    loss = L.SoftmaxWithLoss(ip2, label)
    return loss.to_proto()


def test_attribute_names_name_tops_and_layers():
    net = lenet(64)
    assert [(l.name, l.type, list(l.bottom), list(l.top)) for l in net.layer] == [
        ("data", "Data", [], ["data", "label"]),
        ("conv1", "Convolution", ["data"], ["conv1"]),
        ("pool1", "Pooling", ["conv1"], ["pool1"]),
        ("ip1", "InnerProduct", ["pool1"], ["ip1"]),
        ("relu1", "ReLU", ["ip1"], ["ip1"]),  # in place: the attribute names the layer only
        ("ip2", "InnerProduct", ["ip1"], ["ip2"]),
        ("loss", "SoftmaxWithLoss", ["ip2", "label"], ["loss"]),
    ]
    data, conv1, pool1 = net.layer[0], net.layer[1], net.layer[2]
    assert data.include[0].phase == caffe_pb2.TRAIN
    assert data.data_param.backend == caffe_pb2.DataParameter.LMDB and data.data_param.batch_size == 64
    assert data.transform_param.scale == pytest.approx(1 / 255)
    assert [p.lr_mult for p in conv1.param] == [1, 2]
    assert list(conv1.convolution_param.kernel_size) == [5]  # a scalar given for a repeated field
    assert conv1.convolution_param.weight_filler.type == "xavier"
    assert pool1.pooling_param.pool == caffe_pb2.PoolingParameter.MAX


def test_automatic_names_count_per_type_like_pycaffe():
    net = anon_lenet(50)
    assert [l.name for l in net.layer] == ["DummyData1", "Convolution1", "Pooling1", "Convolution2", "Pooling2",
                                           "InnerProduct1", "ReLU1", "InnerProduct2", "SoftmaxWithLoss1"]
    assert list(net.layer[0].top) == ["DummyData1", "DummyData2"]
    assert list(net.layer[6].bottom) == list(net.layer[6].top) == ["InnerProduct1"]
    assert list(net.layer[-1].bottom) == ["InnerProduct2", "DummyData2"]
    assert [list(s.dim) for s in net.layer[0].dummy_data_param.shape] == [[50, 1, 28, 28], [50, 1, 1, 1]]


def test_name_keyword_renames_the_layer_not_its_top():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]), name="input")
    hidden = L.Pooling(n.data, pool="AVE", global_pooling=True, name="gap")
    n.out = L.Flatten(hidden)
    net = n.to_proto(name="tiny")
    assert net.name == "tiny"
    assert [(l.name, list(l.top)) for l in net.layer] == [("input", ["data"]), ("gap", ["Pooling1"]),
                                                          ("out", ["out"])]
    assert net.layer[1].pooling_param.pool == caffe_pb2.PoolingParameter.AVE  # enum by name


def test_zero_top_layers_and_layer_level_fields():
    n = NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=[3]), ntop=2)
    n.silence_data = L.Silence(n.data, ntop=0)
    n.loss = L.EuclideanLoss(n.data, n.data2, loss_weight=0.5, propagate_down=[True, False],
                             include=[dict(phase=TEST), dict(stage=["a"])])
    net = n.to_proto()
    assert [(l.name, list(l.top)) for l in net.layer] == [("data", ["data", "data2"]), ("silence_data", []),
                                                          ("loss", ["loss"])]
    loss = net.layer[2]
    assert list(loss.loss_weight) == [0.5] and list(loss.propagate_down) == [True, False]
    assert loss.include[0].phase == caffe_pb2.TEST and list(loss.include[1].stage) == ["a"]


def test_layers_come_in_assignment_order_after_what_they_need():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    a = L.ReLU(n.data)
    n.b = L.Sigmoid(a)
    n.c = L.TanH(n.data)
    assert [l.name for l in n.to_proto().layer] == ["data", "ReLU1", "b", "c"]


def test_shared_parameter_messages_accept_short_keywords():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 4, 4]))
    n.up = L.Deconvolution(n.data, num_output=3, kernel_size=2, stride=2, bias_term=False)
    conv = n.to_proto().layer[1].convolution_param
    assert (conv.num_output, list(conv.kernel_size), list(conv.stride), conv.bias_term) == (3, [2], [2], False)


def test_generated_text_reads_back_unchanged():
    net = lenet(8)
    src = parse_net_text(to_text(net), "lenet.prototxt")
    assert src.param == net
    assert src.lines["conv1"] > src.lines["data"]


@pytest.mark.parametrize("make, fragment", [
    (lambda d: L.Convolution(d, kernel_sise=3), "unknown parameter 'kernel_sise'"),
    (lambda d: L.Convolution(d, num_output="many"), "bad value 'many' for 'num_output'"),
    (lambda d: L.Pooling(d, pool="MEDIAN"), "'pool' is one of MAX, AVE, STOCHASTIC"),
    (lambda d: L.Convolution(d, weight_filler="msra"), "'weight_filler' takes a dict"),
    (lambda d: L.Convolution(d, include=dict(phase=7)), "bad value"),
])
def test_bad_keywords_are_one_line_errors_naming_the_layer(make, fragment):
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 4, 4]))
    n.bad = make(n.data)
    with pytest.raises(ResnetcError) as e:
        n.to_proto()
    assert fragment in str(e.value) and "layer 'bad'" in str(e.value) and "\n" not in str(e.value)


def test_inputs_must_be_tops():
    data = L.DummyData(ntop=2)  # a tuple of two tops
    with pytest.raises(TypeError, match="Silence input 0 is not a Top"):
        L.Silence(data, ntop=0)
    L.Silence(*data, ntop=0)


def test_params_resolve_enum_values():
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX
    assert P.Data.LMDB == caffe_pb2.DataParameter.LMDB
    assert P.Eltwise.PROD == caffe_pb2.EltwiseParameter.PROD
    assert (TRAIN, TEST) == (caffe_pb2.TRAIN, caffe_pb2.TEST)
    with pytest.raises(AttributeError):
        P.NoSuchLayer.X


def test_module_level_to_proto_walks_from_the_given_tops():
    x = L.Input(shape=dict(dim=[2]))
    y = L.Power(x, power=2.0)
    net = to_proto(y)
    assert [l.name for l in net.layer] == ["Input1", "Power1"]
    assert net.layer[1].power_param.power == 2.0
    assert text_format.MessageToString(net) == text_format.MessageToString(y.to_proto())

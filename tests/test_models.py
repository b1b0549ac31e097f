"""ResNet generators: the committed specs are current, the deploys are the released KaimingHe nets layer for
layer, and parameter counts are the published ones.

Regenerate the committed specs (repository root): ``.venv/bin/resnetc spec resnet-all specs``
"""
from __future__ import annotations

import functools
import gzip
import json
import os

import pytest

from resnetc.models import files as spec_files
from resnetc.models.resnet import DataSource, cifar_resnet, imagenet_resnet, unit_names
from resnetc.prototxt import parse_net_text, read_net
from resnetc.proto import caffe_pb2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED = (50, 101, 152)


# ---------------------------------------------------------------- committed specs never go stale

@pytest.fixture(scope="module")
def generated_texts():
    return spec_files.committed_texts("specs")


def committed_paths():
    names = []
    for depth, cifar in spec_files.COMMITTED:
        p = spec_files.spec_paths(os.path.join("specs", spec_files.committed_name(depth, cifar)))
        names += [p.train_val, p.deploy, p.solver]
    return names


@pytest.mark.parametrize("path", committed_paths())
def test_committed_spec_is_what_the_generator_writes_now(path, generated_texts):
    full = os.path.join(REPO, path)
    assert os.path.exists(full), f"{path} missing: run `resnetc spec resnet-all specs` in the repository root"
    with open(full, encoding="utf-8") as f:
        assert f.read() == generated_texts[path], f"{path} is stale: run `resnetc spec resnet-all specs`"


def test_no_stale_resnet_files_in_specs():
    on_disk = {os.path.join("specs", f) for f in os.listdir(os.path.join(REPO, "specs")) if f.startswith("resnet")}
    assert on_disk == set(committed_paths())


# ---------------------------------------------------------------- compatibility with the released ResNets

def released_layers(corpus, depth):
    """The released deploy's layers as Caffe sees them (legacy input fields become Caffe's ``input`` layer)."""
    src = read_net(os.path.join(corpus, f"kaiminghe-resnet/prototxt/ResNet-{depth}-deploy.prototxt"))
    net = src.param
    layers = list(net.layer)
    if net.input:  # not upgraded here: do what Caffe's UpgradeNetInput does
        lp = caffe_pb2.LayerParameter(name="input", type="Input", top=list(net.input))
        dims = list(net.input_dim)
        for k in range(len(net.input)):
            lp.input_param.shape.add().dim.extend(dims[4 * k:4 * k + 4] if dims else net.input_shape[k].dim)
        layers.insert(0, lp)
    return net.name, layers


@pytest.mark.parametrize("depth", RELEASED)
def test_deploy_is_the_released_net_layer_for_layer(corpus, depth):
    name, expected = released_layers(corpus, depth)
    got = imagenet_resnet(depth, phase="deploy")
    assert got.name == name
    assert [l.name for l in got.layer] == [l.name for l in expected]
    for g, e in zip(got.layer, expected):
        assert (g.type, list(g.bottom), list(g.top)) == (e.type, list(e.bottom), list(e.top)), g.name
        assert g == e, f"layer {g.name}: parameters differ:\n{g}\nreleased:\n{e}"


@functools.lru_cache(maxsize=1)
def _load_caffe_shapes(oracle):
    with gzip.open(os.path.join(oracle, "shapes", "shapes.json.gz"), "rt") as f:
        data = json.load(f)
    return {d: data[f"kaiminghe-resnet/prototxt/ResNet-{d}-deploy.prototxt"] for d in RELEASED}


@pytest.fixture
def caffe_shapes(oracle):
    return _load_caffe_shapes(oracle)


@pytest.mark.parametrize("depth", RELEASED)
def test_deploy_layer_order_and_param_shapes_are_caffes(caffe_shapes, depth):
    """Real Caffe's net of the released file (pycaffe, ../shared/oracle/shapes): same layers (Caffe's own Split
    layers aside), and our arithmetic gives the same parameter blob shapes."""
    ref = caffe_shapes[depth]
    caffe_order = [n for n, t in zip(ref["layer_order"], ref["layer_types"]) if t != "Split"]
    net = imagenet_resnet(depth, phase="deploy")
    assert [l.name for l in net.layer] == caffe_order
    assert param_shapes(net) == {k: [tuple(s) for s in v] for k, v in ref["params"].items()}


@pytest.mark.parametrize("depth", RELEASED)
def test_graph_shapes_are_caffes(caffe_shapes, depth):
    """build_graph on the generated deploy: every blob and parameter shape is real Caffe's."""
    from resnetc.graph import build_graph

    texts = spec_files.resnet_spec_texts("r.prototxt", depth)
    src = parse_net_text(texts["r_deploy.prototxt"], "r_deploy.prototxt")
    graph = build_graph(src, "TEST")
    ref = caffe_shapes[depth]
    for blob, shape in ref["blobs"].items():
        ssa = graph.blob_alias.get(blob)
        assert ssa is not None, blob
        assert tuple(graph.blob_shapes[ssa]) == tuple(shape), blob
    got = {l.name: [tuple(b.shape) for b in l.blobs] for l in graph.layers if l.blobs}
    assert got == {k: [tuple(s) for s in v] for k, v in ref["params"].items()}
    learnable = sum(_numel(b.shape) for l in graph.layers for b in l.blobs if b.learnable)
    assert learnable == {50: 25_557_096, 101: 44_549_160, 152: 60_192_808}[depth]


# ---------------------------------------------------------------- parameter counts

def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def param_shapes(net) -> dict:
    """{layer: [blob shapes]} of a generated net, by arithmetic over channel counts (no shape inference: the
    generated nets reach their InnerProduct through a pooling to 1×1, which the assertion below checks)."""
    channels = {}
    made_by = {}  # blob -> type of the layer that wrote it last
    out = {}
    for lp in net.layer:
        if lp.type == "Input":
            for top, shape in zip(lp.top, lp.input_param.shape):
                channels[top] = shape.dim[1] if len(shape.dim) > 1 else None
            continue
        if lp.type == "Data":
            channels["data"], channels["label"] = 3, None
            continue
        c = channels.get(lp.bottom[0]) if lp.bottom else None
        if lp.type == "Convolution":
            p = lp.convolution_param
            k = p.kernel_size[0]
            out[lp.name] = [(p.num_output, c, k, k)] + ([(p.num_output,)] if p.bias_term else [])
            c = p.num_output
        elif lp.type == "BatchNorm":
            out[lp.name] = [(c,), (c,), (1,)]
        elif lp.type == "Scale":
            out[lp.name] = [(c,)] + ([(c,)] if lp.scale_param.bias_term else [])
        elif lp.type == "InnerProduct":
            assert made_by[lp.bottom[0]] == "Pooling", lp.name
            p = lp.inner_product_param
            out[lp.name] = [(p.num_output, c)] + ([(p.num_output,)] if p.bias_term else [])
            c = p.num_output
        elif lp.type == "Eltwise":
            assert len({channels[b] for b in lp.bottom}) == 1, lp.name
        for t in lp.top:
            channels[t] = c
        made_by.update({t: lp.type for t in lp.top})
    return out


def learnable_params(net) -> int:
    shapes = param_shapes(net)
    types = {l.name: l.type for l in net.layer}
    return sum(_numel(s) for name, blobs in shapes.items() if types[name] != "BatchNorm" for s in blobs)


@pytest.mark.parametrize("make, expected", [
    (lambda: imagenet_resnet(18), 11_689_512),  # torchvision's figure
    (lambda: imagenet_resnet(34), 21_797_672),  # torchvision's figure
    (lambda: imagenet_resnet(50, conv1_bias=False), 25_557_032),  # torchvision's figure
    (lambda: imagenet_resnet(50), 25_557_096),  # the released ResNet-50: conv1 has a bias (+64)
    (lambda: imagenet_resnet(101), 44_549_160),  # torchvision's figure; released without conv1 bias
    (lambda: imagenet_resnet(152), 60_192_808),  # torchvision's figure
    (lambda: imagenet_resnet(50, phase="train_val"), 25_557_096),
    (lambda: imagenet_resnet(18, num_classes=10), 11_689_512 - 513 * 990),
])
def test_imagenet_parameter_counts(make, expected):
    assert learnable_params(make()) == expected


@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_cifar_parameter_counts_are_the_papers(depth, millions):
    n = learnable_params(cifar_resnet(depth))
    # option B adds the two projection shortcuts (16*32 + 32*64 weights + their Scale): 2,752 parameters
    assert abs(n - 2752 - millions * 1e6) <= 0.02 * millions * 1e6, n  # the paper rounds to 2 digits
    if depth == 20:
        assert n == 272_474


def test_arithmetic_agrees_with_caffe_on_the_released_nets(caffe_shapes):
    ref = caffe_shapes[50]["params"]
    learnable = sum(_numel(s) for name, blobs in ref.items() if not name.startswith("bn") for s in blobs)
    assert learnable == learnable_params(imagenet_resnet(50)) == 25_557_096


# ---------------------------------------------------------------- structure and naming

def test_unit_names_follow_the_release():
    assert unit_names(4, 6, False) == ["res4a", "res4b", "res4c", "res4d", "res4e", "res4f"]
    assert unit_names(4, 23, True)[-1] == "res4b22"
    names = {l.name for l in imagenet_resnet(101).layer}
    assert {"res3b3", "res4b22", "res5c", "res2c"} <= names and "res3d" not in names
    names = {l.name for l in imagenet_resnet(50).layer}
    assert {"res3d", "res4f", "res5c"} <= names
    names = {l.name for l in cifar_resnet(110).layer}
    assert {"res2b17", "res4b17_relu", "res3a_branch1", "bn4a_branch1", "fc10", "prob"} <= names
    assert "res2a_branch1" not in names  # 16 -> 16 channels, stride 1: identity shortcut


def _body(net):
    """Layers between the inputs and the classifier, with training-only settings removed."""
    out = []
    for lp in net.layer:
        if lp.type in ("Input", "Data", "Softmax", "SoftmaxWithLoss", "Accuracy"):
            continue
        lp = caffe_pb2.LayerParameter.FromString(lp.SerializeToString())
        lp.convolution_param.ClearField("weight_filler")
        lp.convolution_param.ClearField("bias_filler")
        lp.inner_product_param.ClearField("weight_filler")
        lp.inner_product_param.ClearField("bias_filler")
        lp.ClearField("batch_norm_param")
        out.append(lp)
    return out


@pytest.mark.parametrize("make", [lambda phase: imagenet_resnet(34, phase=phase),
                                  lambda phase: imagenet_resnet(152, phase=phase),
                                  lambda phase: cifar_resnet(56, phase=phase)])
def test_train_val_is_the_deploy_net_with_data_loss_and_accuracy(make):
    train, deploy = make("train_val"), make("deploy")
    assert _body(train) == _body(deploy)
    heads = [(l.name, l.type, [r.phase for r in l.include]) for l in train.layer
             if l.type in ("Data", "SoftmaxWithLoss", "Accuracy")]
    assert heads[:3] == [("data", "Data", [caffe_pb2.TRAIN]), ("data", "Data", [caffe_pb2.TEST]),
                         ("loss", "SoftmaxWithLoss", [])]
    assert all(phases == [caffe_pb2.TEST] for _, t, phases in heads if t == "Accuracy")
    bn = [l for l in train.layer if l.type == "BatchNorm"]
    assert bn and not any(l.HasField("batch_norm_param") for l in bn)  # Caffe picks the stats by phase
    assert all(l.batch_norm_param.use_global_stats for l in deploy.layer if l.type == "BatchNorm")


def test_input_fed_nets_and_other_sizes():
    net = imagenet_resnet(18, phase="train_val", data=DataSource(shape=(4, 3, 96, 96)), num_classes=7)
    first = net.layer[0]
    assert (first.name, list(first.top)) == ("input", ["data", "label"])
    assert [list(s.dim) for s in first.input_param.shape] == [[4, 3, 96, 96], [4]]
    pool5 = next(l for l in net.layer if l.name == "pool5")
    assert pool5.pooling_param.global_pooling  # 96/32 = 3: the released 7x7 window would not fit
    fc = [l for l in net.layer if l.type == "InnerProduct"]
    assert [(l.name, l.inner_product_param.num_output) for l in fc] == [("fc7", 7)]


# ---------------------------------------------------------------- solvers

def test_solvers_follow_the_papers():
    texts = spec_files.committed_texts("specs")
    from resnetc.prototxt import parse_solver_text

    inet = parse_solver_text(texts["specs/resnet50_solver.prototxt"])
    assert (inet.net, inet.type, inet.base_lr, inet.momentum, inet.weight_decay) == (
        "specs/resnet50.prototxt", "SGD", pytest.approx(0.1), pytest.approx(0.9), pytest.approx(1e-4))
    assert (inet.lr_policy, inet.gamma, inet.stepsize, inet.max_iter) == ("step", pytest.approx(0.1), 150000, 600000)
    train = parse_net_text(texts["specs/resnet50.prototxt"]).param
    assert train.layer[0].data_param.batch_size * inet.iter_size == 256
    assert list(inet.test_iter) == [1000] and train.layer[1].data_param.batch_size * 1000 == 50000

    cifar = parse_solver_text(texts["specs/resnet20_solver.prototxt"])
    assert (cifar.lr_policy, list(cifar.stepvalue), cifar.max_iter, cifar.iter_size) == (
        "multistep", [32000, 48000], 64000, 1)
    assert (cifar.base_lr, cifar.momentum, cifar.weight_decay) == (
        pytest.approx(0.1), pytest.approx(0.9), pytest.approx(1e-4))
    train = parse_net_text(texts["specs/resnet20.prototxt"]).param
    assert train.layer[0].data_param.batch_size == 128
    assert cifar.test_iter[0] * train.layer[1].data_param.batch_size == 10000


# ---------------------------------------------------------------- the command

def test_spec_command_writes_three_files(run_cli, tmp_path):
    out = tmp_path / "nets" / "r20.prototxt"
    r = run_cli("spec", "resnet", "--depth", "20", "--cifar", "--num-classes", "5", "--input", "2,3,32,32",
                "-o", out)
    assert r.returncode == 0, r.stderr
    names = sorted(os.listdir(out.parent))
    assert names == ["r20.prototxt", "r20_deploy.prototxt", "r20_solver.prototxt"]
    deploy = read_net(str(tmp_path / "nets" / "r20_deploy.prototxt")).param
    assert [list(s.dim) for s in deploy.layer[0].input_param.shape] == [[2, 3, 32, 32]]
    assert deploy.layer[-2].name == "fc5"
    solver = (tmp_path / "nets" / "r20_solver.prototxt").read_text()
    assert f'net: "{out}"' in solver and "test_iter" not in solver  # an Input-fed net has no test data
    assert "iter_size: 64" in solver  # 64 x 2 = the paper's mini-batch of 128


@pytest.mark.parametrize("args, message", [
    (["--depth", "19"], "no ImageNet ResNet of depth 19"),
    (["--depth", "21", "--cifar"], "6n+2"),
    (["--depth", "50", "--data", "leveldb:x"], "--data wants lmdb:"),
    (["--depth", "50", "--input", "1,3,224"], "--input wants four"),
])
def test_spec_command_errors_are_one_line(run_cli, tmp_path, args, message):
    r = run_cli("spec", "resnet", *args, "-o", tmp_path / "x.prototxt")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- every spec builds in both phases

@pytest.mark.parametrize("path", [p for p in committed_paths() if not p.endswith("_solver.prototxt")])
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_committed_specs_build_in_both_phases(path, phase):
    """What `resnetc check` does: graph, splits, shapes (sizes of absent LMDBs stay unknown)."""
    from resnetc.graph import build_graph

    graph = build_graph(os.path.join(REPO, path), phase)
    names = [l.name for l in graph.layers]
    assert ("prob" in names) == path.endswith("_deploy.prototxt")
    assert ("accuracy" in names) == (phase == "TEST" and not path.endswith("_deploy.prototxt"))
    if path.endswith("_deploy.prototxt"):
        fc = next(l for l in graph.layers if l.type == "InnerProduct")
        assert graph.blob_shapes[fc.tops[0]] == (1, fc.param.inner_product_param.num_output)


def test_a_generated_cifar_resnet_trains():
    """A few SGD steps on the generated ResNet-20 train_val (Input-fed): finite loss, every learnable blob
    receives a gradient, the loss on the fixed batch goes down, BatchNorm statistics move."""
    import torch

    from resnetc.prototxt import to_text
    from resnetc.net import load_net

    # 16x16 inputs keep it fast: the net ends in global pooling, so its layers and parameters are unchanged
    net_param = cifar_resnet(20, phase="train_val", data=DataSource(shape=(4, 3, 16, 16)))
    src = parse_net_text(to_text(net_param), "resnet20_train_val.prototxt")
    net = load_net(src, phase="TRAIN", seed=1)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(4, 3, 16, 16, generator=g)
    label = torch.randint(0, 10, (4,), generator=g).float()
    learnable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(learnable, lr=0.05, momentum=0.9)
    mean_before = net.params["bn_conv1"][0].detach().clone()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = net(data=data, label=label)["loss"]
        loss.backward()
        losses.append(float(loss.detach()))
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in learnable)
        opt.step()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert not torch.equal(net.params["bn_conv1"][0], mean_before)


@pytest.mark.parametrize("make, expected", [
    (lambda: imagenet_resnet(18), 11_689_512),
    (lambda: imagenet_resnet(50, conv1_bias=False), 25_557_032),
    (lambda: imagenet_resnet(50), 25_557_096),
    (lambda: imagenet_resnet(152), 60_192_808),
    (lambda: cifar_resnet(20), 272_474),
    (lambda: cifar_resnet(56), 855_770),
    (lambda: cifar_resnet(110), 1_730_714),
])
def test_parameter_counts_from_the_graphs_param_blobs(make, expected):
    """The counts `resnetc summary` reports: learnable ParamBlobs of the built graph (BatchNorm stats apart)."""
    from resnetc.graph import build_graph
    from resnetc.prototxt import to_text

    graph = build_graph(parse_net_text(to_text(make()), "generated.prototxt"), "TEST")
    learnable = sum(_numel(b.shape) for l in graph.layers for b in l.blobs if b.learnable)
    stats = sum(_numel(b.shape) for l in graph.layers for b in l.blobs if not b.learnable)
    assert learnable == expected
    assert stats == sum(2 * l.top_shapes[0][1] + 1 for l in graph.layers if l.type == "BatchNorm")

"""ResNet specs written with :mod:`resnetc.netspec`: ImageNet ResNet-18/34/50/101/152 and CIFAR ResNet-6n+2.

**Names are the released ones.** Every net uses the naming of Kaiming He's released Caffe models
(``github.com/KaimingHe/deep-residual-networks``), so their ``.caffemodel`` files load by layer name with no
renaming: ``conv1`` + ``bn_conv1`` + ``scale_conv1`` + ``conv1_relu``, ``pool1``; residual unit ``res2a`` has
branches ``res2a_branch1`` (projection shortcut) and ``res2a_branch2a/2b[/2c]``, each convolution followed by
in-place ``bn2a_branch2a`` (BatchNorm) and ``scale2a_branch2a`` (Scale, with bias), and by
``res2a_branch2a_relu`` where a ReLU follows; the sum is the Eltwise ``res2a`` and ``res2a_relu``; then
``pool5`` (7×7 average as released for 224×224 inputs, global average for other sizes), ``fc1000``,
``prob``. Units are lettered ``a, b, c…``; in nets that have a stage of more than six
units, the stages of more than three units are numbered ``a, b1, b2…`` (this reproduces the release:
ResNet-101 has ``res3b3`` and ``res4b22``, ResNet-50 has ``res3d`` and ``res4f``).

**ImageNet** (He et al., CVPR 2016, Table 1): 7×7/2 conv, 3×3/2 max pool, four stages of 64/128/256/512
(×4 in bottleneck nets) with stride 2 at the first unit of stages 3-5, 7×7 average pool, fully connected.
The shortcut is the identity, or a 1×1 projection (option B) where the shape changes. In bottleneck units the
stride sits on the first 1×1 convolution (``branch2a``), as in the released models (torchvision's "v1.5" puts
it on the 3×3; the parameter count is the same). Convolutions have no bias, except ``conv1`` of ResNet-50,
whose released model has one (``conv1_bias``; ResNet-101/152 were released without it). Parameter counts
(learnable; BatchNorm statistics excluded): ResNet-18 11,689,512, ResNet-50 25,557,032 without conv1's bias
(torchvision's figure) and 25,557,096 with it (the released ResNet-50).

**CIFAR** (He et al. 2016, §4.2): 3×3 conv of 16, three stages of n basic units with 16/32/64 channels (stride
2 at the first unit of stages 2 and 3), global average pool, fully connected; depth = 6n+2 (20, 32, 44, 56,
110, 1202). Downsampling shortcuts use **option B**, a 1×1 stride-2 projection + BatchNorm/Scale: option A's
zero-padded identity needs a channel-padding layer that BVLC Caffe does not have. This adds 2,752 parameters
to ResNet-20 (272,474 instead of the paper's 0.27M). Stages are named ``res2…res4`` like the ImageNet ones.

``train_val`` nets read LMDBs (two ``Data`` layers, TRAIN and TEST) or take ``Input`` blobs ``data`` and
``label``; they end in ``SoftmaxWithLoss`` ``loss`` and TEST-phase ``accuracy`` (and ``accuracy_top5`` on
ImageNet). ``deploy`` nets take an ``Input`` layer named ``input`` (the name Caffe gives the legacy
``input:`` fields of the released files) and end in ``Softmax`` ``prob``. BatchNorm has no parameters in
train_val (Caffe then uses batch statistics in TRAIN and the stored ones in TEST) and
``use_global_stats: true`` in deploy, as released. The classifier is named ``fc<num_classes>``, so weights
for another number of classes are not loaded into it.
"""
from __future__ import annotations

import dataclasses
import string
from typing import Optional, Sequence

from ..errors import ResnetcError
from ..netspec import TEST, TRAIN, L, NetSpec, P
from ..proto import caffe_pb2

__all__ = ["IMAGENET_DEPTHS", "CIFAR_DEPTHS", "DataSource", "resnet", "imagenet_resnet", "cifar_resnet",
           "unit_names", "default_conv1_bias"]

# depth -> (unit kind, units per stage)
IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
CIFAR_DEPTHS = (20, 32, 44, 56, 110)  # the paper's table; any 6n+2 is accepted

IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)
BOTTLENECK_EXPANSION = 4

# BGR means of ILSVRC-2012 (Caffe's examples/imagenet) and RGB means of CIFAR-10 (convert_cifar_data keeps
# the binary's R, G, B plane order)
IMAGENET_MEAN = (104.0, 117.0, 123.0)
CIFAR_MEAN = (125.3, 123.0, 113.9)


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a train_val net's data comes from: LMDBs (``train``/``test``) or Input blobs of ``shape``."""

    train: Optional[str] = None
    test: Optional[str] = None
    shape: Optional[tuple] = None  # (N, C, H, W) of an Input-fed net

    @property
    def is_input(self) -> bool:
        return self.shape is not None


def default_conv1_bias(depth: int) -> bool:
    """conv1 has a bias exactly where the released model has one (ResNet-50)."""
    return depth == 50


def unit_names(stage: int, n_units: int, numbered: bool) -> list:
    """Names of a stage's residual units: ``res2a, res2b…`` or ``res3a, res3b1, res3b2…``."""
    if numbered or n_units > len(string.ascii_lowercase):
        return [f"res{stage}a"] + [f"res{stage}b{i}" for i in range(1, n_units)]
    return [f"res{stage}{string.ascii_lowercase[i]}" for i in range(n_units)]


def _numbered_stages(units: Sequence[int]) -> list:
    deep = max(units) > 6
    return [deep and u > 3 for u in units]


class _Writer:
    """Adds conv/BN/Scale/ReLU groups with the released names to a NetSpec."""

    def __init__(self, n: NetSpec, train: bool):
        self.n = n
        self.train = train

    def conv_bn(self, name: str, bottom, num_output: int, kernel: int, stride: int, pad: int, *,
                relu: bool, bias: bool = False):
        n = self.n
        conv = dict(num_output=num_output, pad=pad, kernel_size=kernel, stride=stride)
        if not bias:
            conv["bias_term"] = False
        if self.train:
            conv["weight_filler"] = dict(type="msra")
            if bias:
                conv["bias_filler"] = dict(type="constant", value=0)
        n[name] = L.Convolution(bottom, **conv)
        suffix = name[3:] if name.startswith("res") else "_" + name
        bn = {} if self.train else dict(batch_norm_param=dict(use_global_stats=True))
        n["bn" + suffix] = L.BatchNorm(n[name], in_place=True, **bn)
        n["scale" + suffix] = L.Scale(n["bn" + suffix], in_place=True, bias_term=True)
        out = n["scale" + suffix]
        if relu:
            n[name + "_relu"] = L.ReLU(out, in_place=True)
            out = n[name + "_relu"]
        return out

    def unit(self, name: str, bottom, kind: str, in_ch: int, width: int, stride: int):
        """One residual unit; returns (its output top, its output channels)."""
        out_ch = width * BOTTLENECK_EXPANSION if kind == "bottleneck" else width
        if stride != 1 or in_ch != out_ch:
            shortcut = self.conv_bn(name + "_branch1", bottom, out_ch, 1, stride, 0, relu=False)
        else:
            shortcut = bottom
        if kind == "bottleneck":
            x = self.conv_bn(name + "_branch2a", bottom, width, 1, stride, 0, relu=True)
            x = self.conv_bn(name + "_branch2b", x, width, 3, 1, 1, relu=True)
            x = self.conv_bn(name + "_branch2c", x, out_ch, 1, 1, 0, relu=False)
        else:
            x = self.conv_bn(name + "_branch2a", bottom, width, 3, stride, 1, relu=True)
            x = self.conv_bn(name + "_branch2b", x, width, 3, 1, 1, relu=False)
        self.n[name] = L.Eltwise(shortcut, x)
        self.n[name + "_relu"] = L.ReLU(self.n[name], in_place=True)
        return self.n[name + "_relu"], out_ch

    def stages(self, x, kind: str, units: Sequence[int], widths: Sequence[int], in_ch: int, first_stage: int):
        numbered = _numbered_stages(units)
        for s, (n_units, width) in enumerate(zip(units, widths)):
            for u, name in enumerate(unit_names(first_stage + s, n_units, numbered[s])):
                stride = 2 if (u == 0 and s > 0) else 1
                x, in_ch = self.unit(name, x, kind, in_ch, width, stride)
        return x


def _inputs(n: NetSpec, phase: str, data: DataSource, deploy_shape: tuple, transform: dict,
            batch: tuple) -> Optional[caffe_pb2.LayerParameter]:
    """Add the data layer(s); returns the TEST-phase Data layer to insert after the TRAIN one (or None)."""
    if phase == "deploy":
        n.data = L.Input(name="input", shape=dict(dim=list(data.shape or deploy_shape)))
        return None
    if data.is_input:
        N = data.shape[0]
        n.data, n.label = L.Input(name="input", shape=[dict(dim=list(data.shape)), dict(dim=[N])], ntop=2)
        return None
    train_tf, test_tf = transform["train"], transform["test"]
    n.data, n.label = L.Data(source=data.train, backend=P.Data.LMDB, batch_size=batch[0], ntop=2,
                             transform_param=train_tf, include=dict(phase=TRAIN))
    t = NetSpec()
    t.data, t.label = L.Data(source=data.test or data.train, backend=P.Data.LMDB, batch_size=batch[1], ntop=2,
                             transform_param=test_tf, include=dict(phase=TEST))
    return t.to_proto().layer[0]


def _head(n: NetSpec, x, phase: str, num_classes: int, top5: bool, train: bool):
    fc = f"fc{num_classes}"
    ip = dict(num_output=num_classes)
    if train:
        ip.update(weight_filler=dict(type="xavier"), bias_filler=dict(type="constant", value=0))
    n[fc] = L.InnerProduct(x, **ip)
    if phase == "deploy":
        n.prob = L.Softmax(n[fc])
        return
    n.loss = L.SoftmaxWithLoss(n[fc], n.label)
    n.accuracy = L.Accuracy(n[fc], n.label, include=dict(phase=TEST))
    if top5:
        n.accuracy_top5 = L.Accuracy(n[fc], n.label, top_k=5, include=dict(phase=TEST))


def _finish(n: NetSpec, name: str, test_data_layer) -> caffe_pb2.NetParameter:
    net = n.to_proto(name=name)
    if test_data_layer is not None:
        net.layer.insert(1, test_data_layer)
    return net


def _check_phase(phase: str) -> str:
    if phase not in ("train_val", "deploy"):
        raise ResnetcError(f"unknown spec kind '{phase}' (train_val or deploy)")
    return phase


def imagenet_resnet(depth: int, *, phase: str = "deploy", num_classes: int = 1000,
                    data: Optional[DataSource] = None, conv1_bias: Optional[bool] = None,
                    batch: tuple = (32, 50)) -> caffe_pb2.NetParameter:
    """ImageNet ResNet-``depth`` (18, 34, 50, 101, 152) as a ``train_val`` or ``deploy`` NetParameter.

    ``conv1_bias``: None = as released (ResNet-50 only); ``batch`` = (TRAIN, TEST) Data batch sizes.
    """
    _check_phase(phase)
    if depth not in IMAGENET_DEPTHS:
        raise ResnetcError(f"no ImageNet ResNet of depth {depth} (choose from {', '.join(map(str, IMAGENET_DEPTHS))})")
    kind, units = IMAGENET_DEPTHS[depth]
    bias = default_conv1_bias(depth) if conv1_bias is None else conv1_bias
    data = data or DataSource(train="examples/imagenet/ilsvrc12_train_lmdb",
                              test="examples/imagenet/ilsvrc12_val_lmdb")
    train = phase == "train_val"
    n = NetSpec()
    crop = data.shape[-1] if data.is_input else 224  # input side; pool5 is global unless it is 224
    transform = {"train": dict(mirror=True, crop_size=crop, mean_value=list(IMAGENET_MEAN)),
                 "test": dict(mirror=False, crop_size=crop, mean_value=list(IMAGENET_MEAN))}
    test_layer = _inputs(n, phase, data, (1, 3, 224, 224), transform, batch)
    w = _Writer(n, train)
    x = w.conv_bn("conv1", n.data, 64, 7, 2, 3, relu=True, bias=bias)
    n.pool1 = L.Pooling(x, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    x = w.stages(n.pool1, kind, units, IMAGENET_WIDTHS, 64, first_stage=2)
    if crop == 224:  # the released 7x7 window (the last maps are 7x7)
        n.pool5 = L.Pooling(x, pool=P.Pooling.AVE, kernel_size=7, stride=1)
    else:
        n.pool5 = L.Pooling(x, pool=P.Pooling.AVE, global_pooling=True)
    _head(n, n.pool5, phase, num_classes, top5=True, train=train)
    return _finish(n, f"ResNet-{depth}", test_layer)


def cifar_resnet(depth: int, *, phase: str = "deploy", num_classes: int = 10,
                 data: Optional[DataSource] = None, batch: tuple = (128, 100)) -> caffe_pb2.NetParameter:
    """CIFAR ResNet-``depth`` (6n+2: 20, 32, 44, 56, 110, …), option-B shortcuts, as a NetParameter."""
    _check_phase(phase)
    if depth < 8 or (depth - 2) % 6:
        raise ResnetcError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110, …); got {depth}")
    n_units = (depth - 2) // 6
    data = data or DataSource(train="examples/cifar10/cifar10_train_lmdb",
                              test="examples/cifar10/cifar10_test_lmdb")
    train = phase == "train_val"
    n = NetSpec()
    transform = {"train": dict(mirror=True, mean_value=list(CIFAR_MEAN)),
                 "test": dict(mirror=False, mean_value=list(CIFAR_MEAN))}
    test_layer = _inputs(n, phase, data, (1, 3, 32, 32), transform, batch)
    w = _Writer(n, train)
    x = w.conv_bn("conv1", n.data, 16, 3, 1, 1, relu=True)
    x = w.stages(x, "basic", (n_units,) * 3, CIFAR_WIDTHS, 16, first_stage=2)
    n.pool = L.Pooling(x, pool=P.Pooling.AVE, global_pooling=True)
    _head(n, n.pool, phase, num_classes, top5=False, train=train)
    return _finish(n, f"ResNet-{depth}-CIFAR", test_layer)


def resnet(depth: int, *, cifar: bool = False, **kwargs) -> caffe_pb2.NetParameter:
    """:func:`cifar_resnet` or :func:`imagenet_resnet`."""
    return cifar_resnet(depth, **kwargs) if cifar else imagenet_resnet(depth, **kwargs)
